"""The JSON run configuration: one schema, defaults, and one-line errors.

A config names the data, the teacher, the student, the FAQD loss, the training schedule and
where the outputs go. Every key has a default but `dataset.source`; unknown keys, wrong types
and out-of-range values raise `ConfigError` naming the key and what is allowed.

>>> config = resolve({"dataset": {"source": "idx:/data/fmnist"}, "student": {"weight_bits": 2}})
>>> config["student"]["weight_bits"], config["distill"]["fa_norm"], config["distill"]["beta"]
(2, 'fro2', None)
>>> resolve({"dataset": {"source": "idx:x"}, "train": {"epoch": 3}})
Traceback (most recent call last):
...
faqd_tf.config.ConfigError: config: unknown key 'train.epoch'; keys of 'train' are: batch_size, epochs, global_clipnorm, lr, momentum, nesterov, optimizer, schedule, steps_per_epoch, warmup_epochs, weight_decay
"""

import copy
import json
import math
import os

from faqd_tf import inputs, options
from faqd_tf.options import AUGMENTATIONS, SUPPORTED_BITS


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key."""


REQUIRED = object()


class Field:
    """One config value: its default, an allowed-values check, and how to describe it."""

    def __init__(self, default, check, allowed):
        self.default, self.check, self.allowed = default, check, allowed


def _is_num(v):
    # Finite: JSON's Infinity, NaN and 1e999 (inf) are no learning rate or weight.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def string(default=REQUIRED, nullable=False, nonempty=False):
    def check(v):
        return (nullable and v is None) or (isinstance(v, str) and not (nonempty and not v.strip()))

    return Field(default, check, ("a non-empty string" if nonempty else "a string") + (" or null" if nullable else ""))


def choice(default, options):
    return Field(default, lambda v: v in options, "one of " + ", ".join(json.dumps(o) for o in options))


def integer(default, low, high, nullable=False):
    def check(v):
        return (nullable and v is None) or (options.is_integer(v) and low <= v <= high)

    return Field(default, check, f"an integer >= {low} and <= {high}" + (" or null" if nullable else ""))


def number(default, low=0.0, high=None, strict=False):
    """A finite number >= `low` (> `low` if `strict`) and <= `high` when given."""

    def check(v):
        if not _is_num(v):
            return False
        return (v > low if strict else v >= low) and (high is None or v <= high)

    bound = f"> {low}" if strict else f">= {low}"
    return Field(default, check, f"a number {bound}" + (f" and <= {high}" if high is not None else ""))


def optional_number(low, high, strict=False, null="null", note=""):
    """null (`null` says what it stands for) or a number as `number(low, high, strict)` allows."""
    allowed = number(None, low, high, strict).check
    show = lambda x: f"{x:g}".replace("e+0", "e")  # 0, 1e6: as a user writes them
    return Field(None, lambda v: v is None or allowed(v),
                 f"{null} or a number {'>' if strict else '>='} {show(low)} and <= {show(high)}{note}")


def boolean(default):
    return Field(default, lambda v: isinstance(v, bool), "true or false")


def names(default=None):
    return Field(
        default,
        lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)),
        "null or a list of layer names",
    )


BITS = choice(None, [None, *SUPPORTED_BITS])

LAYER_BITS = Field(
    None,
    lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and k and BITS.check(b) for k, b in v.items())),
    'null or {"layer name or regex": 1, 2, 4, 8 or null, ...}',
)


def bits(default):
    return Field(default, BITS.check, "one of 1, 2, 4, 8 or null (full precision)")


# Sane ceilings: beyond them a value is a typo, and would fail deep inside training instead.
MAX_EPOCHS = 100_000
MAX_STEPS = 10**9
MAX_EXAMPLES = 2**31 - 1
MAX_RECALIBRATION = 100_000


def _train_schema(epochs, lr):
    return {
        "epochs": integer(epochs, 1, MAX_EPOCHS),
        "batch_size": integer(128, 1, 2**16),
        "optimizer": choice("sgd", ["sgd", "adam"]),
        "lr": number(lr, strict=True, high=10.0),
        "momentum": number(0.9, high=1.0),
        "nesterov": boolean(True),
        "schedule": choice("cosine", ["cosine", "constant"]),
        "warmup_epochs": integer(0, 0, MAX_EPOCHS),
        "weight_decay": number(1e-4, high=1.0),
        # The authors' full-quantization script clips the global gradient norm (at 20 for their
        # batch-summed losses); null: no clipping.
        "global_clipnorm": optional_number(0, 1e6, strict=True),
        "steps_per_epoch": integer(None, 1, MAX_STEPS, nullable=True),
    }


SCHEMA = {
    "dataset": {
        "source": string(),
        "data_dir": string(None, nullable=True),
        "labels": boolean(False),
        # Scored after every epoch of the training stages; null: none (the evaluate stage scores the test split).
        "validation_split": choice("test", ["test", "validation", None]),
        "limit": integer(None, 1, MAX_EXAMPLES, nullable=True),
        "eval_limit": integer(None, 1, MAX_EXAMPLES, nullable=True),
        "augment": choice(None, [None, True, False, *AUGMENTATIONS]),
        "image_size": Field(
            None,
            lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(options.is_integer(n) and 0 < n <= 4096 for n in v)),
            "null or [height, width] of 1 to 4096 pixels each",
        ),
    },
    "teacher": {
        "arch": string("resnet20", nullable=True),
        "file": string(None, nullable=True),
        "train": _train_schema(200, 0.1),
    },
    "student": {
        "arch": string(None, nullable=True),
        "file": string(None, nullable=True),
        "init": choice("teacher", ["teacher", "file", "scratch"]),
        "weight_bits": bits(4),
        "activation_bits": bits(None),
        "per_channel": boolean(False),
        # Per-layer weight widths over weight_bits (faqd_tf.quantize_model's layer_bits), e.g. {"stem_conv": 8}.
        "layer_bits": LAYER_BITS,
        "relax": optional_number(0, 1e6, strict=True, note=" (initial BinaryRelax lambda)"),
        "relax_eta": number(1.02, low=1.0, high=10.0, strict=True),
        "two_step": boolean(True),
        "alpha_rate": number(0.01, strict=True),
        # After distilling, re-estimate the student's BatchNormalization statistics on this many
        # unlabeled training images (faqd_tf.recalibrate_batchnorm): at 2 bits the moving averages
        # of the last epochs lag the weights by up to 1.7 points. null: keep them. The images are
        # held in memory, hence the ceiling.
        "recalibrate_bn": integer(None, 1, MAX_RECALIBRATION, nullable=True),
    },
    "distill": {
        "alpha": number(1.0, high=1e6),
        # null: the measured default of fa_norm (faqd_tf.options.DEFAULT_BETA).
        "beta": optional_number(0, 1e6, null="null (the default of distill.fa_norm)"),
        "gamma": number(0.0, high=1e6),
        "kd": choice("mse", list(options.KD)),
        # logits / T overflows float32 for tiny T; T^2 scales the KL down to nothing.
        "temperature": number(1.0, low=0.05, high=100.0),
        "fa": choice("exact", [*options.FA, None]),
        "fa_norm": choice("fro2", list(options.FA_NORMS)),
        "ffa_k": integer(15, 1, 4096),
        "fa_method": choice("auto", list(options.FA_METHODS)),
        "teacher_layers": names(),
        "student_layers": names(),
    },
    "train": _train_schema(200, 0.01),
    "tune": {
        "trials": integer(10, 1, 100_000),
        "epochs": integer(1, 1, MAX_EPOCHS),
        "tuner": choice("random", ["random", "bayesian", "hyperband"]),
        "tune_fa": boolean(True),
    },
    "strategy": choice("default", ["default", "mirrored", "multi_worker"]),
    "output_dir": string("saved_models/run", nonempty=True),
    "seed": integer(0, 0, 2**32 - 1),
}


def _resolve(schema, given, prefix):
    if not isinstance(given, dict):
        where = f"'{prefix}'" if prefix else "the config"
        raise ConfigError(f"config: {where} must be a JSON object, got {inputs.describe(given)}.")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        key = inputs.shorten(f"{prefix}.{unknown[0]}" if prefix else unknown[0])
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(f"config: unknown key '{key}'; keys of {where} are: {', '.join(sorted(schema))}")
    out = {}
    for name, spec in schema.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(spec, dict):
            out[name] = _resolve(spec, given.get(name, {}), key)
            continue
        if name not in given:
            if spec.default is REQUIRED:
                raise ConfigError(f"config: '{key}' is required ({spec.allowed}).")
            out[name] = copy.deepcopy(spec.default)
            continue
        value = given[name]
        if not spec.check(value):
            raise ConfigError(f"config: {key}={inputs.describe(value)} is not valid; use {spec.allowed}.")
        out[name] = value
    return out


def resolve_section(section: str, given: dict) -> dict:
    """One section of the schema (e.g. ``"train"``) checked and filled in with defaults.

    >>> resolve_section("train", {"epochs": 3})["lr"]
    0.01
    """
    if section not in SCHEMA or not isinstance(SCHEMA[section], dict):
        sections = ", ".join(k for k, v in SCHEMA.items() if isinstance(v, dict))
        raise ConfigError(f"config: no section '{section}'; sections are: {sections}")
    return _resolve(SCHEMA[section], given, section)


def resolve(config: dict) -> dict:
    """The complete config: `config` (a dict) checked and filled in with defaults."""
    out = _resolve(SCHEMA, config, "")
    student, teacher = out["student"], out["teacher"]
    if student["init"] == "file" and not student["file"]:
        raise ConfigError("config: student.init='file' needs student.file, the FP model to quantize.")
    if teacher["arch"] is None and teacher["file"] is None:
        raise ConfigError("config: give teacher.arch (to train a teacher) or teacher.file (a trained .keras model).")
    distill = out["distill"]
    if distill["fa_method"] == "gram" and distill["fa_norm"] != "fro2":
        raise ConfigError(
            f"config: distill.fa_method=\"gram\" evaluates fa_norm \"fro2\" only; set distill.fa_method to "
            f"\"auto\" or \"pairwise\" for fa_norm {json.dumps(distill['fa_norm'])}."
        )
    if out["distill"]["gamma"] > 0 and not out["dataset"]["labels"]:
        raise ConfigError(
            "config: distill.gamma > 0 needs labels; set dataset.labels to true or distill.gamma to 0 (label-free)."
        )
    return out


def _parse_override(item):
    if "=" not in item:
        raise ConfigError(f"--set {inputs.shorten(repr(item))}: write KEY=VALUE, e.g. --set train.epochs=5.")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = inputs.loads_json(raw, f"--set {inputs.shorten(key)}")
    except json.JSONDecodeError:
        value = raw  # a bare string such as --set dataset.source=idx:/data
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return key, value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Sets `section.key=value` items (values parsed as JSON when they parse) on a raw config."""
    if not isinstance(config, dict):
        raise ConfigError(f"config: the config must be a JSON object, got {inputs.describe(config)}.")
    config = copy.deepcopy(config)
    for item in overrides or ():
        key, value = _parse_override(item)
        node, schema = config, SCHEMA
        parts = key.split(".")
        shown = inputs.shorten(key)
        for depth, part in enumerate(parts):
            if not isinstance(schema, dict) or part not in schema:
                where = inputs.shorten(".".join(parts[:depth])) or "the top level"
                allowed = ", ".join(sorted(schema)) if isinstance(schema, dict) else "none"
                raise ConfigError(f"--set {shown}: unknown key '{shown}'; keys of {where} are: {allowed}")
            schema = schema[part]
            if depth == len(parts) - 1:
                if isinstance(schema, dict):
                    raise ConfigError(f"--set {shown}: '{shown}' is a section; set one of its keys, e.g. {shown}.{next(iter(schema))}.")
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    section = ".".join(parts[: depth + 1])
                    raise ConfigError(
                        f"--set {shown}: '{section}' is {inputs.describe(node)} in the config file, not an object; "
                        f"fix the file or set the whole section, e.g. --set {section}={{}}."
                    )
    return config


