"""`quantize_model`: clone a Keras model into its quantized twin.

Conv1D/2D/3D -> QuantConv1D/2D/3D, DepthwiseConv2D -> QuantDepthwiseConv2D, SeparableConv2D ->
QuantSeparableConv2D, Conv2DTranspose -> QuantConv2DTranspose, Dense -> QuantDense, inside nested
models too; with `activation_bits`, every ReLU (a `ReLU` layer, an `Activation("relu")` layer, a
fused `activation="relu"`, or a `QuantReLU`) becomes a `QuantReLU`. Layer names are kept, so
feature taps and weight copies by name still resolve; the weights are copied (fine-tune
quantization). The classifier (the kernel layer that produces the logits: a Dense, or a 1x1
convolution head as in MobileNet) stays in full precision by default; the kernel layers left in
full precision, and why, are logged (logger ``faqd_tf.quantize``, level INFO) and listed by
`faqd_tf.summary`.

>>> from faqd_tf.models import resnet_cifar
>>> student = quantize_model(resnet_cifar(20), weight_bits=2)
>>> student.get_layer("stem_conv").weight_bits, student.get_layer("logits").weight_bits
(2, None)
"""

import logging
import re
import warnings

import keras

from faqd_tf import quantizers
from faqd_tf.layers import (
    QuantConv1D,
    QuantConv2D,
    QuantConv2DTranspose,
    QuantConv3D,
    QuantDense,
    QuantDepthwiseConv2D,
    QuantizedKernelMixin,
    QuantReLU,
    QuantSeparableConv2D,
)

logger = logging.getLogger(__name__)

# No base here subclasses another, and a Quant* layer is an instance of its base, so a quantized
# model can be re-quantized.
_KERNEL_LAYERS = (
    (keras.layers.DepthwiseConv2D, QuantDepthwiseConv2D),
    (keras.layers.SeparableConv2D, QuantSeparableConv2D),
    (keras.layers.Conv2DTranspose, QuantConv2DTranspose),
    (keras.layers.Conv1D, QuantConv1D),
    (keras.layers.Conv2D, QuantConv2D),
    (keras.layers.Conv3D, QuantConv3D),
    (keras.layers.Dense, QuantDense),
)

CLASSIFIER = "classifier head"
NO_COUNTERPART = "no quantized counterpart"


def _is_relu_activation(fn):
    return fn is keras.activations.relu or getattr(fn, "__name__", None) == "relu"


def _is_relu_layer(layer):
    if isinstance(layer, QuantReLU):
        return True
    if isinstance(layer, keras.layers.ReLU):
        # ReLU6 (MobileNet) maps too: the quantized ReLU clips at (2^b - 1) * alpha anyway.
        return not layer.negative_slope and not layer.threshold
    return isinstance(layer, keras.layers.Activation) and _is_relu_activation(layer.activation)


def _quant_class(layer):
    for base, quant in _KERNEL_LAYERS:
        if isinstance(layer, base):
            return quant
    return None


def _has_kernel(layer):
    return any("kernel" in w.path.rsplit("/", 1)[-1] for w in getattr(layer, "weights", ()))


def _is_nested(layer):
    return isinstance(layer, keras.Model) and bool(getattr(layer, "inputs", None))


def _walk(model, prefix=""):
    """`(path, layer)` of every layer, nested Functional/Sequential models walked (``outer/inner``)."""
    for layer in model.layers:
        path = prefix + layer.name
        if _is_nested(layer):
            yield from _walk(layer, path + "/")
        else:
            yield path, layer


def _kernel_layers(model):
    return [(path, layer) for path, layer in _walk(model) if _quant_class(layer) is not None]


def _producer(tensor):
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return None, None
    operation, node_index, _ = history
    nodes = getattr(operation, "_inbound_nodes", None) or []
    return operation, (nodes[node_index] if node_index < len(nodes) else None)


def classifier_layer(model, prefix: str = "") -> str | None:
    """The path of the layer that computes `model`'s logits: the last layer with a kernel on the
    way back from the output through single-input layers (Reshape, Activation, Flatten, pooling,
    ...), or None when the output comes from elsewhere (a sum of branches, a layer without kernel).

    >>> m = keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3), classes=4, alpha=0.25)
    >>> classifier_layer(m)
    'conv_preds'
    """
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1:
        return None
    tensor, seen = outputs[0], set()
    while id(tensor) not in seen:
        seen.add(id(tensor))
        operation, node = _producer(tensor)
        if operation is None or node is None or isinstance(operation, keras.layers.InputLayer):
            return None
        if _is_nested(operation):
            return classifier_layer(operation, f"{prefix}{operation.name}/")
        if _has_kernel(operation):
            return prefix + operation.name
        inputs = node.input_tensors
        if len(inputs) != 1:
            return None
        tensor = inputs[0]
    return None


