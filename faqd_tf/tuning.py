"""Hyperparameter search over the FAQD loss weights with keras-tuner.

`FAQDHyperModel` is a `keras_tuner.HyperModel` whose `build(hp)` returns a compiled `Distiller`
(metrics `["accuracy"]`) of a fresh student from the trained full-precision teacher. It tunes

    alpha        weight of the KD term           Float, log sampling, default range [0.1, 2]
    fa_norm      norm of the FA term             Fixed (one norm) or Choice of "fro2", "l1"
    beta         weight of the FA term           Float, log sampling, default range
                                                 [d / 30, 10 d] around the norm's measured
                                                 default d (30 for fro2, 10 for l1); with a
                                                 Choice of norms, one `beta_<norm>` per norm
    gamma        weight of the cross-entropy     Float, default range [0, 1]; Fixed 0 when label_free
    temperature  KL temperature (kd="kl" only)   Choice, default [1, 2, 4, 8]; Fixed 1 for kd="mse"
    use_fa       FA term on or off (tune_fa)     Boolean

and records the fixed choices as `Fixed` hyperparameters `kd` and `fa_kind`, so that a trial's
hyperparameter values alone determine its Distiller (`best_distill_config`). The objective is the
student's accuracy on a labeled validation set, `keras_tuner.Objective("val_accuracy", "max")`:
the training batches may be images alone (label-free FAQD), the validation batches carry labels.
Any keras-tuner tuner takes the hypermodel (`RandomSearch`, `BayesianOptimization`, `Hyperband`);
`search` wraps the three (`BayesianOptimization` uses scikit-learn, a requirement of this project).

>>> import keras_tuner
>>> from faqd_tf.models import resnet_cifar
>>> from faqd_tf.quantize import quantize_model
>>> teacher = resnet_cifar(20, num_classes=5, input_shape=(16, 16, 3))
>>> hypermodel = FAQDHyperModel(teacher, lambda: quantize_model(teacher, weight_bits=4), kd="kl")
>>> hp = keras_tuner.HyperParameters()
>>> distiller = hypermodel.build(hp)
>>> type(distiller).__name__, distiller.gamma, distiller.fa
('Distiller', 0.0, 'exact')
>>> sorted(hp.values)
['alpha', 'beta', 'fa_kind', 'fa_norm', 'gamma', 'kd', 'temperature', 'use_fa']
>>> best_distill_config({"alpha": 0.5, "beta": 0.1, "gamma": 0.0, "temperature": 4, "use_fa": False})
{'alpha': 0.5, 'beta': 0.0, 'gamma': 0.0, 'temperature': 4.0, 'fa': None, 'fa_norm': 'fro2'}

A search, with images-only training batches and labeled validation batches::

    best, tuner = search(hypermodel, train_images, (val_images, val_labels), tuner="random",
                         max_trials=20, epochs=5, directory="tuning", project_name="resnet20_w4")
    json.dump(best_distill_config(best), open("best.json", "w"))
"""

import dataclasses
import numbers
import tempfile
import warnings
from collections.abc import Callable, Sequence

import keras
import keras_tuner
import numpy as np
import tensorflow as tf

from faqd_tf import options
from faqd_tf.batchnorm import _images, recalibrate_batchnorm
from faqd_tf.distiller import Distiller
from faqd_tf.names import TUNERS
from faqd_tf.options import DistillOptions
from faqd_tf.quantize import set_alpha_decay

OBJECTIVE = "val_accuracy"
_NO_FA = "none"  # the `fa_kind` value of fa=None (a Fixed hyperparameter cannot hold None)
TUNED = ("alpha", "beta", "gamma", "temperature", "fa")
"""The `DistillOptions` a search sets (`fa` only on or off: `use_fa`; `fa_norm` when given a list)."""
FIXED = (*(name for name in DistillOptions.specs() if name not in TUNED), "seed")
"""The `Distiller` arguments a search keeps as given."""
DEFAULTS = {
    name: DistillOptions.specs()[name].default for name in ("alpha", "gamma", "temperature")
}
"""The weights a trial's values may leave out (beta: `options.DEFAULT_BETA` of the norm)."""


