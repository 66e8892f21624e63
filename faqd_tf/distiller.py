"""`Distiller`: FAQD training of a (quantized) student from a frozen full-precision teacher.

The loss of one sample (eqs. 10-11 of arXiv 2302.10899) is

    alpha * KD(teacher logits, student logits) + beta * sum_l FA(teacher map l, student map l)
        + gamma * CE(labels, student logits)

with KD the MSE (end-to-end) or the temperature-scaled KL (fine-tuning), FA the exact feature
affinity or its fast estimate (FFA) in the squared Frobenius norm of eq. (6) (`fa_norm="fro2"`)
or the L1 norm the authors' code trains with (`"l1"`), and gamma = 0 for label-free training:
`fit` then takes batches of images alone. Each term is a mean over the batch; the authors sum FA
over the batch, so their `fa_coef` c at batch size B is `beta = c * B` here. Left unset, beta is
the measured default of the norm (`faqd_tf.options.DEFAULT_BETA`), which gives FA about the share
of the gradient it has in the authors' code; `gradient_norms` shows each term's share.

>>> from faqd_tf.models import resnet_cifar
>>> from faqd_tf.quantize import quantize_model
>>> teacher = resnet_cifar(20)
>>> student = quantize_model(teacher, weight_bits=4)
>>> distiller = Distiller(student, teacher, alpha=1.0, kd="mse", fa="exact", fa_norm="fro2")
>>> distiller.beta  # unset: the measured default of fro2
30.0
>>> Distiller(student, teacher, DistillOptions(kd="kl", temperature=4.0)).terms
[KDTerm(1.0*KD(kl)), FATerm(30.0*FA(exact, fro2))]
>>> distiller.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
>>> images = np.random.rand(8, 32, 32, 3).astype("float32")
>>> history = distiller.fit(images, batch_size=4, epochs=1, verbose=0)
>>> sorted(history.history)
['fa', 'kd', 'loss']
"""

import dataclasses
import warnings

import keras
import numpy as np
import tensorflow as tf

from faqd_tf import compat, terms, training
from faqd_tf.features import feature_layers, paired_extractors
from faqd_tf.options import DistillOptions, check_seed, fresh_seed

_OPTIONS = tuple(DistillOptions.specs())


