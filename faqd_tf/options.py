"""The options of faqd-tf, one typed record per config section, each option's type, default,
bounds and doc written once.

`DatasetOptions`, `TeacherOptions`, `StudentOptions`, `DistillOptions`, `TrainOptions` (the
distillation's `DistillTrainOptions`, the teacher's `TeacherTrainOptions`), `TuneOptions`, and
`RunOptions` (the whole config) are frozen dataclasses (`faqd_tf.fields`); making one checks it.
The config schema (`faqd_tf.config.SCHEMA`) and docs/config.md are derived from them; the
`Distiller` takes a `DistillOptions` (or its fields as keywords); the tuner varies one with
`dataclasses.replace`. The `check_*` functions check one loss argument against the same bounds
for `faqd_tf.losses` and `keras_distillation`. A new option is one field. The module loads no
TensorFlow: the command line checks a config before it starts.

>>> DistillOptions(kd="kl", temperature=4.0).fa_weight
30.0
>>> dataclasses.replace(DistillOptions(), fa_norm="l2")
Traceback (most recent call last):
...
faqd_tf.fields.OptionError: fa_norm='l2' is not supported; use one of 'fro2', 'l1'.
>>> check_temperature(0.01)
Traceback (most recent call last):
...
faqd_tf.fields.OptionError: temperature=0.01 is not supported; use a finite number >= 0.05 and <= 100.0.
"""

import dataclasses
import json
import warnings

import numpy as np

from faqd_tf import names
from faqd_tf.fields import (
    REQUIRED,
    OptionError,
    Record,
    Spec,
    boolean,
    choice,
    custom,
    integer,
    is_integer,
    number,
    record,
    string,
)

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

# Sane ceilings: beyond them a value is a typo, and would fail deep inside training instead.
MAX_EPOCHS = 100_000
MAX_STEPS = 10**9
MAX_EXAMPLES = 2**31 - 1
MAX_RECALIBRATION = 100_000
MAX_WEIGHT = 1e6
MAX_PIXELS = 4096
MAX_SIZE_KB = 1e9


_BITS = (*SUPPORTED_BITS, None)


def _bits(default, doc):
    return choice(default, _BITS, doc + "; null: full precision")


def _layer_names(doc):
    def test(v):
        return v is None or (isinstance(v, (list, tuple)) and all(isinstance(n, str) for n in v))

    return custom(None, test, "{null} or a list of layer names", doc)


def _image_size(v):
    return v is None or (
        isinstance(v, list)
        and len(v) == 2
        and all(is_integer(n) and 0 < n <= MAX_PIXELS for n in v)
    )


def _layer_bits(v):
    bits = Spec("choice", None, "", choices=_BITS)
    return v is None or (
        isinstance(v, dict)
        and all(isinstance(k, str) and k and bits.accepts(b) for k, b in v.items())
    )


@dataclasses.dataclass(frozen=True)
class DatasetOptions(Record):
    """The config's `dataset`: where the images are and how the stages read them."""

    source: str = string(
        REQUIRED, "`tfds:<name>`, `folder:<path>`, `tiny_imagenet:<path>` or `idx:<path>`"
    )
    data_dir: str | None = string(None, "TFDS's data folder; null: its default", nullable=True)
    labels: bool = boolean(
        False, "the distillation batches carry labels (needed by `distill.gamma` > 0)"
    )
    validation_split: str | None = choice(
        "test",
        ("test", "validation", None),
        "scored after every epoch of the training stages (`validation`: a part of train); null: none",
    )
    limit: int | None = integer(
        None, 1, MAX_EXAMPLES, "train on the first this many images; null: all", nullable=True
    )
    eval_limit: int | None = integer(
        None, 1, MAX_EXAMPLES, "evaluate on the first this many images; null: all", nullable=True
    )
    augment: bool | str | None = choice(
        None,
        (None, True, False, *AUGMENTATIONS),
        "training augmentation: a policy, true (the dataset's), false; null: the dataset's for train",
    )
    image_size: list | None = custom(
        None,
        _image_size,
        f"{{null}} or [height, width] of 1 to {MAX_PIXELS} pixels each",
        "resize every image to it; null: as stored",
    )