def _reaches_kernel(tensor, memo):
    """Whether a layer with weights (or a nested model) computes part of `tensor`."""
    operation, node = _producer(tensor)
    if operation is None or node is None or isinstance(operation, keras.layers.InputLayer):
        return False
    if id(operation) not in memo:
        memo[id(operation)] = (
            _has_kernel(operation)
            or _is_nested(operation)
            or any(_reaches_kernel(t, memo) for t in node.input_tensors)
        )
    return memo[id(operation)]


def first_layers(model, prefix: str = "") -> list:
    """Paths of the kernel layers that see `model`'s inputs with no weighted layer before them.

    >>> from faqd_tf.models import resnet_cifar
    >>> first_layers(resnet_cifar(8))
    ['stem_conv']
    """
    memo, found = {}, []
    for layer in model.layers:
        if _quant_class(layer) is None and not _is_nested(layer):
            continue
        nodes = getattr(layer, "_inbound_nodes", None) or []
        if not nodes or any(_reaches_kernel(t, memo) for node in nodes for t in node.input_tensors):
            continue
        if _is_nested(layer):
            found += first_layers(layer, f"{prefix}{layer.name}/")
        else:
            found.append(prefix + layer.name)
    return found


def _path_names(path):
    return (path, path.rsplit("/", 1)[-1])


def _resolve(model, weight_bits, layer_bits, skip, first_layer_bits="auto"):
    """Widths by kernel-layer path and, for the full-precision ones, the reason."""
    weight_bits = quantizers.check_bits(weight_bits, "weight_bits", allow_none=True)
    first_bits = quantizers.first_layer_width(weight_bits, first_layer_bits)
    firsts = set(first_layers(model)) if first_bits != weight_bits else set()
    kernel_paths = [path for path, _ in _kernel_layers(model)]
    names = {n for path, _ in _walk(model) for n in _path_names(path)}
    explicit_skip = skip is not None
    if skip is None:
        head = classifier_layer(model)
        skip = {head} if head is not None else set()
    elif isinstance(skip, str) or not all(isinstance(n, str) for n in skip):
        raise ValueError(f"skip must be a list of layer names, got {skip!r}.")
    skip = set(skip)
    unknown = sorted(skip - names)
    if unknown:
        raise ValueError(f"skip names layers the model does not have: {unknown}.")
    if layer_bits is None:
        layer_bits = {}
    if not isinstance(layer_bits, dict):
        raise ValueError(
            f"layer_bits must be a dict of layer name (or regex) -> bits, got {layer_bits!r}."
        )
    matches = {}
    for pattern, bits in layer_bits.items():
        quantizers.check_bits(bits, f"layer_bits[{pattern!r}]", allow_none=True)
        if not isinstance(pattern, str):
            raise ValueError(
                f"layer_bits keys are layer names or regular expressions, got {pattern!r}."
            )
        exact = [p for p in kernel_paths if pattern in _path_names(p)]
        if exact:
            matches[pattern] = exact
            continue
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(
                f"layer_bits key {pattern!r} is neither a layer name nor a regular expression ({err})."
            ) from None
        matches[pattern] = [
            p for p in kernel_paths if any(regex.fullmatch(n) for n in _path_names(p))
        ]
        if not matches[pattern]:
            raise ValueError(
                f"layer_bits key {pattern!r} matches no layer with a kernel; such layers are: "
                f"{', '.join(kernel_paths[:8])}{', ...' if len(kernel_paths) > 8 else ''}."
            )
    widths, reasons = {}, {}
    for path in kernel_paths:
        hits = [p for p, ps in matches.items() if path in ps]
        skipped = any(n in skip for n in _path_names(path))
        if not hits:
            widths[path] = None if skipped else (first_bits if path in firsts else weight_bits)
            if skipped:
                reasons[path] = "skip" if explicit_skip else CLASSIFIER
            elif weight_bits is None:
                reasons[path] = "weight_bits=None"
            elif widths[path] is None:
                reasons[path] = "first_layer_bits=None"
            continue
        if explicit_skip and skipped:
            raise ValueError(
                f"layer {path!r} is both in skip and in layer_bits ({hits[0]!r}); name it in one."
            )
        # Exact names first, then the expression that matches the fewest layers.
        exact = lambda p: p in _path_names(path)  # noqa: E731
        ranked = sorted(hits, key=lambda p: (not exact(p), len(matches[p])))
        if (
            len(ranked) > 1
            and not exact(ranked[0])
            and len(matches[ranked[0]]) == len(matches[ranked[1]])
        ):
            raise ValueError(
                f"layer {path!r} matches layer_bits keys {ranked[0]!r} and {ranked[1]!r} equally; make one "
                "more specific."
            )
        widths[path] = layer_bits[ranked[0]]
        if widths[path] is None:
            reasons[path] = f"layer_bits[{ranked[0]!r}]"
    return widths, reasons, skip