def default_optimizer() -> keras.optimizers.Optimizer:
    """The paper's fine-tuning optimizer: SGD, Nesterov momentum 0.9, learning rate 0.01."""
    return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, nesterov=True)


def objective() -> keras_tuner.Objective:
    """The tuning objective: the student's validation accuracy, maximized."""
    return keras_tuner.Objective(OBJECTIVE, "max")


def _range(name, value, log):
    """`value` as a (low, high) pair of floats; a single number fixes the hyperparameter."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a number or a (low, high) pair.")
    if isinstance(value, numbers.Real):
        value = (value, value)
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number or a (low, high) pair.") from None
    if low < 0 or high < low:
        raise ValueError(f"{name}={value!r} must satisfy 0 <= low <= high.")
    if log and low == 0 and high > 0:
        raise ValueError(f"{name}={value!r} is sampled on a log scale; its low end must be > 0.")
    return low, high


def _choices(name, value):
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = [value]
    try:
        values = sorted({float(v) for v in value})
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number or a list of numbers > 0.") from None
    if not values or values[0] <= 0:
        raise ValueError(f"{name}={value!r} must be a number or a list of numbers > 0.")
    return values


class FAQDHyperModel(keras_tuner.HyperModel):
    """Searches the FAQD loss weights of a `Distiller` of fresh students from `teacher`.

    Args:
        teacher: the trained full-precision Keras model (shared by all trials, frozen).
        student_fn: zero-argument callable returning a fresh student for each trial,
            e.g. `lambda: quantize_model(teacher, weight_bits=4)`.
        optimizer_fn: zero-argument callable returning a fresh optimizer for each trial;
            default SGD with Nesterov momentum 0.9 and learning rate 0.01.
        kd, fa, ffa_k, fa_method, student_layers, teacher_layers, seed: fixed `Distiller`
            arguments. `fa` is the FA kind used when the trial turns FA on (None: never).
        fa_norm: `"fro2"` or `"l1"` (fixed), or a list of them to search.
        alpha_range, beta_range: (low, high) searched on a log scale (low > 0), or one number
            to fix the weight. `beta_range=None` searches `[d / 30, 10 d]` around the norm's
            measured default `d = faqd_tf.options.DEFAULT_BETA[fa_norm]`.
        gamma_range: (low, high) searched on a linear scale, or one number; ignored (gamma is
            fixed at 0) when `label_free`.
        temperatures: KL temperatures to choose from (one number fixes it); only tuned for
            kd="kl", kd="mse" fixes temperature at 1.
        label_free: the training batches carry no labels, so gamma is 0 (eq. 11 of the paper).
            With `label_free=False` the training batches must be (images, labels).
        tune_fa: add the Boolean `use_fa` (FA term on/off); False keeps FA on (when `fa` is set).
        recalibrate_images: unlabeled images; when given, every trial ends by re-estimating its
            student's BatchNormalization statistics on them (`faqd_tf.recalibrate_batchnorm`, as
            the config's `student.recalibrate_bn` does) and its objective is the validation
            accuracy after that, the student it would ship. The weights a trial saves are those of
            its best epoch, before the recalibration.
        metrics: compiled metrics of the Distiller; must yield the objective's `accuracy`.
        name, tunable: as for `keras_tuner.HyperModel`.

    The fixed options arrive as keywords (`FIXED`); from a config's `distill` section, use
    `FAQDHyperModel.from_config`. (`distiller_kwargs=`, a dict of them, is deprecated.)

    Hyperparameter names: `alpha`, `beta` (or `beta_fro2`, `beta_l1` under a Choice of norms),
    `gamma`, `temperature`, `use_fa` (when `tune_fa` and `fa` is set), `fa_norm`, and the Fixed
    `kd` and `fa_kind`. `beta` is sampled even when `use_fa` is off (it is then unused).
    """

    def __init__(
        self,
        teacher: keras.Model,
        student_fn: Callable[[], keras.Model],
        optimizer_fn: Callable[[], keras.optimizers.Optimizer] | None = None,
        *,
        kd: str = "mse",
        fa: str | None = "exact",
        fa_norm: str | list[str] = "fro2",
        ffa_k: int = 15,
        fa_method: str = "auto",
        student_layers: list[str] | None = None,
        teacher_layers: list[str] | None = None,
        seed: int | None = None,
        alpha_range: float | tuple[float, float] = (0.1, 2.0),
        beta_range: float | tuple[float, float] | None = None,
        gamma_range: float | tuple[float, float] = (0.0, 1.0),
        temperatures: float | Sequence[float] = (1, 2, 4, 8),
        label_free: bool = True,
        tune_fa: bool = True,
        recalibrate_images: np.ndarray | None = None,
        metrics: Sequence | None = ("accuracy",),
        name: str = "faqd",
        tunable: bool = True,
        **deprecated,
    ):
        super().__init__(name=name, tunable=tunable)
        fixed = {
            "kd": kd,
            "fa_norm": fa_norm,
            "ffa_k": ffa_k,
            "fa_method": fa_method,
            "student_layers": student_layers,
            "teacher_layers": teacher_layers,
            "seed": seed,
        }
        fixed.update(_deprecated_distiller_kwargs(deprecated))
        norms = fixed.pop("fa_norm")
        norms = [norms] if isinstance(norms, str) else list(norms)
        if not norms or len(set(norms)) != len(norms):
            raise ValueError(f"fa_norm={norms!r} must name one norm or a list of distinct norms.")
        self.seed = options.check_seed(fixed.pop("seed"))
        # The options every trial starts from, checked once; a trial replaces the searched ones.
        self.options = DistillOptions(fa=fa, fa_norm=norms[0], **fixed)
        self.fa_norms = [dataclasses.replace(self.options, fa_norm=norm).fa_norm for norm in norms]
        if not isinstance(teacher, keras.Model):
            raise ValueError(f"teacher must be a Keras model, got {teacher!r}.")
        if not callable(student_fn):
            raise ValueError(
                f"student_fn must be a zero-argument callable returning a fresh student, got {student_fn!r}."
            )
        if optimizer_fn is not None and not callable(optimizer_fn):
            raise ValueError(
                f"optimizer_fn must be a zero-argument callable, got {optimizer_fn!r}."
            )
        self.teacher = teacher
        self.student_fn = student_fn
        self.optimizer_fn = optimizer_fn or default_optimizer
        self.kd = self.options.kd
        self.fa = fa
        self.label_free = bool(label_free)
        self.tune_fa = bool(tune_fa) and fa is not None
        self.alpha_range = self._bounds("alpha", _range("alpha_range", alpha_range, log=True))
        self.beta_ranges = {
            norm: self._bounds(
                "beta",
                _range(
                    "beta_range",
                    (options.default_beta(norm) / 30, options.default_beta(norm) * 10)
                    if beta_range is None
                    else beta_range,
                    log=True,
                ),
            )
            for norm in self.fa_norms
        }
        self.gamma_range = (
            (0.0, 0.0)
            if self.label_free
            else self._bounds("gamma", _range("gamma_range", gamma_range, log=False))
        )
        self.temperatures = _choices("temperatures", temperatures) if self.kd == "kl" else [1.0]
        self._bounds("temperature", self.temperatures)
        self.metrics = list(metrics) if metrics is not None else None
        if recalibrate_images is not None:
            # Shape, dtype and values checked against the teacher's input before any trial trains.
            _images(recalibrate_images, teacher, None)
        self.recalibrate_images = recalibrate_images

    def _bounds(self, name, values):
        """`values` (the ends of a range, or choices), each checked as the option `name` allows."""
        for value in values:
            dataclasses.replace(self.options, **{name: value})
        return values

    @property
    def fixed_kwargs(self) -> dict:
        """The `Distiller` arguments that no hyperparameter sets (`fa_norm` may be searched)."""
        return {
            **{
                name: getattr(self.options, name)
                for name in FIXED
                if name not in ("fa_norm", "seed")
            },
            "seed": self.seed,
        }

    @classmethod
    def from_config(
        cls, teacher: keras.Model, distill: dict, student_fn, optimizer_fn=None, **kwargs
    ):
        """The search of a config's `distill` section (`faqd_tf.config`): its `FIXED` options kept,
        its FA kind used when a trial turns FA on (`"exact"` when the section has none); the weights
        and the temperature are searched (`kwargs`: the ranges, `label_free`, `tune_fa`, ...)."""
        fixed = {key: distill[key] for key in FIXED if key in distill}
        return cls(
            teacher, student_fn, optimizer_fn, fa=distill.get("fa") or "exact", **fixed, **kwargs
        )

    @staticmethod
    def _float(hp, name, bounds, log, default):
        low, high = bounds
        if low == high:
            return hp.Fixed(name, low)
        default = min(max(default, low), high)
        return hp.Float(name, low, high, sampling="log" if log else "linear", default=default)

    def declare_hyperparameters(self, hp):
        """Registers the search space in `hp` (keras-tuner calls it before the first build)."""
        hp.Fixed("kd", self.kd)
        hp.Fixed("fa_kind", self.fa or _NO_FA)
        self._float(hp, "alpha", self.alpha_range, True, DEFAULTS["alpha"])
        if len(self.fa_norms) == 1:
            hp.Fixed("fa_norm", self.fa_norms[0])
        else:
            hp.Choice("fa_norm", self.fa_norms, default=self.fa_norms[0])
        if self.fa is not None:
            for norm in self.fa_norms:
                if len(self.fa_norms) == 1:
                    self._float(
                        hp, "beta", self.beta_ranges[norm], True, options.default_beta(norm)
                    )
                else:
                    with hp.conditional_scope("fa_norm", [norm]):
                        self._float(
                            hp,
                            f"beta_{norm}",
                            self.beta_ranges[norm],
                            True,
                            options.default_beta(norm),
                        )
            if self.tune_fa:
                hp.Boolean("use_fa", default=True)
        self._float(hp, "gamma", self.gamma_range, False, 0.3)
        if len(self.temperatures) == 1:
            hp.Fixed("temperature", self.temperatures[0])
        else:
            default = min(self.temperatures, key=lambda t: abs(t - 4.0))  # the paper uses T = 3..5
            hp.Choice("temperature", self.temperatures, default=default)

    def trial_options(self, hp_values: dict) -> DistillOptions:
        """The loss options of a trial: the fixed ones with its hyperparameter values."""
        return dataclasses.replace(self.options, **best_distill_config(hp_values, fa=self.fa))

    def distiller_kwargs(self, hp_values: dict) -> dict:
        """All `Distiller` keyword arguments (but student and teacher) of the hp values."""
        return {**dataclasses.asdict(self.trial_options(hp_values)), "seed": self.seed}

    def build(self, hp):
        """A fresh student distilled from the teacher: a `Distiller` compiled with `metrics`."""
        self.declare_hyperparameters(hp)
        student = self.student_fn()
        # Built when made (keras-tuner saves, and Hyperband reloads, each trial's weights).
        distiller = Distiller(student, self.teacher, self.trial_options(hp.values), seed=self.seed)
        optimizer = self.optimizer_fn()
        if optimizer.weight_decay:
            # Trials train as the CLI's distillation does: the alphas get the authors' own decay.
            set_alpha_decay(student, optimizer, float(optimizer.weight_decay))
        distiller.compile(optimizer=optimizer, metrics=self.metrics)
        return distiller

    def fit(self, hp, model, *args, **kwargs):
        """`model.fit`; with `recalibrate_images`, then the recalibration and the validation
        metrics after it (`val_<name>`), which keras-tuner takes as the trial's result."""
        validation = kwargs.get("validation_data")
        if self.recalibrate_images is not None and validation is None:
            raise ValueError(
                "recalibrate_images needs validation_data: the objective is scored after the recalibration."
            )
        history = model.fit(*args, **kwargs)
        if self.recalibrate_images is None:
            return history
        recalibrate_batchnorm(model.student, self.recalibrate_images)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(validation)
        logs = model.evaluate(
            x,
            y,
            sample_weight=sample_weight,
            batch_size=kwargs.get("batch_size"),
            verbose=0,
            return_dict=True,
        )
        return {f"val_{name}": float(value) for name, value in logs.items()}


