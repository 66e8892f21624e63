"""Multi-output feature extractors: a network's logits plus the feature maps FA compares.

>>> from faqd_tf.models import resnet_cifar
>>> extractor = feature_extractor(resnet_cifar(20))
>>> [tuple(o.shape[1:]) for o in extractor.outputs]
[(10,), (32, 32, 16), (16, 16, 32), (8, 8, 64)]
"""

import re

import keras


def _spatial_shape(layer):
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return None  # a shared layer with several outputs, or a layer that was never called
    if not isinstance(shape, tuple) or len(shape) != 4:
        return None
    return tuple(shape[1:3])


def feature_layers(model: keras.Model) -> list[str]:
    """The names of the layers whose outputs FA compares when none are given.

    Layers named `stage1`, `stage2`, ... (the project's ResNets) if the model has them; otherwise
    the last 4-D output at each spatial resolution before the head (the stage outputs of a
    typical CNN), in the order the resolutions appear.
    """
    stages = sorted(
        (layer.name for layer in model.layers if re.fullmatch(r"stage\d+", layer.name)),
        key=lambda name: int(name[5:]),
    )
    if stages:
        return stages
    last_at = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        shape = _spatial_shape(layer)
        if shape is not None:
            last_at[shape] = layer.name  # dicts keep first-seen order; the value is the last layer
    return list(last_at.values())


def feature_extractor(model: keras.Model, layers: list[str] | None = None, name: str | None = None) -> keras.Model:
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
        if len(output.shape) != 4:
            raise ValueError(
                f"Layer {n!r} of {model.name!r} outputs shape {output.shape}; feature affinity needs "
                "(batch, height, width, channels) maps."
            )
        maps.append(output)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, [model.outputs[0], *maps], name=name or f"{model.name}_features")


def paired_extractors(teacher: keras.Model, student: keras.Model, teacher_layers: list[str] | None = None,
                      student_layers: list[str] | None = None) -> tuple[keras.Model, keras.Model]:
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