def resolve_layer_bits(
    model, weight_bits=4, layer_bits=None, skip=None, first_layer_bits="auto"
) -> dict:
    """The weight width of each layer of `model` that `quantize_model` quantizes, by name.

    A layer gets the most specific entry of `layer_bits` that matches it (an exact name before a
    regular expression matching its whole name, and among expressions the one matching the fewest
    layers), else None when `skip` names it (by default the classifier: see `classifier_layer`),
    else the first layers' width (`quantizers.first_layer_width`) for a layer that sees the input first
    (`first_layers`), else `weight_bits`. Widths are 1, 2, 4, 8, or None for full precision. A layer of a nested
    model is keyed ``outer/inner``; names and expressions match its path or its own name.

    >>> from faqd_tf.models import resnet_cifar
    >>> widths = resolve_layer_bits(resnet_cifar(8), 1, {"stem_conv": 8})
    >>> widths["stem_conv"], widths["s1b1_conv1"], widths["logits"]
    (8, 1, None)
    """
    return _resolve(model, weight_bits, layer_bits, skip, first_layer_bits)[0]


def float_kernel_layers(model) -> dict:
    """``{path: reason}`` for each layer of `model` that has a kernel stored in full precision.

    The reason is the one `quantize_model` gave (``"classifier head"``, ``"skip"``,
    ``"layer_bits[...]"``, ``"no quantized counterpart"``) where the model is its twin in this
    process; otherwise it is inferred: the classifier, no quantized counterpart, or ``"weight_bits=None"``.

    >>> from faqd_tf.models import resnet_cifar
    >>> float_kernel_layers(quantize_model(resnet_cifar(8), weight_bits=2))
    {'logits': 'classifier head'}
    """
    known = getattr(model, "_faqd_float_kernels", None)
    if known is not None:
        return dict(known)
    head = classifier_layer(model)
    reasons = {}
    for path, layer in _walk(model):
        if isinstance(layer, QuantizedKernelMixin):
            if layer.precision is None:
                reasons[path] = CLASSIFIER if path == head else "weight_bits=None"
        elif _has_kernel(layer):
            reasons[path] = (
                NO_COUNTERPART
                if _quant_class(layer) is None
                else (CLASSIFIER if path == head else "not quantized")
            )
    return reasons


def _as_functional(model):
    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    return model


