"""faqd-tf: label-free quantization of Keras models by Feature Affinity assisted Distillation (FAQD).

Importing the package loads no TensorFlow, so that the command line (`faqd_tf.cli`, which Python
imports after this package) answers `--help` and refuses a bad config at once. The names below load
on first use. The package's Keras classes register as soon as Keras is loaded, before or after this
import (`faqd_tf.registration`), so after `import faqd_tf` alone any model the library saved loads
with `keras.models.load_model(path, safe_mode=True)`. Deployment (`faqd_tf.export`: packed files,
TFLite, ONNX) is imported on demand.

>>> import faqd_tf
>>> faqd_tf.quantize_model.__module__, faqd_tf.layers.QuantConv2D.__name__
('faqd_tf.quantize', 'QuantConv2D')
>>> faqd_tf.sensitivity.__module__, faqd_tf.allocate_bits.__module__
('faqd_tf.sensitivity', 'faqd_tf.sensitivity')
"""

from importlib import import_module as _import_module

from faqd_tf import registration as _registration
from faqd_tf._version import __version__
from faqd_tf.sensitivity import allocate_bits, sensitivity  # load Keras only when they run
from faqd_tf.summary import summary  # loads Keras only when it runs

__all__ = [
    "Distiller",
    "allocate_bits",
    "quantize_model",
    "recalibrate_batchnorm",
    "sensitivity",
    "summary",
    "layers",
    "losses",
    "models",
    "quantizers",
    "__version__",
]

# Name -> the module that defines it (a module stands for itself).
_LAZY = {
    "Distiller": "faqd_tf.distiller",
    "quantize_model": "faqd_tf.quantize",
    "recalibrate_batchnorm": "faqd_tf.batchnorm",
    "layers": "faqd_tf.layers",
    "losses": "faqd_tf.losses",
    "models": "faqd_tf.models",
    "quantizers": "faqd_tf.quantizers",
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'faqd_tf' has no attribute {name!r}")
    # Only the module that defines `name`: the package's own modules import its submodules with
    # `from faqd_tf import quantizers`, which comes here while they are half loaded.
    module = _import_module(_LAZY[name])
    value = module if module.__name__ == f"faqd_tf.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


_registration.install()  # last: registering may import the package's modules, which need the names above