def _deprecated_distiller_kwargs(deprecated):
    """The fixed options of the deprecated `distiller_kwargs=` dict, checked."""
    deprecated = dict(deprecated)
    extra = dict(deprecated.pop("distiller_kwargs", None) or {})
    if deprecated:
        raise TypeError(
            f"FAQDHyperModel got unexpected keyword arguments {', '.join(sorted(deprecated))}."
        )
    if extra:
        warnings.warn(
            "FAQDHyperModel: distiller_kwargs is deprecated; pass the fixed options as keywords "
            "(or use FAQDHyperModel.from_config with a config's distill section).",
            DeprecationWarning,
            stacklevel=3,
        )
    tuned = sorted(set(extra) & set(TUNED))
    if tuned:
        raise ValueError(
            f"distiller_kwargs sets {tuned}, which the search tunes; give their ranges "
            "(alpha_range, beta_range, gamma_range, temperatures) and the FA kind as fa=... instead."
        )
    unknown = sorted(set(extra) - set(FIXED))
    if unknown:
        raise ValueError(f"distiller_kwargs has unknown keys {unknown}; allowed: {sorted(FIXED)}.")
    return extra


def best_distill_config(
    hp_values: dict | keras_tuner.HyperParameters, fa: str | None = "exact"
) -> dict:
    """The `Distiller` loss arguments of a trial's hyperparameter values, JSON-serializable.

    Returns a dict with `alpha`, `beta`, `gamma`, `temperature` (floats), `fa` ("exact",
    "fast" or None) and `fa_norm`. `fa` is read from the `fa_kind` value when present, else the
    argument `fa`; `use_fa=False` gives fa None and beta 0. `beta` is `beta_<fa_norm>` when the
    norm was searched. Missing weights take the Distiller's defaults (beta: the norm's measured
    default), and other keys (e.g. Hyperband's "tuner/...") are ignored.
    """
    if isinstance(hp_values, keras_tuner.HyperParameters):
        hp_values = hp_values.values
    values = dict(hp_values)
    kind = values.get("fa_kind", fa if fa is not None else _NO_FA)
    if kind not in ("exact", "fast", _NO_FA):
        raise ValueError(f"fa_kind={kind!r} is not supported; use 'exact', 'fast' or {_NO_FA!r}.")
    fa = None if kind == _NO_FA or not values.get("use_fa", True) else kind
    config = {name: float(values.get(name, default)) for name, default in DEFAULTS.items()}
    norm = options.check_fa_norm(values.get("fa_norm", "fro2"))
    config["beta"] = (
        0.0
        if fa is None
        else float(values.get(f"beta_{norm}", values.get("beta", options.default_beta(norm))))
    )
    config["fa"] = fa
    config["fa_norm"] = norm
    return {key: config[key] for key in ("alpha", "beta", "gamma", "temperature", "fa", "fa_norm")}


