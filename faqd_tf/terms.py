"""The weighted terms of the `Distiller`'s loss, one class each (Keras's `DistillationLoss` habit).

A term turns the outputs of one forward pass (the teacher's and the student's logits and tapped
maps, the labels, the training step) into a per-sample loss of shape `(batch,)`; the Distiller sums
`weight * value` over its terms, logs each under the term's `name`, and `gradient_norms` measures
each. The terms of eq. (10) of arXiv 2302.10899:

    alpha * KD(teacher logits, student logits)   KDTerm      logged as `kd`
    + beta * sum_l FA(teacher map l, student map l)   FATerm  logged as `fa`
    + gamma * CE(labels, student logits)         CETerm      logged as `ce`

A new term is one `LossTerm` subclass (a `name`, a `__call__`, a `__str__` for the run's log line).
The terms take their options as `from_options` hands them over, from a `faqd_tf.options.DistillOptions`
that checked them.

>>> import numpy as np
>>> outputs = Outputs(logits=np.array([[1.0, 2.0]], "float32"), maps=[])
>>> term = KDTerm(0.5, kd="mse")
>>> str(term), term(outputs, Outputs(np.array([[1.0, 4.0]], "float32"), [])).numpy().tolist()
('0.5*KD(mse)', [2.0])
>>> from_options(DistillOptions(gamma=0.3, kd="kl"))
[KDTerm(1.0*KD(kl)), FATerm(30.0*FA(exact, fro2)), CETerm(0.3*CE)]
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from faqd_tf import losses
from faqd_tf.options import DistillOptions


@dataclasses.dataclass(frozen=True)
class Outputs:
    """One network's outputs in a forward pass: its logits and its tapped feature maps, in tap order."""

    logits: Any
    maps: Sequence[Any]

    @classmethod
    def of(cls, extractor_outputs: Any) -> "Outputs":
        """From a `faqd_tf.features.feature_extractor`'s `[logits, map_1, ...]` (or the logits alone)."""
        logits, *maps = tf.nest.flatten(extractor_outputs)
        return cls(logits, maps)


class LossTerm:
    """One weighted term of the loss.

    Attributes:
        name: the term's name in the logs (`history.csv`'s column) and in `gradient_norms`.
        weight: its weight in the total loss.
        needs_labels: True when it reads the labels (the batches must then carry them).
    """

    name: str = ""
    needs_labels: bool = False

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, teacher: Outputs, student: Outputs, labels=None, step=0) -> tf.Tensor:
        """The per-sample loss, float32 of shape `(batch,)`."""
        raise NotImplementedError

    def missing_labels(self) -> str:
        """The one-line error for a batch without the labels this term reads."""
        return f"the loss term {self} reads labels but the batches carry none; feed (images, labels) batches."

    def __str__(self):
        return f"{self.weight}*{self.name.upper()}"

    def __repr__(self):
        return f"{type(self).__name__}({self})"


class KDTerm(LossTerm):
    """Knowledge distillation on logits (`faqd_tf.losses.kd_loss_per_sample`): MSE, or KL at `temperature`."""

    name = "kd"

    def __init__(self, weight: float, kd: str = "mse", temperature: float = 1.0):
        super().__init__(weight)
        self.kd, self.temperature = kd, float(temperature)

    def __call__(self, teacher, student, labels=None, step=0):
        return losses.kd_loss_per_sample(
            teacher.logits, student.logits, kd=self.kd, temperature=self.temperature
        )

    def __str__(self):
        return f"{self.weight}*KD({self.kd})"


class FATerm(LossTerm):
    """Feature affinity summed over the tapped pairs: exact, or FFA with `ffa_k` probes.

    `taps` are the `(teacher layer, student layer)` names of the pairs, in order; FFA draws the
    probes of tap `t` at step `step` from `faqd_tf.losses.probe_seed(seed, tap_key(*taps[t]), step)`.
    """

    name = "fa"

    def __init__(
        self,
        weight: float,
        fa: str = "exact",
        fa_norm: str = "fro2",
        ffa_k: int = 15,
        fa_method: str = "auto",
        seed: int = 0,
        taps: Sequence[tuple[str, str]] = (),
    ):
        super().__init__(weight)
        self.fa, self.fa_norm, self.ffa_k, self.fa_method, self.seed = (
            fa,
            fa_norm,
            int(ffa_k),
            fa_method,
            seed,
        )
        self.taps = [losses.tap_key(t, s) for t, s in taps]

    def __call__(self, teacher, student, labels=None, step=0):
        # A (batch,) zero, not 0.0, where nothing is tapped (a 1-D per-step net has no 4-D map).
        fa = tf.zeros(tf.shape(student.logits)[:1], tf.float32)
        for tap, (t_map, s_map) in enumerate(zip(teacher.maps, student.maps)):
            if self.fa == "exact":
                fa += losses.feature_affinity_per_sample(
                    t_map, s_map, method=self.fa_method, fa_norm=self.fa_norm
                )
            else:
                seed = losses.probe_seed(self.seed, self.taps[tap] if self.taps else tap, step)
                fa += losses.fast_feature_affinity_per_sample(
                    t_map, s_map, k=self.ffa_k, seed=seed, fa_norm=self.fa_norm
                )
        return fa

    def __str__(self):
        return f"{self.weight}*FA({self.fa}, {self.fa_norm})"


class CETerm(LossTerm):
    """Cross-entropy of the student's logits on the labels (sparse, or one-hot when they have one entry
    per class); for dense prediction one label per position, averaged over the positions
    (`faqd_tf.losses.ce_loss_per_sample`)."""

    name = "ce"
    needs_labels = True

    def missing_labels(self) -> str:
        return (
            f"gamma={self.weight} weights a cross-entropy term but the batches carry no labels; "
            "feed (images, labels) batches, or set gamma=0 for label-free distillation."
        )

    def __call__(self, teacher, student, labels=None, step=0):
        return losses.ce_loss_per_sample(labels, student.logits)


def from_options(
    options: DistillOptions, seed: int = 0, taps: Sequence[tuple[str, str]] = ()
) -> list[LossTerm]:
    """The terms of the checked loss `options`: KD always, FA unless `options.fa` is None (weighted by
    `options.fa_weight`; FFA's probes from `seed`, per tapped pair of `taps`), CE when gamma > 0."""
    terms = [KDTerm(float(options.alpha), options.kd, options.temperature)]
    if options.fa is not None:
        terms.append(
            FATerm(
                options.fa_weight,
                options.fa,
                options.fa_norm,
                options.ffa_k,
                options.fa_method,
                seed,
                taps,
            )
        )
    if options.gamma > 0:
        terms.append(CETerm(float(options.gamma)))
    return terms