@dataclasses.dataclass(frozen=True)
class TrainOptions(Record):
    """A training schedule: the config's `train` (the student's distillation) and `teacher.train`."""

    epochs: int = integer(
        200, 1, MAX_EPOCHS, "passes over the training set (or of `steps_per_epoch` steps)"
    )
    batch_size: int = integer(128, 1, 2**16, "images a step (and a batch of every evaluation)")
    optimizer: str = choice("sgd", ("sgd", "adam"), "SGD (momentum, Nesterov) or AdamW")
    lr: float = number(0.01, 0.0, 10.0, "the learning rate", strict=True)
    momentum: float = number(0.9, 0.0, 1.0, "SGD's momentum")
    nesterov: bool = boolean(True, "SGD's Nesterov momentum")
    schedule: str = choice(
        "cosine", ("cosine", "constant"), "the learning rate's schedule over the steps"
    )
    warmup_epochs: int = integer(
        0, 0, MAX_EPOCHS, "epochs of linear warm-up before the cosine decay"
    )
    weight_decay: float = number(
        1e-4, 0.0, 1.0, "decoupled weight decay (the alphas of quantized ReLUs: their own)"
    )
    # The authors' full-quantization script clips the global gradient norm (at 20 for their
    # batch-summed losses).
    global_clipnorm: float | None = number(
        None,
        0.0,
        MAX_WEIGHT,
        "clip the global gradient norm at it; null: no clipping",
        strict=True,
        null="",
    )
    steps_per_epoch: int | None = integer(
        None, 1, MAX_STEPS, "steps an epoch; null: one pass over the data", nullable=True
    )


@dataclasses.dataclass(frozen=True)
class DistillTrainOptions(TrainOptions):
    """`train`: `TrainOptions` and what only a distillation has."""

    # The frozen teacher's forward is about a quarter of a KD-only step on the CPU (docs/step_cost.md).
    teacher_cache: str | bool = choice(
        "auto",
        ("auto", True, False),
        "keep the teacher's logits from the first epoch and reuse them (KD/CE only, no "
        "augmentation, one replica); auto: when those hold and there are 2 or more epochs",
    )


@dataclasses.dataclass(frozen=True)
class TeacherTrainOptions(TrainOptions):
    """`teacher.train`: `TrainOptions` with the teacher's learning rate (from scratch, 0.1)."""

    lr: float = number(0.1, 0.0, 10.0, "the learning rate", strict=True)


@dataclasses.dataclass(frozen=True)
class TeacherOptions(Record):
    """The config's `teacher`: the full-precision model to train, or a trained one's file."""

    arch: str | None = string(
        "resnet20", "the architecture to train (`faqd_tf.models.available()`)", nullable=True
    )
    file: str | None = string(
        None,
        "a trained `.keras` teacher (then nothing is trained); null: `output_dir`/teacher.keras",
        nullable=True,
    )
    train: TrainOptions = record(TeacherTrainOptions, "the teacher's training")

    def check(self):
        if self.arch is None and self.file is None:
            raise OptionError(
                "give teacher.arch (to train a teacher) or teacher.file (a trained .keras model)."
            )