def _labels_missing(validation_data):
    """True when `validation_data` surely carries no labels (images alone)."""
    if isinstance(validation_data, tf.data.Dataset):
        spec = validation_data.element_spec
        return not (isinstance(spec, (tuple, list)) and len(spec) >= 2)
    if isinstance(validation_data, (tuple, list)):
        return len(validation_data) < 2
    return hasattr(validation_data, "shape")  # an array or tensor of images


def make_tuner(
    hypermodel: FAQDHyperModel,
    tuner: str | type = "random",
    max_trials: int = 10,
    epochs: int = 1,
    directory: str | None = None,
    project_name: str = "faqd_tuning",
    overwrite: bool = False,
    seed: int | None = None,
    **tuner_kwargs,
) -> keras_tuner.Tuner:
    """A keras-tuner tuner of `hypermodel` on `val_accuracy` (max).

    `tuner` is "random", "bayesian", "hyperband" or a `keras_tuner.Tuner` subclass. Hyperband
    takes no `max_trials`: its `max_epochs` is `tuner_kwargs["max_epochs"]`, else `epochs`.
    `directory=None` writes the trials under a fresh temporary directory.
    """
    if directory is None:
        directory = tempfile.mkdtemp(prefix="faqd_tuning_")
    common = dict(
        objective=objective(),
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        seed=seed,
        **tuner_kwargs,
    )
    kind = tuner.strip().lower() if isinstance(tuner, str) else tuner
    if isinstance(kind, str) and kind in TUNERS:
        kind = dict(
            zip(
                TUNERS,
                (keras_tuner.RandomSearch, keras_tuner.BayesianOptimization, keras_tuner.Hyperband),
            )
        )[kind]
    if not (isinstance(kind, type) and issubclass(kind, keras_tuner.Tuner)):
        raise ValueError(
            f"tuner={tuner!r} is not supported; use one of {TUNERS} or a keras_tuner.Tuner subclass."
        )
    if issubclass(kind, keras_tuner.Hyperband):
        common.setdefault("max_epochs", epochs)
    else:
        common["max_trials"] = max_trials
    return kind(hypermodel, **common)


