"""faqd-tf: label-free quantization of Keras models by Feature Affinity assisted Distillation (FAQD).

Importing the package registers its layers, quantizers and losses with Keras, so saved models
load with `keras.models.load_model(path, safe_mode=True)`.
"""

from faqd_tf import export, layers, losses, quantizers  # noqa: F401  (registers serializable classes)
from faqd_tf.distiller import Distiller
from faqd_tf.quantize import quantize_model
from faqd_tf.summary import summary

__version__ = "0.1.0"

__all__ = ["Distiller", "quantize_model", "summary", "export", "layers", "losses", "quantizers"]
