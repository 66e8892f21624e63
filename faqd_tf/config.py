"""The JSON run configuration: one schema, defaults, and one-line errors.

A config names the data, the teacher, the student, the FAQD loss, the training schedule and
where the outputs go. Every key has a default but `dataset.source`; unknown keys, wrong types
and out-of-range values raise `ConfigError` naming the key and what is allowed. The keys, their
defaults, ranges and docs are the fields of `faqd_tf.options.RunOptions` (docs/config.md lists
them: `markdown()`).

>>> config = resolve({"dataset": {"source": "idx:/data/fmnist"}, "student": {"weight_bits": 2}})
>>> config["student"]["weight_bits"], config["distill"]["fa_norm"], config["distill"]["beta"]
(2, 'fro2', None)
>>> resolve({"dataset": {"source": "idx:x"}, "train": {"epoch": 3}})
Traceback (most recent call last):
...
faqd_tf.config.ConfigError: config: unknown key 'train.epoch'; keys of 'train' are: batch_size,
epochs, global_clipnorm, lr, momentum, nesterov, optimizer, schedule, steps_per_epoch,
teacher_cache, warmup_epochs, weight_decay
"""

import copy
import dataclasses
import json
import os

from faqd_tf import fields, inputs
from faqd_tf.fields import OptionError
from faqd_tf.options import RunOptions


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key."""


SCHEMA = fields.schema(RunOptions)
"""The config's keys: a `faqd_tf.fields.Spec` each, a section's as a dict of its own."""

_SECTIONS = {
    name: spec.record for name, spec in RunOptions.specs().items() if spec.kind == "record"
}


def _build(record, given, prefix):
    """The `record` of the config section `given` (at key `prefix`), its subsections built first."""
    if not isinstance(given, dict):
        where = f"'{prefix}'" if prefix else "the config"
        raise ConfigError(f"config: {where} must be a JSON object, got {inputs.describe(given)}.")
    specs = record.specs()
    unknown = sorted(set(given) - set(specs))
    if unknown:
        key = inputs.shorten(f"{prefix}.{unknown[0]}" if prefix else unknown[0])
        where = f"'{prefix}'" if prefix else "the top level"
        raise ConfigError(
            f"config: unknown key '{key}'; keys of {where} are: {', '.join(sorted(specs))}"
        )
    values = {}
    for name, spec in specs.items():
        key = f"{prefix}.{name}" if prefix else name
        if spec.kind == "record":
            values[name] = _build(spec.record, given.get(name, {}), key)
        elif name in given:
            values[name] = given[name]
        elif spec.required:
            raise ConfigError(f"config: '{key}' is required ({spec.allowed('json', prefix)}).")
    try:
        return record(**values)
    except OptionError as err:
        raise ConfigError(err.for_config(prefix)) from None


def _plain(options):
    # A JSON-ready copy: the resolved config is written to config.json as it is.
    return copy.deepcopy(dataclasses.asdict(options))


def resolve_section(section: str, given: dict) -> dict:
    """One section of the schema (e.g. ``"train"``) checked and filled in with defaults.

    >>> resolve_section("train", {"epochs": 3})["lr"]
    0.01
    """
    if section not in _SECTIONS:
        raise ConfigError(f"config: no section '{section}'; sections are: {', '.join(_SECTIONS)}")
    return _plain(_build(_SECTIONS[section], given, section))


def resolve(config: dict) -> dict:
    """The complete config: `config` (a dict) checked and filled in with defaults."""
    return _plain(_build(RunOptions, config, ""))


def markdown() -> str:
    """docs/config.md: every key of the config, its default, what it allows and what it does."""
    rows = fields.markdown(RunOptions)
    return "\n".join(
        [
            "# Config keys",
            "",
            "Generated from the option records of `faqd_tf/options.py` by `faqd_tf.config.markdown()`;",
            "tests/test_config.py checks that it is current. A key left out takes its default.",
            "",
            "| key | default | allowed | meaning |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )


def _parse_override(item):
    if "=" not in item:
        raise ConfigError(
            f"--set {inputs.shorten(repr(item))}: write KEY=VALUE, e.g. --set train.epochs=5."
        )
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
        raise ConfigError(
            f"config: the config must be a JSON object, got {inputs.describe(config)}."
        )
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
                raise ConfigError(
                    f"--set {shown}: unknown key '{shown}'; keys of {where} are: {allowed}"
                )
            schema = schema[part]
            if depth == len(parts) - 1:
                if isinstance(schema, dict):
                    raise ConfigError(
                        f"--set {shown}: '{shown}' is a section; set one of its keys, "
                        f"e.g. {shown}.{next(iter(schema))}."
                    )
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
        raise ConfigError(
            f"config file {shown} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})."
        ) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return resolve(apply_overrides(raw, overrides))