def quantize_model(
    model,
    weight_bits=4,
    activation_bits=None,
    per_channel=False,
    skip=None,
    relax=None,
    copy_weights=True,
    alpha_rate=quantizers.DEFAULT_ALPHA_RATE,
    layer_bits=None,
    first_layer_bits="auto",
    activation_ste="clipped",
):
    """Returns the quantized twin of a Sequential or Functional Keras model.

    Args:
        model: a built Keras model (e.g. a trained FP teacher, or `keras.applications.ResNet50(weights=None)`).
        weight_bits: 1, 2, 4, 8, or None to keep kernels in full precision.
        activation_bits: 1, 2, 4, 8, or None to keep ReLUs in full precision.
        per_channel: one weight scale per output channel.
        skip: names of layers left in full precision; default: the classifier, the kernel layer
            that produces the logits (`classifier_layer`): the paper quantizes every convolution
            and keeps the classifier in full precision. ``skip=[]`` quantizes it too.
        relax: None, or the initial BinaryRelax lambda of the quantized layers.
        copy_weights: start from the model's weights (fine-tuning); False keeps fresh
            initial weights (end-to-end quantization).
        alpha_rate: the alpha update of every `QuantReLU` (see `QuantReLU`); None: raw eq. (5).
        layer_bits: per-layer weight widths, ``{"layer name or regex": bits or None}``, over
            `weight_bits` and `skip` (see `resolve_layer_bits`), e.g. ``{"stem_conv": 8}``.
        first_layer_bits: the width of the layers that see the input first (`first_layers`: a
            1-channel image's first conv has 9 weights a filter). ``"auto"``: 8 bits in a 1-bit
            model (measured on Fashion-MNIST: +1.2 points at 1-bit weights, +1.9 at 1W1A, for
            0.2% more bits), else `weight_bits`; 1, 2, 4, 8 or None to choose. The authors'
            code binarizes every convolution: ``first_layer_bits=1`` does too. `layer_bits` wins.
        activation_ste: the input gradient of every `QuantReLU`: ``"clipped"`` (eq. 5) or
            ``"two_sided"`` (see `QuantReLU`).

    Nested Functional and Sequential models (ConvNeXt's stem) are quantized too. The twin is
    trainable even when `model` was frozen (as a Distiller's teacher is). The kernel layers left
    in full precision are logged with their reason (`float_kernel_layers`); those with no
    quantized counterpart (e.g. SeparableConv1D, EinsumDense) are also listed in a warning, as is
    a model in which nothing is quantized despite `weight_bits`, or in which `activation_bits`
    finds no ReLU.
    """
    weight_bits = quantizers.check_bits(weight_bits, "weight_bits", allow_none=True)
    activation_bits = quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
    alpha_rate = quantizers.check_alpha_rate(alpha_rate)
    activation_ste = quantizers.check_activation_ste(activation_ste, "activation_ste")
    if not isinstance(model, keras.Model) or not model.built or not model.inputs:
        raise ValueError(
            f"quantize_model needs a built Sequential or Functional Keras model, got {model!r}."
        )
    widths, reasons, skip = _resolve(model, weight_bits, layer_bits, skip, first_layer_bits)

    fused_relu = set()
    unsupported = []
    quantized_relus = []

    def quant_relu(name, dtype, source=None):
        quantized_relus.append(name)
        # A QuantReLU keeps its alpha regularizer (a builder's weight decay) when re-quantized.
        regularizer = getattr(source, "alpha_regularizer", None)
        return QuantReLU(
            bits=activation_bits,
            alpha_rate=alpha_rate,
            alpha_regularizer=regularizer,
            ste=activation_ste,
            name=name,
            dtype=dtype,
        )

    def twin_of(source, prefix):
        def clone(layer):
            if not isinstance(layer, keras.layers.Layer):
                # Keras operations written on tensors (`x + c`, `keras.ops.*` in a functional graph) hold
                # no weights: the twin reuses them.
                return layer
            path = prefix + layer.name
            if _is_nested(layer):
                return twin_of(layer, path + "/")
            config = layer.get_config()
            # A teacher is frozen once a Distiller holds it; its quantized twin is there to be trained.
            config["trainable"] = True
            quant = _quant_class(layer)
            if quant is not None:
                config.pop("kernel_quantizer", None)
                bits = widths[path]
                config.update(
                    weight_bits=bits,
                    per_channel=per_channel and bits is not None,
                    relax=relax if bits is not None else None,
                )
                if activation_bits is not None and _is_relu_activation(layer.activation):
                    config["activation"] = None
                    fused_relu.add(id(layer))
                return quant.from_config(config)
            if (
                activation_bits is not None
                and _is_relu_layer(layer)
                and not set(_path_names(path)) & skip
            ):
                return quant_relu(layer.name, layer.dtype_policy, layer)
            if _has_kernel(layer):
                reasons[path] = NO_COUNTERPART
                unsupported.append(f"{path} ({type(layer).__name__})")
            return layer.__class__.from_config(config)

        def call(layer, *args, **kwargs):
            outputs = layer(*args, **kwargs)
            if id(layer) in fused_relu:
                outputs = quant_relu(f"{layer.name}_relu", None)(outputs)
            return outputs

        # clone_model hands the clone function the source layers: fused ReLUs are keyed by the twin.
        def clone_and_mark(layer):
            twin = clone(layer)
            if id(layer) in fused_relu:
                fused_relu.discard(id(layer))
                fused_relu.add(id(twin))
            return twin

        return keras.models.clone_model(
            _as_functional(source), clone_function=clone_and_mark, call_function=call
        )

    twin = twin_of(model, "")
    twin._faqd_float_kernels = dict(reasons)
    if reasons:
        logger.info(
            "quantize_model(%s): kernel layers left in full precision: %s",
            model.name,
            ", ".join(f"{path} ({why})" for path, why in reasons.items()),
        )
    if unsupported and weight_bits is not None:
        warnings.warn(
            "quantize_model left these layers in full precision (no quantized counterpart): "
            + ", ".join(unsupported),
            stacklevel=2,
        )
    if weight_bits is not None and not any(bits is not None for bits in widths.values()):
        detail = (
            "its kernel layers stay in full precision ("
            + ", ".join(f"{p}: {r}" for p, r in reasons.items())
            + ")"
            if reasons
            else "it has no layer with a kernel"
        )
        warnings.warn(
            f"quantize_model quantized no kernel of model {model.name!r} despite weight_bits={weight_bits}: "
            f"{detail}.",
            stacklevel=2,
        )
    if activation_bits is not None and not quantized_relus:
        warnings.warn(
            f"quantize_model found no ReLU to quantize in model {model.name!r}: its activations stay "
            f"in full precision despite activation_bits={activation_bits} (only ReLU layers, "
            "Activation('relu') and fused activation='relu' are quantized).",
            stacklevel=2,
        )
    if copy_weights:
        copy_weights_by_name(model, twin)
    return twin


