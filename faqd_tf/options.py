"""The options of FAQD (its losses, quantizers and data augmentation), named and checked once.

`losses`, `Distiller`, `keras_distillation`, `tuning` and the config schema take the same options
under the same names; their allowed values and their checks live here, so a value one of them
accepts is accepted by all, and a bad value gets the same one-line `ValueError` everywhere. The
module loads no TensorFlow: the command line checks a config against it before TensorFlow starts.

>>> check_fa_norm("l1")
'l1'
>>> check_fa_norm("l2")
Traceback (most recent call last):
...
ValueError: fa_norm='l2' is not supported; use one of 'fro2', 'l1'.
"""

import math
import numbers
import warnings

import numpy as np

SUPPORTED_BITS = (1, 2, 4, 8)
"""Bit widths of quantized weights and activations (`faqd_tf.quantizers`)."""

AUGMENTATIONS = ("crop", "crop_flip", "resized_crop_flip")
"""Augmentation policies of the data pipelines (`faqd_tf.data`)."""

KD = ("mse", "kl")
"""`kd`: MSE on raw logits (the paper's end-to-end choice) or the temperature-scaled KL (fine-tuning)."""

FA = ("exact", "fast")
"""`fa`: exact feature affinity, or its randomized estimate FFA (eq. 15); the Distiller also takes None."""

FA_NORMS = ("fro2", "l1")
"""`fa_norm`: `"fro2"` is eq. (6), `||S_T - S_S||_F^2 / N^2`; `"l1"` the authors' code,
`sum |S_T - S_S| / N^2` (the elementwise mean absolute difference)."""

FA_METHODS = ("auto", "pairwise", "gram")
"""`fa_method`: how the exact FA is evaluated (N x N tiles, or C x C products for `"fro2"`)."""

DEFAULT_BETA = {"fro2": 30.0, "l1": 10.0}
"""The FA weight `beta` used when none is given, per `fa_norm`.

Chosen by measurement (benchmarks/fa_strength.py, docs/results.md "FA strength"): at the start of
distillation FA's gradient is then about as strong against KD's as in the authors' code, which
trains with `fa_coef` 0.1 on the L1 norm summed over a batch of 100 (beta 10 on the batch mean
here). The squared Frobenius norm of eq. (6) has a much smaller gradient: beta 30 puts it within
0.3x-3x of the authors' FA/KD ratio both fine-tuning (their beta-equivalent 60-84) and end-to-end
(15-17).
"""


def _quote(values):
    return ", ".join(repr(v) for v in values)


def check_choice(name: str, value: str | None, allowed: tuple[str, ...], allow_none: bool = False) -> str | None:
    """`value` if it is one of `allowed` (or None when `allow_none`), else a one-line ValueError."""
    if (value is None and allow_none) or (isinstance(value, str) and value in allowed):
        return value
    options = _quote(allowed) + (" or None" if allow_none else "")
    raise ValueError(f"{name}={value!r} is not supported; use one of {options}.")


def check_kd(kd: str, name: str = "kd") -> str:
    return check_choice(name, kd, KD)


def check_fa(fa: str | None, name: str = "fa", allow_none: bool = True) -> str | None:
    return check_choice(name, fa, FA, allow_none=allow_none)


def check_fa_norm(fa_norm: str, name: str = "fa_norm") -> str:
    return check_choice(name, fa_norm, FA_NORMS)


def check_fa_method(fa_method: str, fa_norm: str = "fro2", name: str = "fa_method") -> str:
    check_choice(name, fa_method, FA_METHODS)
    if fa_method == "gram" and fa_norm != "fro2":
        raise ValueError(
            f"{name}='gram' evaluates fa_norm='fro2' only; fa_norm={fa_norm!r} needs 'pairwise' or 'auto'."
        )
    return fa_method


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """A finite temperature > 0 as a float (the KL divides the logits by it)."""
    if not _is_real(temperature) or not math.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"{name}={temperature!r} is not supported; use a finite number > 0.")
    return float(temperature)


def check_weight(weight: float, name: str) -> float:
    """A loss weight (alpha, beta, gamma): a finite number >= 0, as a float."""
    if not _is_real(weight) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{name}={weight!r} is not supported; use a finite number >= 0.")
    return float(weight)


def is_integer(value) -> bool:
    """Whether `value` is an integer (a Python or NumPy int, not a bool): the package's one integer check.

    >>> is_integer(3), is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_k(k: int, name: str = "k") -> int:
    """The number of FFA probes: an integer >= 1."""
    if not is_integer(k) or k < 1:
        raise ValueError(f"{name}={k!r} is not supported; use an integer >= 1 (number of random probes).")
    return int(k)


def check_seed(seed: int | None, name: str = "seed") -> int | None:
    """`seed` as an int, or None."""
    if seed is not None and not is_integer(seed):
        raise ValueError(f"{name}={seed!r} is not supported; use an int or None.")
    return None if seed is None else int(seed)


def renamed(given: dict, old: str, new: str, value: object, owner: str) -> object:
    """`value` of the argument `new`, or that of `old` (its former name) if `given` (the caller's
    leftover keyword arguments) holds it, with a `DeprecationWarning`; any other leftover is a TypeError.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     renamed({"k": 5}, "k", "ffa_k", 15, "FeatureAffinityDistillation")
    5
    >>> str(caught[0].message)
    "FeatureAffinityDistillation: the argument 'k' is now called 'ffa_k'; the old name will go in a later release."
    """
    given = dict(given)
    if old in given:
        warnings.warn(f"{owner}: the argument {old!r} is now called {new!r}; the old name will go in a later release.",
                      DeprecationWarning, stacklevel=3)
        value = given.pop(old)
    if given:
        raise TypeError(f"{owner} got unexpected keyword arguments {', '.join(sorted(given))}.")
    return value


def fresh_seed() -> int:
    """A seed drawn from the operating system, for an owner of random probes given none (an int < 2^31)."""
    return int(np.random.SeedSequence().entropy % (2**31))


def default_beta(fa_norm: str) -> float:
    """The measured default FA weight for `fa_norm` (see `DEFAULT_BETA`)."""
    return DEFAULT_BETA[check_fa_norm(fa_norm)]
