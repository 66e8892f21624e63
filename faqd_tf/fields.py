"""Typed option records: frozen dataclasses whose every field carries its type, default, bounds and
doc (a `Spec`), checked once when the record is made (and again by `dataclasses.replace`).

A bad value is an `OptionError`: one line naming the option and what to use, in Python's words for
keyword arguments, in JSON's for a config file (`OptionError.for_config`). The module loads no
TensorFlow.

>>> @dataclasses.dataclass(frozen=True)
... class Schedule(Record):
...     epochs: int = integer(10, 1, 1000, "passes over the data")
...     lr: float = number(0.1, 0.0, 10.0, "the learning rate", strict=True)
>>> Schedule(epochs=3)
Schedule(epochs=3, lr=0.1)
>>> dataclasses.replace(Schedule(), lr=0)
Traceback (most recent call last):
...
faqd_tf.fields.OptionError: lr=0 is not supported; use a finite number > 0.0 and <= 10.0.
>>> Schedule.specs()["epochs"].allowed("json")
'an integer >= 1 and <= 1000'
"""

import dataclasses
import json
import math
import numbers
from collections.abc import Callable

import numpy as np

from faqd_tf import inputs

REQUIRED = dataclasses.MISSING
"""The default of an option that has none: it must be given."""


def is_integer(value) -> bool:
    """Whether `value` is an integer (a Python or NumPy int, not a bool): the package's one integer check.

    >>> is_integer(3), is_integer(np.int64(3)), is_integer(True), is_integer(3.0)
    (True, True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """Whether `value` is a finite real number, not a bool (JSON's Infinity and NaN are neither
    a learning rate nor a weight)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _show(x):
    # A bound as a user writes it: 0.0, 0.05, 10.0, 1e6.
    if isinstance(x, float) and abs(x) >= 1e5:
        return f"{x:g}".replace("e+0", "e").replace("e+", "e")
    return repr(x)


def _python(value):
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python prints
        text = "<a very long integer>"
    return inputs.shorten(text)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one option may be: its kind, default, bounds and doc.

    `kind` is "integer", "number", "choice", "boolean", "string", "record" (a nested record of
    class `record`) or "custom" (`test(value)` decides, `shape` says what it allows, with
    ``{null}`` standing for null or None). `null` says what None stands for, where it is allowed.
    """

    kind: str
    default: object
    doc: str
    low: float | None = None
    high: float | None = None
    strict: bool = False  # low itself is not allowed
    choices: tuple = ()
    nullable: bool = False
    null: str = ""  # "{section}" in it: the config section's prefix (e.g. "distill.") or nothing
    nonempty: bool = False
    test: Callable[[object], bool] | None = None
    shape: str = ""
    record: type | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def accepts(self, value) -> bool:
        if value is None and self.nullable:
            return True
        if self.kind == "integer":
            return is_integer(value) and self.low <= value <= self.high
        if self.kind == "number":
            return (
                is_number(value)
                and (value > self.low if self.strict else value >= self.low)
                and (self.high is None or value <= self.high)
            )
        if self.kind == "choice":
            # Of the same type: true is not 1-bit, 4.0 not 4.
            return any(value is c or (type(value) is type(c) and value == c) for c in self.choices)
        if self.kind == "boolean":
            return isinstance(value, bool)
        if self.kind == "string":
            return isinstance(value, str) and not (self.nonempty and not value.strip())
        if self.kind == "record":
            return isinstance(value, self.record)
        return self.test(value)

    def allowed(self, dialect: str = "python", section: str = "") -> str:
        """What the option allows, in `dialect` "python" (keyword arguments) or "json" (a config
        whose section `section`, e.g. ``"distill"``, holds the option)."""
        as_json = dialect == "json"
        null = "null" if as_json else "None"
        quote = json.dumps if as_json else repr
        or_null = f" or {null}" if self.nullable else ""
        if self.kind == "integer":
            return f"an integer >= {self.low} and <= {self.high}{or_null}"
        if self.kind == "number":
            text = f"{'a number' if as_json else 'a finite number'} {'>' if self.strict else '>='} {_show(self.low)}"
            text += f" and <= {_show(self.high)}" if self.high is not None else ""
            if not self.nullable:
                return text
            meaning = self.null.replace("{section}", f"{section}." if as_json and section else "")
            null += f" ({meaning})" if meaning else ""
            return f"{null} or {text}" if as_json else f"{text}, or {null}"
        if self.kind == "choice":
            return "one of " + ", ".join(quote(c) for c in self.choices)
        if self.kind == "boolean":
            return "true or false" if as_json else "True or False"
        if self.kind == "string":
            return ("a non-empty string" if self.nonempty else "a string") + or_null
        if self.kind == "record":
            return (
                f"an object of the keys of '{section}'" if as_json else f"a {self.record.__name__}"
            )
        return self.shape.replace("{null}", null)

    def validate(self, value, name: str):
        """`value` if the option `name` accepts it, else an `OptionError`."""
        if not self.accepts(value):
            raise OptionError(
                f"{name}={_python(value)} is not supported; use {self.allowed()}.",
                name=name,
                value=value,
                spec=self,
            )
        return value


class OptionError(ValueError):
    """A value an option cannot take, or options that cannot work together: one line naming them
    and what to use. `config` is the line for a config file, where it differs."""

    def __init__(
        self, message: str, config: str | None = None, *, name=None, value=None, spec=None
    ):
        super().__init__(message)
        self.config, self.name, self.value, self.spec = config, name, value, spec

    def for_config(self, section: str) -> str:
        """The line for a config file whose `section` (e.g. ``"teacher.train"``) holds the option."""
        if self.spec is None:
            return f"config: {self.config or self}"
        key = f"{section}.{self.name}" if section else self.name
        return f"config: {key}={inputs.describe(self.value)} is not valid; use {self.spec.allowed('json', section)}."


class Record:
    """The base of an option record: a frozen dataclass whose fields are made by `integer`,
    `number`, `choice`, `boolean`, `string`, `custom` and `record`. Making one checks every field in
    order, then `check` (what involves several fields)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            f.metadata["spec"].validate(getattr(self, f.name), f.name)
        self.check()

    def check(self) -> None:
        """Raises `OptionError` for options that cannot work together."""

    @classmethod
    def specs(cls) -> dict[str, Spec]:
        """The option specs by name, in order."""
        return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}