def search(
    hypermodel: FAQDHyperModel,
    train_data: tf.data.Dataset | np.ndarray,
    validation_data: tf.data.Dataset | tuple,
    tuner: str | type = "random",
    max_trials: int = 10,
    epochs: int = 1,
    directory: str | None = None,
    project_name: str = "faqd_tuning",
    overwrite: bool = False,
    seed: int | None = None,
    callbacks: list | None = None,
    verbose: int | str = 0,
    batch_size: int | None = None,
    **tuner_kwargs,
) -> tuple[dict, keras_tuner.Tuner]:
    """Runs a search and returns `(best_hp_values, tuner)`.

    Args:
        hypermodel: a `FAQDHyperModel`.
        train_data: the training input of `fit`: images alone (label-free) or (images, labels),
            as a `tf.data.Dataset` or an array (then give `batch_size`).
        validation_data: labeled validation data, `(images, labels)` or a dataset of such
            batches; the objective `val_accuracy` needs the labels.
        tuner: "random", "bayesian" (needs scikit-learn), "hyperband", or a `keras_tuner.Tuner`
            subclass.
        max_trials: trials of RandomSearch / BayesianOptimization (Hyperband sets its own).
        epochs: training epochs of a trial (Hyperband's `max_epochs` unless given).
        directory, project_name, overwrite, seed, **tuner_kwargs: passed to the tuner.
        callbacks, verbose, batch_size: passed to each trial's `fit`.

    Returns:
        The best trial's hyperparameter values as a dict (without Hyperband's "tuner/..."
        bookkeeping; `best_distill_config` turns it into Distiller arguments), and the tuner
        (`tuner.oracle.get_best_trials()`, `tuner.results_summary()`, ...).
    """
    if validation_data is None or _labels_missing(validation_data):
        raise ValueError(
            "validation_data must carry labels, (images, labels) or a dataset of such batches: "
            f"the tuning objective is {OBJECTIVE!r}, the student's accuracy on labeled data."
        )
    tuner = make_tuner(
        hypermodel,
        tuner=tuner,
        max_trials=max_trials,
        epochs=epochs,
        directory=directory,
        project_name=project_name,
        overwrite=overwrite,
        seed=seed,
        **tuner_kwargs,
    )
    fit_kwargs = dict(epochs=epochs, validation_data=validation_data, verbose=verbose)
    if callbacks:
        fit_kwargs["callbacks"] = list(callbacks)
    if batch_size is not None:
        fit_kwargs["batch_size"] = batch_size
    tuner.search(train_data, **fit_kwargs)
    trials = list(tuner.oracle.trials.values())
    if not any(trial.status == "COMPLETED" for trial in trials):
        message = next((trial.message for trial in trials if getattr(trial, "message", None)), "")
        raise RuntimeError(
            f"The search under {tuner.project_dir!r} completed none of its {len(trials)} trial(s)."
            + (f" The first failure:\n{message}" if message else "")
        )
    best = tuner.get_best_hyperparameters(1)
    values = {k: v for k, v in best[0].values.items() if not k.startswith("tuner/")}
    return values, tuner
