"""Feature affinity as a loss of Keras's own `keras.distillation.Distiller`.

`FeatureAffinityDistillation` taps one teacher layer and one student layer, like
`keras.distillation.FeatureDistillation`: the Keras Distiller reads its `teacher_layer_name` and
`student_layer_name`, builds the feature extractors and hands the two 4-D maps to `compute_loss`,
which returns the exact feature affinity (eq. 6 of arXiv 2302.10899, or the L1 norm of the
authors' code) or its fast estimate (FFA, eq. 15), averaged over the batch. One instance per tapped
pair; combine them with `keras.distillation.LogitsDistillation` and weigh them with
`distillation_loss_weights`: `faqd_tf.options.DEFAULT_BETA[fa_norm]` as the weight of each tap
gives FA about the gradient share it has in the authors' code (as the Distiller's `beta`, which
weighs every tap alike).

>>> import keras
>>> loss = FeatureAffinityDistillation(teacher_layer_name="stage2", student_layer_name="stage2")
>>> FeatureAffinityDistillation.from_config(loss.get_config()).get_config() == loss.get_config()
True
"""

import keras

from faqd_tf import losses, options


@keras.saving.register_keras_serializable(package="faqd_tf")
class FeatureAffinityDistillation(keras.distillation.DistillationLoss):
    """FA (or FFA) between a tapped teacher map and a tapped student map, for `keras.distillation.Distiller`.

    Args:
        teacher_layer_name: name of the teacher layer with a 4-D `(batch, H, W, C)` output.
        student_layer_name: name of the student layer with a 4-D output; its H, W rule (a teacher
            map of another size is resized, bilinear) and its channels may differ from the teacher's.
        fa: `"exact"` (`faqd_tf.losses.feature_affinity`) or `"fast"` (FFA with `ffa_k` probes).
        fa_norm: `"fro2"` (eq. 6) or `"l1"` (the authors' code).
        ffa_k: number of Gaussian probes of FFA (formerly `k`, still taken with a `DeprecationWarning`).
        fa_method: `"auto"`, `"gram"` (fro2 only) or `"pairwise"`: evaluation of the exact FA.
        seed: FFA probes: each call draws fresh ones from `faqd_tf.losses.probe_seed(seed, tap, calls)`
            (the tap is `faqd_tf.losses.tap_key` of the two layer names, `calls` this loss's count of
            calls), so a seeded run is reproducible and each step still gets new probes; None draws
            a seed once, when the loss is made.

    Returns from `compute_loss` a float32 scalar (the batch mean).
    """

    def __init__(
        self,
        teacher_layer_name: str | None = None,
        student_layer_name: str | None = None,
        fa: str = "exact",
        fa_norm: str = "fro2",
        ffa_k: int = 15,
        fa_method: str = "auto",
        seed: int | None = None,
        **renamed,
    ):
        ffa_k = options.renamed(renamed, "k", "ffa_k", ffa_k, type(self).__name__)
        if not teacher_layer_name or not student_layer_name:
            raise ValueError(
                "FeatureAffinityDistillation needs teacher_layer_name and student_layer_name: feature "
                "affinity compares 4-D feature maps, not the final logits."
            )
        self.teacher_layer_name = teacher_layer_name
        self.student_layer_name = student_layer_name
        # The Distiller's options, with their bounds; this loss is the FA term, never None.
        options.DistillOptions(
            fa=options.check_fa(fa, allow_none=False),
            fa_norm=fa_norm,
            ffa_k=ffa_k,
            fa_method=fa_method,
        )
        self.fa, self.fa_norm, self.ffa_k, self.fa_method = fa, fa_norm, int(ffa_k), fa_method
        self.seed = options.check_seed(seed)
        self._probes = losses.ProbeCounter(self.seed)
        self._tap = losses.tap_key(teacher_layer_name, student_layer_name)

    def validate_model_compatibility(self, teacher, student):
        for role, model, name in (
            ("teacher", teacher, self.teacher_layer_name),
            ("student", student, self.student_layer_name),
        ):
            if getattr(model, "inputs", None) is None:
                raise ValueError(
                    f"FeatureAffinityDistillation needs a Functional or Sequential {role}; "
                    f"{model.name!r} has no symbolic inputs."
                )
            try:
                layer = model.get_layer(name=name)
            except ValueError as e:
                raise ValueError(f"In {role} model: {e}") from None
            shape = getattr(layer, "output", None)
            shape = getattr(shape, "shape", None)
            if shape is not None and len(shape) != 4:
                raise ValueError(
                    f"The {role} layer {name!r} outputs shape {tuple(shape)}; feature affinity needs "
                    f"4-D (batch, height, width, channels) maps."
                )

    def validate_outputs(self, teacher_outputs, student_outputs):
        for role, x in (("teacher", teacher_outputs), ("student", student_outputs)):
            if not hasattr(x, "shape") or len(x.shape) != 4:
                raise ValueError(
                    f"FeatureAffinityDistillation needs a 4-D {role} map, got {getattr(x, 'shape', x)!r}."
                )

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        if self.fa == "exact":
            return losses.feature_affinity(
                teacher_outputs, student_outputs, method=self.fa_method, fa_norm=self.fa_norm
            )
        return losses.fast_feature_affinity(
            teacher_outputs,
            student_outputs,
            k=self.ffa_k,
            seed=self._probes.next_seed(self._tap),
            fa_norm=self.fa_norm,
        )

    def get_config(self):
        return {
            "teacher_layer_name": self.teacher_layer_name,
            "student_layer_name": self.student_layer_name,
            "fa": self.fa,
            "fa_norm": self.fa_norm,
            "ffa_k": self.ffa_k,
            "fa_method": self.fa_method,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"FeatureAffinityDistillation(teacher_layer_name={self.teacher_layer_name!r}, "
            f"student_layer_name={self.student_layer_name!r}, fa={self.fa!r}, fa_norm={self.fa_norm!r})"
        )


__all__ = ["FeatureAffinityDistillation"]
