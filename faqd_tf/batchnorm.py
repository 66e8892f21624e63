"""`recalibrate_batchnorm`: re-estimate BatchNormalization statistics on unlabeled images.

Quantizing a network's weights without training (round-to-nearest) shifts the mean and variance of
every pre-activation, while each BatchNormalization layer still normalizes with the statistics of
the full-precision network. Re-estimating those moving statistics on a few unlabeled images is the
cheapest label-free repair (no gradient step, no labels).

The statistics are exact, not running averages: each layer's moving mean and variance become the
mean and (biased) variance, per channel, of the inputs that layer receives **in inference mode**
over all the given images, with every BatchNormalization before it already recalibrated. That is
the fixed point a trained network's moving averages aim at, accumulated in float64.

Functional and Sequential models (nested ones too) take one pass: the graph runs operation by
operation over all the image batches, so each BatchNormalization sees every batch of its input
before it normalizes any (its statistics set, it passes them on), and a tensor is dropped once its
last consumer has run; the cost is one forward pass over the images. Other models (subclassed, or
a BatchNormalization inside a custom block layer) take one pass per layer, each stopping at its
layer (cost ~ depth^2).

>>> import numpy as np, keras
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn")])
>>> x = np.array([[1.0, 2.0, 0.0], [3.0, 6.0, 0.0]], "float32")
>>> recalibrate_batchnorm(model, x)
['bn']
>>> model.get_layer("bn").moving_mean.numpy().tolist(), model.get_layer("bn").moving_variance.numpy().tolist()
([2.0, 4.0, 0.0], [1.0, 4.0, 0.0])
"""

import contextlib
import inspect
import warnings

import keras
import numpy as np
import tensorflow as tf

from faqd_tf.fields import is_integer

__all__ = ["recalibrate_batchnorm"]


class _Stop(Exception):
    """Ends a forward pass once the layer being recalibrated has seen its input."""


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged across batches in float64
    (Chan et al.'s pairwise update, which does not cancel the way E[x^2] - E[x]^2 does)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x, axis):
        x = tf.cast(x, tf.float64)
        axis %= x.shape.rank
        axes = [i for i in range(x.shape.rank) if i != axis]
        n = int(np.prod([x.shape[i] for i in axes]))
        if n == 0:
            return
        mean = tf.reduce_mean(x, axis=axes, keepdims=True)
        m2 = tf.reduce_sum(tf.square(x - mean), axis=axes).numpy()
        mean = tf.reshape(mean, [-1]).numpy()
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self):
        return self.m2 / self.count


def _batchnorm_layers(model):
    # Keras has no public recursive layer walk; `_flatten_layers` also reaches a BatchNormalization
    # held inside a custom (non-Model) block layer, which `Model.layers` would miss.
    layers = model._flatten_layers(include_self=False, recursive=True)
    return [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]


def _images(images, model, samples):
    """Up to `samples` float32 images as a list of batches (the data is read several times)."""
    # A subclassed model has no `inputs`: its first batch sets the shape the others must have.
    known = getattr(model, "inputs", None)
    if known is not None and len(known) != 1:
        raise ValueError(
            f"recalibrate_batchnorm needs a model with one input; {model.name!r} has {len(known)}."
        )
    shape = tuple(known[0].shape[1:]) if known else None
    if isinstance(images, tf.data.Dataset):
        if images.cardinality() == tf.data.INFINITE_CARDINALITY and samples is None:
            raise ValueError(
                "images is an infinite (repeated) dataset; pass samples=N to take N images."
            )
        images = images.as_numpy_iterator()
    batches = [images] if hasattr(images, "shape") and hasattr(images, "dtype") else images
    out, count = [], 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]  # (images, labels): the labels are not used
        batch = np.asarray(batch)
        shape = batch.shape[1:] if shape is None else shape
        fits = batch.ndim == len(shape) + 1 and all(
            d is None or d == b for d, b in zip(shape, batch.shape[1:])
        )
        if not fits or not np.issubdtype(batch.dtype, np.number):
            raise ValueError(
                f"images have shape {batch.shape[1:]} and dtype {batch.dtype}, but {model.name!r} takes "
                f"{tuple(shape)} numbers; pass a batch of its inputs, e.g. x_train[:1000] (labels not needed)."
            )
        if samples is not None:
            batch = batch[: samples - count]
        batch = batch.astype(np.float32)
        if not np.all(np.isfinite(batch)):
            raise ValueError(
                "images contain NaN or infinite values; recalibrating on them would poison every layer."
            )
        if len(batch):
            out.append(batch)
            count += len(batch)
        if samples is not None and count >= samples:
            break
    if not count:
        raise ValueError(
            "images hold no image; pass unlabeled inputs of the model, e.g. x_train[:1000]."
        )
    return out


