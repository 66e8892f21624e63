"""faqd-tf: label-free quantization of Keras models by Feature Affinity assisted Distillation (FAQD)."""

__version__ = "0.1.0"