@dataclasses.dataclass(frozen=True)
class StudentOptions(Record):
    """The config's `student`: where it starts and how it is quantized."""

    arch: str | None = string(
        None, "a fresh student's architecture (`init` scratch); null: the teacher's", nullable=True
    )
    file: str | None = string(
        None, "the FP `.keras` model to quantize (`init` file)", nullable=True
    )
    init: str = choice(
        "teacher",
        ("teacher", "file", "scratch"),
        "start from the teacher's weights, from `file`, or from random weights",
    )
    weight_bits: int | None = _bits(4, "bits of the quantized weights")
    activation_bits: int | None = _bits(None, "bits of the quantized ReLUs")
    per_channel: bool = boolean(False, "one weight scale per output channel (else per layer)")
    layer_bits: dict | None = custom(
        None,
        _layer_bits,
        '{null} or {"layer name or regex": 1, 2, 4, 8 or {null}, ...}',
        "per-layer weight widths over `weight_bits` (`faqd_tf.quantize_model`'s layer_bits), e.g. "
        '`{"stem_conv": 8}`',
    )
    size_budget_kb: float | None = number(
        None,
        0.0,
        MAX_SIZE_KB,
        "choose each layer's weight width (1, 2, 4 or 8) so the student's packed size, as its summary "
        "counts it (kB of 1024 bytes), is at most this, from the label-free sensitivity of each layer "
        "(`faqd_tf.sensitivity`, `faqd_tf.allocate_bits`); null: `weight_bits` and `layer_bits`",
        strict=True,
        null="",
    )
    sensitivity_samples: int = integer(
        512,
        1,
        MAX_RECALIBRATION,
        "unlabeled training images `size_budget_kb`'s sensitivity is measured on",
    )
    relax: float | None = number(
        None,
        0.0,
        MAX_WEIGHT,
        "the initial BinaryRelax lambda; null: plain quantized weights",
        strict=True,
        null="",
    )
    relax_eta: float = number(
        1.02, 1.0, 10.0, "BinaryRelax's lambda grows by this factor each epoch", strict=True
    )
    two_step: bool = boolean(
        True, "with weight and activation bits: activations first, then weights too"
    )
    alpha_rate: float = number(
        0.01,
        0.0,
        None,
        "the quantized ReLUs' alpha gradient scale (the authors' 0.01)",
        strict=True,
    )
    activation_ste: str = choice(
        "clipped",
        ("clipped", "two_sided"),
        "the quantized ReLUs' input gradient: eq. (5)'s (0, top*alpha), or also (-alpha, 0]",
    )
    freeze_alpha_in_step2: bool = boolean(
        False,
        "two steps: keep the alphas the first step learned while the weights are quantized",
    )
    # At 2 bits the moving averages of the last epochs lag the weights by up to 1.7 points; the
    # images are held in memory, hence the ceiling.
    recalibrate_bn: int | None = integer(
        None,
        1,
        MAX_RECALIBRATION,
        "after distilling, re-estimate the BatchNormalization statistics on this many training images; null: keep them",
        nullable=True,
    )

    def check(self):
        if self.init == "file" and not self.file:
            raise OptionError("student.init='file' needs student.file, the FP model to quantize.")
        if self.size_budget_kb is not None:
            if self.layer_bits is not None:
                raise OptionError(
                    "student.size_budget_kb chooses every layer's width itself; remove "
                    "student.layer_bits, or the budget."
                )
            if self.weight_bits is None:
                raise OptionError(
                    "student.size_budget_kb quantizes the weights; set student.weight_bits (the "
                    "budget replaces its width layer by layer), or remove the budget."
                )


def _check_gram(fa_method, fa_norm, name="fa_method"):
    if fa_method == "gram" and fa_norm != "fro2":
        raise OptionError(
            f"{name}='gram' evaluates fa_norm='fro2' only; fa_norm={fa_norm!r} needs 'pairwise' or 'auto'.",
            f'distill.{name}="gram" evaluates fa_norm "fro2" only; set distill.{name} to "auto" or "pairwise" '
            f"for fa_norm {json.dumps(fa_norm)}.",
        )


@dataclasses.dataclass(frozen=True)
class DistillOptions(Record):
    """The config's `distill`, and the `Distiller`'s loss: alpha*KD + beta*sum FA + gamma*CE."""

    alpha: float = number(1.0, 0.0, MAX_WEIGHT, "weight of the KD term")
    beta: float | None = number(
        None,
        0.0,
        MAX_WEIGHT,
        "weight of the FA term, summed over the taps",
        null="the default of {section}fa_norm",
    )
    gamma: float = number(
        0.0, 0.0, MAX_WEIGHT, "weight of the cross-entropy on labels; 0: label-free"
    )
    kd: str = choice(
        "mse", KD, "KD on logits: MSE (end to end) or the temperature-scaled KL (fine-tuning)"
    )
    # logits / T overflows float32 for tiny T; T^2 scales the KL down to nothing.
    temperature: float = number(1.0, 0.05, 100.0, "the KL's softmax temperature (scaled by T^2)")
    fa: str | None = choice(
        "exact", (*FA, None), "exact FA, fast FA (FFA, `ffa_k` probes), or null: KD only"
    )
    fa_norm: str = choice("fro2", FA_NORMS, "`fro2`: eq. (6); `l1`: the authors' code")
    ffa_k: int = integer(15, 1, MAX_PIXELS, "random probes of FFA")
    fa_method: str = choice("auto", FA_METHODS, "how exact FA is evaluated (`gram`: fro2 only)")
    teacher_layers: list | None = _layer_names(
        "the teacher's tapped layers; null: its stage outputs"
    )
    student_layers: list | None = _layer_names(
        "the student's tapped layers, paired in order; null: its stage outputs"
    )

    def check(self):
        _check_gram(self.fa_method, self.fa_norm)

    @property
    def fa_weight(self) -> float:
        """`beta`, or the measured default of `fa_norm` when it is None (`DEFAULT_BETA`)."""
        return DEFAULT_BETA[self.fa_norm] if self.beta is None else float(self.beta)