@contextlib.contextmanager
def _patched(layer, call):
    """Replaces `layer.call` for a while. Keras layers have no forward hooks; an instance attribute
    shadows the method, and deleting it restores the class's."""
    layer.call = call
    try:
        yield
    finally:
        del layer.call


def _call_order(model, layers, probe):
    """The BatchNormalization layers in the order one forward pass calls them."""
    order = []
    with contextlib.ExitStack() as stack:
        for layer in layers:

            def record(*args, _layer=layer, _call=layer.call, **kwargs):
                order.append(_layer)
                return _call(*args, **kwargs)

            stack.enter_context(_patched(layer, record))
        model(probe, training=False)
    repeated = sorted({layer.name for layer in order if order.count(layer) > 1})
    if repeated:
        raise ValueError(
            f"BatchNormalization layers {repeated} are called more than once per forward pass; their "
            "statistics would mix several inputs, which recalibrate_batchnorm does not do."
        )
    return order


def _input_moments(model, layer, batches, batch_size):
    moments, problems = _Moments(), []

    def stop(inputs, *args, mask=None, **kwargs):
        # A problem is raised after the forward pass: Keras would add its call context to an
        # exception raised in here, over several lines.
        if mask is not None:
            problems.append(
                f"{layer.name!r} received a mask; recalibrate_batchnorm does not weigh masked inputs."
            )
        elif not tf.executing_eagerly():
            problems.append(
                f"{model.name!r} calls {layer.name!r} inside a tf.function; recalibrate_batchnorm "
                "needs the model's plain (eager) call."
            )
        else:
            moments.add(inputs, layer.axis)
        raise _Stop()

    with _patched(layer, stop):
        for batch in batches:
            for start in range(0, len(batch), batch_size):
                try:
                    model(batch[start : start + batch_size], training=False)
                except _Stop:
                    pass
                if problems:
                    raise ValueError(problems[0])
    return moments


def recalibrate_batchnorm(
    model: keras.Model, images, batch_size: int = 256, samples: int | None = None
) -> list:
    """Sets every BatchNormalization layer's moving statistics to those of its inputs on `images`.

    Label-free: only images are read. Works on any built single-input Keras model (Functional,
    Sequential, subclassed, nested; BatchNormalization inside custom block layers too), e.g.
    `quantize_model(teacher, weight_bits=4)` straight after quantization. The model is changed in
    place; nothing else than the moving mean and variance (and a renorm layer's moving stddev) is
    touched.

    Args:
        model: the model whose BatchNormalization layers to recalibrate.
        images: unlabeled inputs of the model: an array `(N, *input_shape)`, a `tf.data.Dataset`
            or an iterable of batches (`x` or `(x, ...)`; anything after `x` is ignored). They
            are held in memory; so are, in the one-pass run, the tensors of every batch that are
            waiting for a consumer (a block's input and its branches).
        batch_size: images per forward pass of an operation.
        samples: use only the first `samples` images; default all.

    Returns:
        The names of the recalibrated layers, in an order the model can call them; [] (with a
        warning) for a model without BatchNormalization.

    After the call, layer `l` with channel axis `a` holds `moving_mean = mean(u)` and
    `moving_variance = mean((u - mean(u))^2)` over every axis but `a`, where `u` are its
    inputs when the model runs `model(images, training=False)`.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"recalibrate_batchnorm needs a Keras model, got {type(model).__name__}.")
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if samples is not None and (not is_integer(samples) or samples < 1):
        raise ValueError(f"samples={samples!r} must be a positive integer or None (all images).")
    layers = _batchnorm_layers(model)
    if not layers:
        warnings.warn(
            f"recalibrate_batchnorm: {model.name!r} has no BatchNormalization layer; nothing to do.",
            stacklevel=2,
        )
        return []
    batches = _images(images, model, samples)
    if _runs_as_graph(model, layers):
        order = _recalibrate_in_one_pass(model, batches, batch_size)
    else:
        order = _recalibrate_per_layer(model, layers, batches, batch_size)
    unused = sorted(layer.name for layer in layers if layer not in order)
    if unused:
        warnings.warn(
            f"recalibrate_batchnorm: these BatchNormalization layers are never called: {unused}.",
            stacklevel=2,
        )
    return [layer.name for layer in order]


def _assign(layer, moments):
    layer.moving_mean.assign(moments.mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(moments.variance.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):
        layer.moving_stddev.assign(np.sqrt(moments.variance).astype(layer.moving_stddev.dtype))


def _recalibrate_per_layer(model, layers, batches, batch_size):
    """One pass per layer, each stopping at its layer: any model, at ~ depth^2 cost."""
    order = _call_order(model, layers, batches[0][:1])
    for layer in order:
        _assign(layer, _input_moments(model, layer, batches, batch_size))
    return order


def _is_graph(model):
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model)
        and hasattr(model, "_nodes_by_depth")
        and bool(getattr(model, "inputs", None))
    )


def _graph_batchnorms(model, found):
    """Collects the BatchNormalization layers that `model`'s graph calls itself or through nested
    graph models; False where a nested model has several inputs or outputs."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif _is_graph(layer) and _batchnorm_layers(layer):
            if (
                len(layer.inputs) != 1
                or len(layer.outputs) != 1
                or not _graph_batchnorms(layer, found)
            ):
                return False
    return True