def _field(spec):
    metadata = {"spec": spec}
    if spec.kind == "record" and not spec.required:
        return dataclasses.field(default_factory=spec.record, metadata=metadata)
    if spec.required:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=spec.default, metadata=metadata)


def integer(default, low: int, high: int, doc: str, nullable: bool = False):
    """An integer from `low` to `high` (or None when `nullable`)."""
    return _field(Spec("integer", default, doc, low=low, high=high, nullable=nullable))


def number(
    default, low: float, high: float | None, doc: str, strict: bool = False, null: str | None = None
):
    """A finite number >= `low` (> `low` if `strict`) and <= `high` when given; with `null`
    (what None stands for, "" for nothing to say), None too."""
    return _field(
        Spec(
            "number",
            default,
            doc,
            low=low,
            high=high,
            strict=strict,
            nullable=null is not None,
            null=null or "",
        )
    )


def choice(default, choices, doc: str):
    """One of `choices` (None among them allows None)."""
    return _field(Spec("choice", default, doc, choices=tuple(choices)))


def boolean(default: bool, doc: str):
    return _field(Spec("boolean", default, doc))


def string(default, doc: str, nullable: bool = False, nonempty: bool = False):
    return _field(Spec("string", default, doc, nullable=nullable, nonempty=nonempty))


def custom(default, test: Callable[[object], bool], shape: str, doc: str):
    """A value `test` accepts; `shape` says which (``{null}``: null, or None in Python)."""
    return _field(Spec("custom", default, doc, test=test, shape=shape))


def record(cls: type, doc: str, required: bool = False):
    """A nested record of class `cls` (a config's subsection), by default `cls()`."""
    return _field(Spec("record", REQUIRED if required else cls, doc, record=cls))


def schema(cls: type) -> dict:
    """The specs of record class `cls` by name, a nested record's as a dict of its own."""
    return {
        name: schema(spec.record) if spec.kind == "record" else spec
        for name, spec in cls.specs().items()
    }


def markdown(cls: type, prefix: str = "") -> list[str]:
    """The table rows (key, default, allowed, meaning) of record class `cls`, a nested record's keys
    under their section's."""
    rows = []
    for name, spec in cls.specs().items():
        key = f"{prefix}.{name}" if prefix else name
        if spec.kind == "record":
            rows += markdown(spec.record, key)
            continue
        default = "required" if spec.required else f"`{json.dumps(spec.default)}`"
        allowed = spec.allowed("json", prefix).replace("|", "\\|")
        rows.append(f"| `{key}` | {default} | {allowed} | {spec.doc} |")
    return rows
