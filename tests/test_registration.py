"""`import faqd_tf` alone is enough to load anything the library saved, in a fresh process, in any
import order; and a class that nobody registered is named in one line."""

import ast
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest

from faqd_tf import losses, quantize_model, registration
from faqd_tf.export import freeze
from faqd_tf.models import resnet_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convnet():
    """Every kernel layer quantize_model maps (Conv1D/2D/3D, depthwise, separable, transposed, dense),
    one inside a nested Sequential, on the (12, 12, 1) images of the other models."""
    inputs = keras.Input((12, 12, 1))
    stem = keras.Sequential(
        [keras.Input((12, 12, 1)), keras.layers.Conv2D(4, 3, padding="same", activation="relu")],
        name="stem",
    )
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(stem(inputs))
    x = keras.layers.SeparableConv2D(
        4, 3, strides=2, padding="same", activation="relu", name="sep"
    )(x)
    x = keras.layers.Conv2DTranspose(4, 2, strides=2, name="up")(x)
    v = keras.layers.Conv3D(2, 2, name="c3d")(keras.layers.Reshape((12, 12, 4, 1))(x))
    s = keras.layers.Conv1D(3, 3, padding="causal", name="c1d")(keras.layers.Reshape((144, 4))(x))
    x = keras.layers.Concatenate()([keras.layers.Flatten()(v), keras.layers.Flatten()(s)])
    x = keras.layers.Dense(6, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="logits")(x))


def _saved_models(tmp_path, rng):
    """Every kind of model the library makes, saved, with its outputs on fresh inputs."""
    teacher = resnet_cifar(8, input_shape=(12, 12, 1), num_classes=5)
    models = {"teacher": teacher}
    for bits in (1, 2, 4, 8):
        models[f"w{bits}"] = quantize_model(teacher, weight_bits=bits)
    models["w2a2_per_channel"] = quantize_model(
        teacher, weight_bits=2, activation_bits=2, per_channel=True
    )
    models["w1_relax"] = quantize_model(teacher, weight_bits=1, relax=2.0)
    models["mixed_widths"] = quantize_model(
        teacher, weight_bits=1, layer_bits={"stem_conv": 8, "s2.*": 4, "logits": 2}
    )
    models["frozen"] = freeze(quantize_model(teacher, weight_bits=4))
    models["built_quantized"] = resnet_cifar(
        8, input_shape=(12, 12, 1), num_classes=5, weight_bits=2, activation_bits=4
    )
    models["convnet_layers"] = quantize_model(
        _convnet(), weight_bits=2, per_channel=True, relax=1.5
    )
    models["convnet_layers_w1"] = quantize_model(_convnet(), weight_bits=1, activation_bits=2)
    compiled = quantize_model(teacher, weight_bits=4)
    compiled.compile("sgd", loss=[losses.KDLoss(kd="kl", temperature=3.0)])
    models["compiled_with_kd_loss"] = compiled
    x = rng.normal(size=(3, 12, 12, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for name, model in models.items():
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}.npy", model(x, training=False).numpy())
    return sorted(models)


_LOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    {imports}
    folder, names = sys.argv[1], sys.argv[2:]
    x = np.load(f"{{folder}}/x.npy")
    errors = {{}}
    for name in names:
        model = keras.models.load_model(f"{{folder}}/{{name}}.keras", safe_mode=True)
        errors[name] = float(np.max(np.abs(model(x, training=False).numpy() - np.load(f"{{folder}}/{{name}}.npy"))))
    print(json.dumps(errors))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    return folder, _saved_models(folder, np.random.default_rng())


@pytest.mark.parametrize(
    "imports",
    [
        "import keras, faqd_tf",
        "import faqd_tf, keras",
        "import faqd_tf; from faqd_tf import layers; import keras",  # faqd_tf's own module loads Keras
        "import faqd_tf, faqd_tf.config; import tensorflow as tf; keras = tf.keras",
    ],
)
def test_import_faqd_tf_alone_loads_every_saved_model(tmp_path, saved, imports):
    folder, names = saved
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD.format(imports=imports), str(folder), *names],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    # The same weights and code on the same inputs in another process: equal up to the last bits
    # a different thread schedule may change in a reduction.
    assert errors.keys() == set(names)
    for name, error in errors.items():
        assert error <= 1e-5, (name, error)


def test_import_faqd_tf_loads_no_tensorflow_and_registers_once_keras_loads(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        import faqd_tf
        before = [m for m in ("tensorflow", "keras", "faqd_tf.layers") if m in sys.modules]
        import keras
        after = keras.saving.get_registered_object("faqd_tf>QuantConv2D") is not None
        hooks = [type(f).__name__ for f in sys.meta_path if type(f).__module__ == "faqd_tf.registration"]
        print(json.dumps({"before": before, "after": after, "hooks": hooks}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Registered once Keras loaded, and the hook gone after that.
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "before": [],
        "after": True,
        "hooks": [],
    }


def test_registration_modules_are_every_module_that_registers_a_class():
    registering = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "faqd_tf")):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                text = open(path).read()
                if "register_keras_serializable" in text and file != "registration.py":
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    registering.add(module.removesuffix(".__init__"))
    imported = set()
    for module in registration.MODULES:
        imported.add(module)
        if module == "faqd_tf.models":  # a package: its modules that it imports
            tree = ast.parse(open(os.path.join(ROOT, "faqd_tf", "models", "__init__.py")).read())
            imported |= {
                node.module
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("faqd_tf.models.")
            }
    assert registering <= imported, registering - imported


class _Unregistered(keras.layers.Layer):
    def call(self, x):
        return x * 2.0


def test_unregistered_class_is_named_with_its_module(tmp_path):
    keras.saving.register_keras_serializable(package="someone_else")(_Unregistered)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(_Unregistered()(inputs)))
    path = tmp_path / "custom.keras"
    model.save(path)
    del keras.saving.get_custom_objects()["someone_else>_Unregistered"]
    assert registration.unregistered_classes(str(path)) == [
        ("someone_else>_Unregistered", __name__)
    ]
    # The library's own classes are registered, and Keras's are never listed.
    resnet = tmp_path / "resnet.keras"
    quantize_model(resnet_cifar(8, input_shape=(8, 8, 1), num_classes=3), weight_bits=2).save(
        resnet
    )
    assert registration.unregistered_classes(str(resnet)) == []


def test_unregistered_classes_refuses_what_is_not_a_keras_file(tmp_path):
    path = tmp_path / "notes.keras"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match=r"is not a \.keras file"):
        registration.unregistered_classes(str(path))
    with zipfile.ZipFile(tmp_path / "big.keras", "w") as archive:
        archive.writestr("config.json", json.dumps({"x": "y" * 100}))
    original = registration.CONFIG_LIMIT
    try:
        registration.CONFIG_LIMIT = 50
        with pytest.raises(ValueError, match=r"declares 1\d\d bytes, more than 50"):
            registration.unregistered_classes(str(tmp_path / "big.keras"))
    finally:
        registration.CONFIG_LIMIT = original