def _runs_as_graph(model, layers):
    found = []
    if not _is_graph(model) or len(model.inputs) != 1 or not _graph_batchnorms(model, found):
        return False
    # Every BatchNormalization must be a node of a graph: one inside a custom block layer is not.
    return {id(layer) for layer in layers} <= {id(layer) for layer in found}


def _takes_training(layer):
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _call(operation, args, kwargs):
    # Layers run in inference mode, as in `model(x, training=False)` (Dropout off, BN on its statistics).
    if isinstance(operation, keras.layers.Layer) and "training" not in kwargs:
        if _takes_training(operation):
            kwargs = {**kwargs, "training": False}
    return operation(*args, **kwargs)


def _normalize_all(model, layer, inputs, order, kwargs=None):
    """Sets `layer`'s statistics from its inputs of every batch, then normalizes each batch."""
    if layer in order:
        raise ValueError(
            f"BatchNormalization layers {[layer.name]} are called more than once per forward pass; their "
            "statistics would mix several inputs, which recalibrate_batchnorm does not do."
        )
    if (kwargs or {}).get("mask") is not None or any(
        getattr(x, "_keras_mask", None) is not None for x in inputs
    ):
        raise ValueError(
            f"{layer.name!r} received a mask; recalibrate_batchnorm does not weigh masked inputs."
        )
    moments = _Moments()
    for x in inputs:
        moments.add(x, layer.axis)
    _assign(layer, moments)
    order.append(layer)
    return [layer(x, training=False) for x in inputs]


def _run_graph(model, inputs, order):
    """`model` on each batch of `inputs` (one tensor per batch), operation by operation."""
    if isinstance(model, keras.Sequential):
        values = inputs
        for layer in model.layers:
            values = _run_operation(layer, [[v] for v in values], [{} for _ in values], order)
        return values
    (symbolic,) = model.inputs
    values = {id(symbolic): inputs}
    uses = {}
    for nodes in model._nodes_by_depth.values():
        for node in nodes:
            for tensor in node.input_tensors:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            per_batch_args = []
            for i in range(len(inputs)):
                args, kwargs = node.arguments.fill_in(
                    {id(t): values[id(t)][i] for t in node.input_tensors}
                )
                per_batch_args.append((args, kwargs))
            outputs = _run_operation(
                node.operation,
                [a for a, _ in per_batch_args],
                [k for _, k in per_batch_args],
                order,
            )
            for tensor in node.input_tensors:
                uses[id(tensor)] -= 1
                if not uses[id(tensor)]:
                    del values[id(tensor)]  # its last consumer has run
            flat = [keras.tree.flatten(out) for out in outputs]
            for j, tensor in enumerate(node.outputs):
                values[id(tensor)] = [out[j] for out in flat]
    return [
        keras.tree.pack_sequence_as(
            model._outputs_struct, [values[id(t)][i] for t in model.outputs]
        )
        for i in range(len(inputs))
    ]


def _run_operation(operation, args, kwargs, order):
    if isinstance(operation, keras.layers.BatchNormalization):
        return _normalize_all(operation, operation, [a[0] for a in args], order, kwargs[0])
    if _is_graph(operation) and _batchnorm_layers(operation):
        return _run_graph(operation, [a[0] for a in args], order)
    return [_call(operation, a, k) for a, k in zip(args, kwargs)]


def _recalibrate_in_one_pass(model, batches, batch_size):
    inputs = [
        tf.convert_to_tensor(batch[start : start + batch_size])
        for batch in batches
        for start in range(0, len(batch), batch_size)
    ]
    order = []
    _run_graph(model, inputs, order)
    return order