@keras.saving.register_keras_serializable(package="faqd_tf")
class Distiller(keras.Model):
    """Feature-affinity assisted quantized distillation (FAQD) of `student` from `teacher`.

    Args:
        student: the Keras model to train (often `quantize_model(teacher)`); outputs logits.
        teacher: the trained full-precision Keras model; frozen, run in inference mode.
        options: the loss, a `faqd_tf.options.DistillOptions` (a config's `distill` section); or
            give its fields as keywords instead, Keras-style (`alpha=`, `kd=`, ...):
            alpha: weight of the KD loss on logits.
            beta: weight of the feature-affinity loss (summed over the taps); None takes the measured
                default of `fa_norm` (`faqd_tf.options.DEFAULT_BETA`).
            gamma: weight of the cross-entropy on labels; 0 trains label-free.
            kd: `"mse"` (raw logits; the paper's choice end-to-end) or `"kl"` (fine-tuning).
            temperature: softmax temperature of the KL loss (scaled by T^2).
            fa: `"exact"` feature affinity, `"fast"` (FFA with `ffa_k` Gaussian probes), or None.
            fa_norm: `"fro2"` (eq. 6) or `"l1"` (the authors' code); see `faqd_tf.losses`.
            ffa_k: number of FFA probes.
            fa_method: `"auto"`, `"gram"` (fro2 only) or `"pairwise"` for the exact FA.
            student_layers, teacher_layers: names of the tapped layers, paired in order; None picks
                the stage outputs (see `faqd_tf.features.feature_layers`), never the logits of a dense
                prediction (a segmentation net's 4-D output).
            Their bounds are `DistillOptions`'s (docs/config.md, `distill.*`).
        seed: seed of the FFA probes: those of tap `(t, s)` at training step `step` are drawn from
            `faqd_tf.losses.probe_seed(seed, tap_key(t, s), step)`; None draws a seed once.
        teacher_cache: keep the teacher's logits of up to this many training examples, so that
            the frozen teacher runs once per example, in the first epoch, instead of every epoch.
            The batches then carry each example's number: ``{"images": x, "index": i}``, as
            `faqd_tf.data.load(..., index=True)` yields them (numbers in [0, teacher_cache)). For
            KD (and CE) only: FA needs the teacher's maps every step. Only where an example is the
            same image every epoch (no augmentation); on one replica.
        **kwargs: passed to `keras.Model` (`name`, ...).

    The loss is the weighted sum of `distiller.terms` (`faqd_tf.terms`: KD, FA unless `fa` is None,
    CE when gamma > 0), each logged under its name (`kd`, `fa`, `ce`) next to the total `loss`.

    `distiller.student` stays a plain Keras model: save it with `student.save("x.keras")`.
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model,
        options: DistillOptions | None = None,
        *,
        seed: int | None = None,
        teacher_cache: int | None = None,
        **kwargs,
    ):
        options = _options(options, {name: kwargs.pop(name) for name in _OPTIONS if name in kwargs})
        seed = check_seed(seed)
        super().__init__(**kwargs)
        self.options = options
        self.seed = fresh_seed() if seed is None else seed
        self.teacher_cache = _check_teacher_cache(teacher_cache, options, teacher)

        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        _check_compatible(student, teacher)
        if self.fa is None:
            self.teacher_features, self.student_features = paired_extractors(
                teacher, student, [], []
            )
        else:
            self.teacher_features, self.student_features = paired_extractors(
                teacher,
                student,
                _default_taps(teacher) if self.teacher_layers is None else self.teacher_layers,
                _default_taps(student) if self.student_layers is None else self.student_layers,
            )
            if not self.teacher_features.output_names[1:]:
                # FA with nothing to match would train KD alone while the log says FAQD.
                raise ValueError(
                    f"fa={self.fa!r} found no feature maps to match in {teacher.name!r} (feature_layers taps stage "
                    "outputs with spatial maps); name them with teacher_layers=/student_layers=, or use fa=None "
                    "for KD only."
                )
        self.terms = terms.from_options(options, seed=self.seed, taps=self.feature_pairs)
        self._cache = None
        if self.teacher_cache:
            # Plain tf.Variables: not weights of the Distiller (nothing saved, a restored run refills).
            classes = int(teacher.outputs[0].shape[-1])
            self._cache = (
                tf.Variable(tf.zeros([self.teacher_cache, classes]), trainable=False),
                tf.Variable(tf.zeros([self.teacher_cache], tf.bool), trainable=False),
            )
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.term_trackers = [keras.metrics.Mean(name=term.name) for term in self.terms]
        # Both networks are built, so the Distiller is too (BackupAndRestore needs a built model).
        self.built = True

    # The loss options, read from the one record they were checked in.
    alpha = property(lambda self: float(self.options.alpha))
    beta = property(lambda self: self.options.fa_weight)
    gamma = property(lambda self: float(self.options.gamma))
    kd = property(lambda self: self.options.kd)
    temperature = property(lambda self: float(self.options.temperature))
    fa = property(lambda self: self.options.fa)
    fa_norm = property(lambda self: self.options.fa_norm)
    ffa_k = property(lambda self: int(self.options.ffa_k))
    fa_method = property(lambda self: self.options.fa_method)
    student_layers = property(lambda self: _listed(self.options.student_layers))
    teacher_layers = property(lambda self: _listed(self.options.teacher_layers))

    @property
    def feature_pairs(self) -> list[tuple[str, str]]:
        """(teacher layer, student layer) names of the FA terms."""
        return list(
            zip(self.teacher_features.output_names[1:], self.student_features.output_names[1:])
        )

    def compile(self, optimizer="sgd", loss=None, metrics=None, **kwargs):
        """Like `keras.Model.compile`, without `loss`: the Distiller composes its own.

        `metrics` (e.g. `["accuracy"]`) are computed on the student's logits for batches that
        carry labels; label-free batches leave them out of the logs.

        `jit_compile=True` compiles the whole step (both networks, every loss term, the update)
        with XLA on one replica. Under a strategy of several replicas it is turned off with a
        warning, as Keras's own `"auto"` does there: XLA places a replica's step on the first
        device and cannot reach the other replicas' variables.
        """
        if loss is not None:
            raise ValueError(
                "Distiller.compile takes no loss: it trains on alpha*KD + beta*FA + gamma*CE; "
                "set those weights on the Distiller instead."
            )
        replicas = self.distribute_strategy.num_replicas_in_sync
        if kwargs.get("jit_compile") is True and replicas > 1:
            warnings.warn(
                f"jit_compile=True is turned off under a strategy of {replicas} replicas (XLA cannot reach "
                "the other replicas' variables from a compiled step); the step runs as a TensorFlow graph.",
                stacklevel=2,
            )
            kwargs["jit_compile"] = False
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Recompiles a loaded Distiller (`keras.models.load_model`) as it was saved, optimizer included."""
        config = keras.saving.deserialize_keras_object(config)
        config.pop("loss", None)  # always None: the Distiller composes its own
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None:
            # Built now, so the saved optimizer variables have somewhere to load into.
            self.optimizer.build(self.trainable_variables)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`; batches of images alone train label-free (gamma = 0)."""
        self._build_compile_metrics(x, y, kwargs.get("validation_data"))
        return super().fit(x, y, *args, **kwargs)

    def _build_compile_metrics(self, x, y, validation_data):
        # Under a tf.distribute strategy, fit first builds the model symbolically from one training
        # batch; a label-free batch has no labels to build the compiled metrics with, so they are
        # built here from the labels of the validation data (or of the training data).
        compiled = compat.compiled_metrics(self)
        if compiled is None or compiled.built or not compat.created_under_strategy(self):
            return
        label_spec = None
        for data, labels in ((x, y), (validation_data, None)):
            if labels is not None:
                label_spec = tf.TensorSpec(
                    (None, *np.shape(labels)[1:]), tf.as_dtype(np.asarray(labels).dtype)
                )
            elif (
                isinstance(data, tf.data.Dataset)
                and isinstance(data.element_spec, tuple)
                and len(data.element_spec) > 1
            ):
                label_spec = data.element_spec[1]
            elif isinstance(data, tuple) and len(data) > 1:
                label_spec = tf.TensorSpec(
                    (None, *np.shape(data[1])[1:]), tf.as_dtype(np.asarray(data[1]).dtype)
                )
            if label_spec is not None:
                break
        label_spec = label_spec or tf.TensorSpec((None,), tf.int32)
        logits = tf.nest.flatten(self.student.outputs)[0]
        compiled.build(
            keras.KerasTensor(label_spec.shape, label_spec.dtype.name),
            keras.KerasTensor(logits.shape, "float32"),
        )

    @property
    def metrics(self):
        trackers = [self.total_tracker, *self.term_trackers]
        # Compiled metrics exist only once a labeled batch has built them; asking an unbuilt
        # one for its result fails at the end of a label-free epoch.
        compiled = compat.compiled_metrics(self)
        if compiled is not None and compiled.built:
            trackers.append(compiled)
        return trackers

    def call(self, inputs, training=None):
        return self.student(_images(inputs), training=training)

    def _step(self):
        optimizer = getattr(self, "optimizer", None)  # None before compile (e.g. gradient_norms)
        return optimizer.iterations if optimizer is not None else 0

    def loss_terms(
        self, teacher_outputs: list, student_outputs: list, y: tf.Tensor | None = None
    ) -> dict:
        """Per-sample loss terms of the feature extractors' outputs: a dict by term name (`kd`, `fa`
        summed over the taps, `ce` when gamma > 0) of `(batch,)` tensors."""
        teacher, student = terms.Outputs.of(teacher_outputs), terms.Outputs.of(student_outputs)
        step = self._step()
        return {term.name: term(teacher, student, y, step) for term in self.terms}

    def _forward(self, x, y, training):
        """The one forward pass of `train_step`, `test_step` and `gradient_norms`: the student's
        logits and each term's per-sample values. The teacher runs in inference mode; its variables
        are not trainable, so a tape around this records nothing of it."""
        images, index = _images(x), x.get("index") if isinstance(x, dict) else None
        if self._cache is not None and index is not None and training:
            teacher_outputs = [self._cached_teacher_logits(images, index)]
        else:
            teacher_outputs = self.teacher_features(images, training=False)
        student_outputs = self.student_features(images, training=training)
        return tf.nest.flatten(student_outputs)[0], self.loss_terms(
            teacher_outputs, student_outputs, y
        )

    def _cached_teacher_logits(self, images, index):
        """The teacher's logits of a numbered batch: kept ones where every example has them,
        else computed and kept."""
        table, kept = self._cache
        index = tf.reshape(tf.cast(index, tf.int32), [-1])
        tf.debugging.assert_less(
            index,
            self.teacher_cache,
            message=f"an example's index is >= teacher_cache={self.teacher_cache}; size the "
            "cache to the number of training examples",
        )

        def compute():
            logits = tf.nest.flatten(self.teacher_features(images, training=False))[0]
            rows = index[:, None]
            with tf.control_dependencies(
                [
                    table.scatter_nd_update(rows, tf.cast(logits, table.dtype)),
                    kept.scatter_nd_update(rows, tf.ones_like(index, tf.bool)),
                ]
            ):
                return tf.identity(logits)

        def reuse():
            return tf.cast(tf.gather(table, index), self.teacher.compute_dtype)

        return tf.cond(tf.reduce_all(tf.gather(kept, index)), reuse, compute)

    def _total(self, values):
        total = None
        for term in self.terms:  # in order: alpha * KD + beta * FA + gamma * CE
            weighted = term.weight * values[term.name]
            total = weighted if total is None else total + weighted
        return total

    def _update_trackers(self, values, total, sample_weight, batch):
        def mean(v):
            if sample_weight is None:
                return tf.reduce_mean(v)
            w = tf.cast(tf.reshape(sample_weight, [-1]), v.dtype)
            return tf.reduce_sum(v * w) / tf.cast(batch, v.dtype)

        self.total_tracker.update_state(mean(total), sample_weight=batch)
        for term, tracker in zip(self.terms, self.term_trackers):
            tracker.update_state(mean(values[term.name]), sample_weight=batch)

    def _logs(self, y, student_logits, sample_weight):
        compiled = compat.compiled_metrics(self)
        if y is not None and compiled is not None:
            compiled.update_state(y, student_logits, sample_weight)
        logs = {}
        for metric in self.metrics:
            if metric is compiled and y is None:
                continue  # built (see fit) but not measured on label-free batches
            result = metric.result()
            logs.update(result if isinstance(result, dict) else {metric.name: result})
        return logs

    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            for term in self.terms:
                if term.needs_labels:
                    raise ValueError(term.missing_labels())
        return x, y, sample_weight

    def train_step(self, data):
        x, y, sample_weight = self._unpack(data)
        batch = tf.shape(_images(x))[0]
        with tf.GradientTape() as tape:
            logits, values = self._forward(x, y, training=True)
            total = self._total(values)
            # Divides by the global batch size, so that the replicas' summed gradients are
            # the gradient of the mean over the global batch.
            loss = tf.nn.compute_average_loss(total, sample_weight=sample_weight)
            if self.student.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.cast(tf.add_n(self.student.losses), loss.dtype)
                )
            scaled = self.optimizer.scale_loss(loss)
        variables = self.student.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        self._update_trackers(values, total, sample_weight, batch)
        return self._logs(y, logits, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = self._unpack(data)
        batch = tf.shape(_images(x))[0]
        logits, values = self._forward(x, y, training=False)
        self._update_trackers(values, self._total(values), sample_weight, batch)
        return self._logs(y, logits, sample_weight)

    def gradient_norms(
        self, data: tuple | tf.Tensor | np.ndarray | tf.data.Dataset, weighted: bool = True
    ) -> dict[str, float]:
        """The norm of each loss term's gradient with respect to the student's trainable weights.

        Shows whether a term can act at all: a weighted term whose gradient is a small fraction
        of the largest barely moves the weights. The student runs in training mode as in
        `train_step`; its batch-norm statistics are restored afterwards, so the call changes
        nothing.

        Args:
            data: one batch as `fit` takes it (images, or `(images, labels)` when gamma > 0),
                or a `tf.data.Dataset`, whose first batch is used.
            weighted: norms of `alpha * KD`, `beta * FA`, `gamma * CE` (the terms as trained);
                False gives the unweighted terms.

        Returns:
            A dict of floats by term name: `kd`, `fa` (when FA is on) and `ce` (when gamma > 0).

        Example:

        >>> from faqd_tf.models import resnet_cifar
        >>> from faqd_tf.quantize import quantize_model
        >>> teacher = resnet_cifar(8, input_shape=(16, 16, 3))
        >>> distiller = Distiller(quantize_model(teacher, weight_bits=4), teacher, kd="kl", temperature=4.0)
        >>> norms = distiller.gradient_norms(np.random.rand(8, 16, 16, 3).astype("float32"))
        >>> sorted(norms), all(v >= 0 for v in norms.values())
        (['fa', 'kd'], True)
        """
        if isinstance(data, tf.data.Dataset):
            data = next(iter(data))
        x, y, sample_weight = self._unpack(data)
        state = [(v, tf.identity(v)) for v in self.student.non_trainable_variables]
        with tf.GradientTape(persistent=True) as tape:
            _, values = self._forward(x, y, training=True)
            means = {}
            for term in self.terms:
                value = values[term.name]
                if sample_weight is not None:
                    value = value * tf.cast(tf.reshape(sample_weight, [-1]), value.dtype)
                means[term.name] = (term.weight if weighted else 1.0) * tf.reduce_mean(value)
        for variable, value in state:
            variable.assign(value)
        variables = self.student.trainable_variables
        norms = {
            name: float(tf.linalg.global_norm(tape.gradient(mean, variables)))
            for name, mean in means.items()
        }
        del tape
        return norms

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.student(_images(x), training=False)

    def evaluate_teacher(self, x, **kwargs) -> dict:
        """The teacher's loss and accuracy on labeled data (`x` as for `evaluate`), as a dict."""
        # A model of its own: compiling the teacher would change the shared network's state.
        evaluator = keras.Model(self.teacher.inputs, self.teacher.outputs, name="teacher_eval")
        return training.evaluate_classifier(evaluator, x, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "student": keras.saving.serialize_keras_object(self.student),
                "teacher": keras.saving.serialize_keras_object(self.teacher),
                **dataclasses.asdict(self.options),
                "beta": self.beta,  # resolved: a restored Distiller keeps the weight it trained with
                "seed": self.seed,
                "teacher_cache": self.teacher_cache,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        return cls(**config)


def _images(x):
    """The images of a batch's inputs: `x` itself, or its "images" when numbered (`index=True`)."""
    return x["images"] if isinstance(x, dict) else x


def _check_teacher_cache(teacher_cache, options, teacher):
    if teacher_cache is None:
        return None
    if isinstance(teacher_cache, bool) or not isinstance(teacher_cache, (int, np.integer)):
        raise ValueError(
            f"teacher_cache={teacher_cache!r} is not valid; use the number of training examples or None."
        )
    if not 0 < teacher_cache <= 2**31 - 1:
        raise ValueError(f"teacher_cache={teacher_cache} is not valid; use a number >= 1 or None.")
    obstacles = teacher_cache_obstacles(options.fa, teacher)
    if obstacles:
        raise ValueError(
            f"teacher_cache cannot keep the teacher's logits: {'; '.join(obstacles)}; use "
            "teacher_cache=None (or fa=None for KD only)."
        )
    return int(teacher_cache)


def teacher_cache_obstacles(fa, teacher, key="fa", replicas=None) -> list[str]:
    """Why `Distiller(teacher_cache=...)` cannot keep `teacher`'s logits with FA `fa` on `replicas`
    replicas (default: the current strategy's), [] when it can; `key` names the FA option."""
    if replicas is None:
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
    found = []
    if fa is not None:
        found.append(f"{key}={fa!r} needs its feature maps every step")
    if replicas > 1:
        found.append("it runs on one replica only (each replica would keep its own share)")
    if len(teacher.outputs[0].shape) != 2:
        found.append(
            f"{teacher.name!r} outputs {tuple(teacher.outputs[0].shape)}, not 2-D logits (batch, classes)"
        )
    return found


def _listed(names):
    return None if names is None else list(names)


def _options(options, flat):
    """The loss options: `options`, or a `DistillOptions` of the `flat` keywords (checked there, once)."""
    if options is None:
        return DistillOptions(**flat)
    if not isinstance(options, DistillOptions):
        raise TypeError(
            f"Distiller: options={options!r} is not a faqd_tf.options.DistillOptions; give the loss "
            "options as one, or as keywords (alpha=..., kd=...)."
        )
    if flat:
        raise TypeError(
            f"Distiller: give the loss options either as options= or as keywords, not both "
            f"({', '.join(sorted(flat))})."
        )
    return options


def _default_taps(model):
    """`feature_layers(model)` less the layer that outputs the logits.

    A segmentation net's logits are a 4-D map; `feature_layers` leaves the logits head out, and this
    guard keeps it so whatever picks the taps. KD already matches the logits, and FA on them is
    unstable: a logit vector near zero (no ReLU keeps the bias from reaching it) has a unit
    direction whose gradient grows as 1 / |logits| (measured: FA's gradient 5.5e6 against KD's 0.03
    on a random Conv2D/Conv2DTranspose net, which diverged in one step).
    """
    history = getattr(model.outputs[0], "_keras_history", None)
    output_layer = getattr(getattr(history, "operation", None), "name", None)
    return [name for name in feature_layers(model) if name != output_layer]


def _check_compatible(student, teacher):
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, keras.Model) or not model.built or not model.inputs:
            raise ValueError(f"The {role} must be a built Keras model, got {model!r}.")
    s_in, t_in = tuple(student.inputs[0].shape[1:]), tuple(teacher.inputs[0].shape[1:])
    if s_in != t_in:
        raise ValueError(
            f"The student takes inputs of shape {s_in} and the teacher {t_in}; both must see the same images."
        )
    s_out, t_out = student.outputs[0].shape[-1], teacher.outputs[0].shape[-1]
    if s_out != t_out:
        raise ValueError(
            f"The student has {s_out} logits and the teacher {t_out}; KD needs the same classes."
        )
    s_shape, t_shape = tuple(student.outputs[0].shape[1:]), tuple(teacher.outputs[0].shape[1:])
    if len(s_shape) != len(t_shape) or any(
        a is not None and b is not None and a != b for a, b in zip(s_shape, t_shape)
    ):
        raise ValueError(
            f"The student outputs logits of shape {s_shape} and the teacher {t_shape}; KD compares them "
            "position by position, so give the student the teacher's output shape."
        )