@dataclasses.dataclass(frozen=True)
class TuneOptions(Record):
    """The config's `tune`: the keras-tuner search over the loss weights (`--tune`)."""

    trials: int = integer(10, 1, 100_000, "trials of the search (`--trials` overrides it)")
    epochs: int = integer(1, 1, MAX_EPOCHS, "training epochs of a trial")
    tuner: str = choice("random", names.TUNERS, "keras-tuner's search")
    tune_fa: bool = boolean(True, "also search FA on or off")


@dataclasses.dataclass(frozen=True)
class RunOptions(Record):
    """A whole config: its sections, the distribution strategy, the output folder and the seed."""

    dataset: DatasetOptions = record(DatasetOptions, "the data", required=True)
    teacher: TeacherOptions = record(TeacherOptions, "the teacher")
    student: StudentOptions = record(StudentOptions, "the student")
    distill: DistillOptions = record(DistillOptions, "the distillation loss")
    train: DistillTrainOptions = record(DistillTrainOptions, "the distillation's training")
    tune: TuneOptions = record(TuneOptions, "the loss-weight search")
    strategy: str = choice(
        "default", names.STRATEGIES, "one device, all local GPUs, or several machines (TF_CONFIG)"
    )
    output_dir: str = string(
        "saved_models/run", "where the run writes its models, histories and results", nonempty=True
    )
    seed: int = integer(0, 0, 2**32 - 1, "seed of the weights, the data order and the FFA probes")

    def check(self):
        if self.distill.gamma > 0 and not self.dataset.labels:
            raise OptionError(
                "distill.gamma > 0 needs labels; set dataset.labels to true or distill.gamma to 0 (label-free)."
            )


# --- one argument at a time, for the functions and Keras losses that take them one by one


def _check(option: str, value, name: str):
    return DistillOptions.specs()[option].validate(value, name)


def check_kd(kd: str, name: str = "kd") -> str:
    return _check("kd", kd, name)


def check_fa(fa: str | None, name: str = "fa", allow_none: bool = True) -> str | None:
    if fa is None and not allow_none:
        raise OptionError(f"{name}=None is not supported; use one of 'exact', 'fast'.")
    return _check("fa", fa, name)


def check_fa_norm(fa_norm: str, name: str = "fa_norm") -> str:
    """`fa_norm` if it is a norm of `FA_NORMS`.

    >>> check_fa_norm("l1")
    'l1'
    """
    return _check("fa_norm", fa_norm, name)


def check_fa_method(fa_method: str, fa_norm: str = "fro2", name: str = "fa_method") -> str:
    """`fa_method` if it can evaluate `fa_norm` (checked too)."""
    check_fa_norm(fa_norm)
    _check("fa_method", fa_method, name)
    _check_gram(fa_method, fa_norm, name)
    return fa_method


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """A temperature as `DistillOptions.temperature` allows, as a float (the KL divides the logits by it)."""
    return float(_check("temperature", temperature, name))


def check_k(k: int, name: str = "k") -> int:
    """The number of FFA probes, as `DistillOptions.ffa_k` allows."""
    return int(_check("ffa_k", k, name))


def check_seed(seed: int | None, name: str = "seed") -> int | None:
    """`seed` as an int, or None."""
    if seed is not None and not is_integer(seed):
        raise OptionError(f"{name}={seed!r} is not supported; use an int or None.")
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
        warnings.warn(
            f"{owner}: the argument {old!r} is now called {new!r}; the old name will go in a later release.",
            DeprecationWarning,
            stacklevel=3,
        )
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
