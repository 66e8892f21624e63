"""Multi-output feature extractors: a network's logits plus the feature maps FA compares.

>>> from faqd_tf.models import resnet_cifar
>>> extractor = feature_extractor(resnet_cifar(20))
>>> [tuple(o.shape[1:]) for o in extractor.outputs]
[(10,), (32, 32, 16), (16, 16, 32), (8, 8, 64)]
"""

import re

import keras

# Layers whose output holds no new learned feature: padding, cropping, reshaping and resampling
# (ZeroPadding, Cropping, Reshape, Flatten, UpSampling, Permute), preprocessing (Rescaling,
# Normalization, Resizing, augmentation), pooling, and dropout.
_NOT_FEATURES = (
    "keras.src.layers.reshaping",
    "keras.src.layers.preprocessing",
    "keras.src.layers.pooling",
    "keras.src.layers.regularization",
)


def _map_shape(output):
    """The spatial shape of a feature map: ``(H, W)`` of a 4-D, ``(L,)`` of a 3-D output; else None."""
    shape = getattr(output, "shape", None)
    if not isinstance(shape, tuple) or len(shape) not in (3, 4):
        return None
    return tuple(shape[1:-1])


def _spatial_shape(layer):
    try:
        return _map_shape(layer.output)
    except (AttributeError, ValueError):
        return None  # a shared layer with several outputs, or a layer that was never called


def _graph(model):
    """Operations in network order, and for each its producers' positions (the model's own nodes)."""
    if isinstance(model, keras.Sequential):
        ops = list(model.layers)
        return ops, [[i - 1] if i else [] for i in range(len(ops))]
    ops = list(model.operations)
    position = {id(op): i for i, op in enumerate(ops)}
    by_depth = getattr(model, "_nodes_by_depth", None)
    own = None if by_depth is None else {id(node) for nodes in by_depth.values() for node in nodes}
    producers = []
    for op in ops:
        inputs = set()
        for node in getattr(op, "_inbound_nodes", []):
            if own is not None and id(node) not in own:
                continue
            for tensor in node.input_tensors:
                history = getattr(tensor, "_keras_history", None)
                if history is not None and id(history.operation) in position:
                    inputs.add(position[id(history.operation)])
        producers.append(sorted(inputs))
    return ops, producers


def _head(model, ops, producers):
    """Positions of the output operation and the single-input chain back to the classifier."""
    outputs = getattr(model, "outputs", None) or []
    history = getattr(outputs[0], "_keras_history", None) if len(outputs) == 1 else None
    position = {id(op): i for i, op in enumerate(ops)}
    i = position.get(id(history.operation)) if history is not None else None
    head = set()
    while i is not None and i not in head:
        head.add(i)
        if ops[i].weights or len(producers[i]) != 1:
            break
        i = producers[i][0]
    return head


