"""faqd-tf: label-free quantization of Keras models by Feature Affinity assisted Distillation (FAQD).

Importing the package registers its layers, quantizers and losses with Keras, so saved models
load with `keras.models.load_model(path, safe_mode=True)`. Deployment (`faqd_tf.export`: packed
files, TFLite) is imported on demand.
"""

from faqd_tf import layers, losses, models, quantizers  # noqa: F401  (registers serializable classes)
from faqd_tf._version import __version__
from faqd_tf.batchnorm import recalibrate_batchnorm
from faqd_tf.distiller import Distiller
from faqd_tf.quantize import quantize_model
from faqd_tf.summary import summary

__all__ = ["Distiller", "quantize_model", "recalibrate_batchnorm", "summary", "layers", "losses", "models", "quantizers", "__version__"]