def copy_weights_by_name(source, target):
    """Copies each layer's weights from `source` to the same-named layer of `target`, nested
    models layer by layer.

    The quantized layers add weights after the float ones (BinaryRelax lambda) and QuantReLU
    adds alpha to a weightless ReLU, so the source weights are a prefix of the target's.
    """
    for layer in source.layers:
        if _is_nested(layer):
            copy_weights_by_name(layer, target.get_layer(layer.name))
            continue
        weights = layer.get_weights()
        if not weights:
            continue
        twin = target.get_layer(layer.name)
        if len(twin.weights) < len(weights):
            raise ValueError(
                f"Layer {layer.name!r} has {len(weights)} weights but its twin only {len(twin.weights)}."
            )
        for variable, value in zip(twin.weights, weights):
            variable.assign(value)


def quantized_relus(model: keras.Layer) -> list[QuantReLU]:
    """Every `QuantReLU` under `model` (nested models and a Distiller's student included) with a
    learned alpha, each once."""
    found, seen = [], set()

    def walk(parent):
        for layer in parent.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, QuantReLU):
                if layer.alpha is not None:
                    found.append(layer)
            elif isinstance(layer, keras.Model):
                walk(layer)

    walk(model)
    return found


def set_alpha_decay(model, optimizer, weight_decay, factor=quantizers.ALPHA_DECAY_FACTOR):
    """Gives the alphas of `model`'s QuantReLUs the authors' weight decay, `weight_decay * factor`.

    The authors put the alphas in their own SGD parameter group with the weight decay times 0.01.
    Here the alphas leave `optimizer`'s decoupled weight decay and get an
    `L2(weight_decay * factor / 2)` regularizer instead (the coupled PyTorch rule: the decay adds
    `weight_decay * factor * alpha` to alpha's clamped gradient). Call it before the optimizer's
    first step; it replaces any earlier `optimizer.exclude_from_weight_decay` setting. Returns
    the alpha variables.

    >>> from faqd_tf.models import resnet_cifar
    >>> student = quantize_model(resnet_cifar(8, input_shape=(8, 8, 3)), activation_bits=2)
    >>> optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    >>> len(set_alpha_decay(student, optimizer, weight_decay=1e-4))
    7
    """
    for name, value in (("weight_decay", weight_decay), ("factor", factor)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value < float("inf")
        ):
            raise ValueError(f"set_alpha_decay: {name}={value!r} must be a number >= 0.")
    decay = float(weight_decay) * float(factor)
    relus = quantized_relus(model)
    for layer in relus:
        layer.alpha_regularizer = keras.regularizers.L2(decay / 2) if decay else None
    alphas = [layer.alpha for layer in relus]
    if alphas:
        optimizer.exclude_from_weight_decay(var_list=alphas)
    return alphas