def feature_layers(model: keras.Model) -> list[str]:
    """The names of the layers whose outputs FA compares when none are given: the stage outputs.

    Layers named `stage1`, `stage2`, ... (the project's ResNets) if the model has them. Otherwise,
    walking the network in order, the last output at each spatial resolution (a new entry each
    time the resolution changes, so an encoder-decoder gets its decoder's maps too) among the
    layers that carry learned features: 4-D ``(batch, H, W, C)`` or 3-D ``(batch, L, C)`` maps
    (Conv1D models) computed after a layer with weights, through which every path from the input
    to the output passes (a block output, not one branch of a block), of more than one pixel, and
    not padding, cropping, reshaping, preprocessing (Rescaling, Normalization), pooling, dropout,
    or the logits (the output layer and the head before it).

    Returns [] when no layer qualifies (e.g. an MLP): there is nothing for FA to match.

    >>> m = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
    ...                       keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
    ...                       keras.layers.ZeroPadding2D(name="pad"), keras.layers.Conv2D(8, 3, strides=2, name="c2"),
    ...                       keras.layers.MaxPooling2D(name="pool"), keras.layers.Flatten(), keras.layers.Dense(3)])
    >>> feature_layers(m)
    ['c1', 'c2']
    """
    stages = sorted(
        (layer.name for layer in model.layers if re.fullmatch(r"stage\d+", layer.name)),
        key=lambda name: int(name[5:]),
    )
    if stages:
        return stages
    ops, producers = _graph(model)
    head = _head(model, ops, producers)
    last_use = [-1] * len(ops)
    for i, inputs in enumerate(producers):
        for j in inputs:
            last_use[j] = max(last_use[j], i)
    learned = [False] * len(ops)
    taps, reach = [], -1  # reach: the furthest consumer of any operation before i
    for i, op in enumerate(ops):
        learned[i] = bool(getattr(op, "weights", None)) or any(learned[j] for j in producers[i])
        # Every later operation reads only op's output (or nothing before it): a cut point.
        cut = reach <= i
        reach = max(reach, last_use[i] if last_use[i] >= 0 else len(ops))
        if not cut or not learned[i] or i in head or not isinstance(op, keras.layers.Layer):
            continue
        if isinstance(op, keras.layers.InputLayer) or type(op).__module__.startswith(_NOT_FEATURES):
            continue
        shape = _spatial_shape(op)
        if shape is None or all(d == 1 for d in shape):
            continue
        if taps and taps[-1][0] == shape:
            taps[-1] = (shape, op.name)
        else:
            taps.append((shape, op.name))
    return [name for _, name in taps]


def feature_extractor(
    model: keras.Model, layers: list[str] | None = None, name: str | None = None
) -> keras.Model:
    """A Keras model returning `[logits, feature_map_1, ..., feature_map_L]`.

    Args:
        model: a built Functional or Sequential model whose output is the logits.
        layers: names of the layers to tap, in order; None picks them with `feature_layers`.
            An empty list gives the logits alone.
        name: name of the extractor model.

    The extractor shares the model's layers and weights: training it trains the model.
    """
    if not isinstance(model, keras.Model) or not model.built or not model.outputs:
        raise ValueError(
            f"feature_extractor needs a built Functional or Sequential Keras model, got {model!r}; "
            "build it with keras.Input first."
        )
    if len(model.outputs) != 1:
        raise ValueError(
            f"Model {model.name!r} has {len(model.outputs)} outputs; the distilled networks must have one "
            "output, the logits."
        )
    names = feature_layers(model) if layers is None else list(layers)
    known = {layer.name for layer in model.layers}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(
            f"Model {model.name!r} has no layer named {', '.join(map(repr, missing))}; "
            f"feature layers must be among its {len(known)} layer names, e.g. {sorted(known)[:6]}."
        )
    maps = []
    for n in names:
        output = model.get_layer(n).output
        if _map_shape(output) is None:
            raise ValueError(
                f"Layer {n!r} of {model.name!r} outputs shape {output.shape}; feature affinity needs "
                "(batch, height, width, channels) or (batch, length, channels) maps."
            )
        maps.append(output)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [model.outputs[0], *maps], name=name or f"{model.name}_features")


def paired_extractors(
    teacher: keras.Model,
    student: keras.Model,
    teacher_layers: list[str] | None = None,
    student_layers: list[str] | None = None,
) -> tuple[keras.Model, keras.Model]:
    """Teacher and student extractors whose feature maps pair up in order."""
    t = feature_extractor(teacher, teacher_layers, name="teacher_features")
    s = feature_extractor(student, student_layers, name="student_features")
    if len(t.outputs) != len(s.outputs):
        raise ValueError(
            f"The teacher has {len(t.outputs) - 1} feature taps ({t.output_names[1:]}) and the student "
            f"{len(s.outputs) - 1} ({s.output_names[1:]}); pass teacher_layers and student_layers of "
            "equal length."
        )
    return t, s