def shipped() -> str:
    """The folder of the configs shipped with faqd-tf: the package data of an installed wheel,
    or the repository's ``configs/``."""
    package = os.path.dirname(os.path.abspath(__file__))
    folder = os.path.join(package, "configs")
    if not os.path.isdir(folder):  # a source checkout: configs/ sits next to the package
        folder = os.path.join(os.path.dirname(package), "configs")
    return folder


def shipped_names() -> list[str]:
    """The names of the shipped configs (``quickstart``, ``cifar10``, ...)."""
    return sorted(n[: -len(".json")] for n in os.listdir(shipped()) if n.endswith(".json"))


def find(name: str) -> str:
    """The config file `name`: a path, or else the name of a shipped config.

    >>> os.path.basename(find("quickstart"))
    'quickstart.json'
    """
    if os.path.exists(name) or os.sep in name:
        return name
    candidate = os.path.join(shipped(), name if name.endswith(".json") else name + ".json")
    return candidate if os.path.isfile(candidate) else name


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Reads, overrides and resolves a JSON config file (a path, or a shipped config's name)."""
    path = find(os.fspath(path))
    shown = inputs.shorten(path, inputs.PATH_CHARS)
    if not os.path.isfile(path):
        state = "is a directory" if os.path.isdir(path) else "does not exist"
        raise ConfigError(
            f"config file {shown} {state}; pass --config with a JSON file or the name of a shipped config "
            f"({', '.join(shipped_names())})."
        )
    try:
        raw = inputs.loads_json(inputs.read_text(path, "config file"), f"config file {shown}")
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {shown} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return resolve(apply_overrides(raw, overrides))
