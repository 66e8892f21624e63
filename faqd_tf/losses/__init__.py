"""Distillation losses of FAQD: feature affinity (exact and fast) and KD on logits.

Feature affinity (eq. 6 of arXiv 2302.10899): each pixel's channel vector is normalized to unit
length, `F` in R^{N x C} with `N = H * W`, and `S = F F^T` holds the N x N pixel cosines. Two norms
of `D = S_T - S_S` per sample (`fa_norm`):

- `"fro2"`: `||D||_F^2 / N^2`, eq. (6) of the paper;
- `"l1"`: `sum |D_ij| / N^2`, the mean absolute difference, as the authors' code trains
  (lzj994/FAQD `fa_loss(order=1)`).

Both are averaged over the batch. The authors' code sums over the batch instead, which ties the
strength to the batch size: their `fa_coef` c at batch size B is `beta = c * B` here
(`faqd_tf.options.DEFAULT_BETA` holds the measured defaults). Teacher and student may differ in
channels; a teacher map with another H, W is first resized (bilinear) to the student's.

One module per idea, every name below importable from here:

- `pixels`: the unit pixel rows and `M = A - B`, `P = A + B`, accurate however close the maps are;
- `affinity`: exact FA (`feature_affinity`, pairwise or gram, `resolve_method`);
- `fast`: fast FA (`fast_feature_affinity`, eqs. 14-15), by Gaussian probes;
- `seeds`: the one seeding rule of those probes (`probe_seed`, `tap_key`, `ProbeCounter`);
- `kd`: KD on logits (`kd_loss`) and the cross-entropy on labels;
- `wrappers`: the Keras loss objects (`FeatureAffinity`, `FastFeatureAffinity`, `KDLoss`).

Example:

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
>>> float(feature_affinity(x, x)), float(feature_affinity(x, x, fa_norm="l1"))
(0.0, 0.0)
"""

from faqd_tf.losses.affinity import (
    GRAM_PRODUCTS,
    GRAM_RELATIVE_ERROR_LIMIT,
    GRAM_ROW_COST,
    PAIRWISE_ENTRY_COST,
    TILE_ELEMENTS_PER_SAMPLE,
    feature_affinity,
    feature_affinity_per_sample,
    gram_error_estimate,
    resolve_method,
)
from faqd_tf.losses.fast import (
    fast_feature_affinity,
    fast_feature_affinity_per_sample,
    gaussian_probes,
)
from faqd_tf.losses.kd import ce_loss_per_sample, kd_loss, kd_loss_per_sample
from faqd_tf.losses.pixels import NORM_EPSILON
from faqd_tf.losses.seeds import ProbeCounter, probe_seed, tap_key
from faqd_tf.losses.wrappers import FastFeatureAffinity, FeatureAffinity, KDLoss

__all__ = [
    "GRAM_PRODUCTS",
    "GRAM_RELATIVE_ERROR_LIMIT",
    "GRAM_ROW_COST",
    "NORM_EPSILON",
    "PAIRWISE_ENTRY_COST",
    "TILE_ELEMENTS_PER_SAMPLE",
    "FastFeatureAffinity",
    "FeatureAffinity",
    "KDLoss",
    "ProbeCounter",
    "ce_loss_per_sample",
    "fast_feature_affinity",
    "fast_feature_affinity_per_sample",
    "feature_affinity",
    "feature_affinity_per_sample",
    "gaussian_probes",
    "gram_error_estimate",
    "kd_loss",
    "kd_loss_per_sample",
    "probe_seed",
    "resolve_method",
    "tap_key",
]
