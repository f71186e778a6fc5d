"""Settings as dataclass fields, one list for the flags, the recipe keys and the validation.

A field made with `setting(...)` carries in its metadata its --help text, what a valid value is
(a `Check`) and how its flag parses; `add_flags` builds the argparse options from the fields
(every help line ends with the default), `given` reads back the flags that were passed (those
left out stay None, so they do not override a recipe), and `validate` checks every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sku.errors import SkuError


@dataclass(frozen=True)
class Check:
    ok: Callable[[Any], bool]
    what: str  # completes "NAME VALUE: …", e.g. "a positive integer"


def _is_int(v) -> bool:
    """An int that fits 64 bits: torch takes seeds and sizes as C integers, and a larger one
    fails deep inside it (after the model has loaded) or never ends."""
    return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63


def _is_number(v) -> bool:
    """A finite int or float: no setting means anything at NaN or ±inf (--scale inf). An int
    beyond 64 bits is refused too (math.isfinite would raise on one past a float's range)."""
    return (isinstance(v, float) and math.isfinite(v)) or _is_int(v)


POSITIVE_INT = Check(lambda v: _is_int(v) and v > 0, "a positive integer")
NON_NEGATIVE_INT = Check(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
INT = Check(_is_int, "an integer")
POSITIVE_NUMBER = Check(lambda v: _is_number(v) and v > 0, "a positive number")
NON_NEGATIVE_NUMBER = Check(lambda v: _is_number(v) and v >= 0, "a non-negative number")
NUMBER = Check(_is_number, "a number")
BOOL = Check(lambda v: isinstance(v, bool), "true or false")
# Every text setting is a path, an id, a name or a URL: an empty one ("" is the current
# folder to pathlib) is a mistake, not a choice.
TEXT = Check(lambda v: v is None or isinstance(v, str) and bool(v.strip()), "a non-empty string")


def one_of(*values) -> Check:
    return Check(lambda v: v in values, "expected one of " + ", ".join(map(str, values)))


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check.ok(v), f"{check.what}, or unset")


def setting(default=dataclasses.MISSING, help: str = "", *, check: Check | None = None,
            factory: Callable[[], Any] | None = None, shown: str | None = None,
            **flag) -> Any:
    """A field with its --help line, its Check, and argparse extras (`type`, `choices`,
    `nargs`, `metavar`, `action`, `flag` for another flag name, `consts` for flags that each
    store one value, whose help may name it as {value}). `shown` replaces the default in the
    help line; `factory` is a default_factory. Every setting has a Check: `validate` checks
    them all before a command starts its work."""
    if check is None:
        raise TypeError(f"setting {help!r}: give it a check (sku.settings.Check)")
    metadata = {"help": help, "check": check, "shown": shown, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _shown(value, flag: dict) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return (" " if "nargs" in flag else ",").join(map(str, value)) or "none"
    if isinstance(flag.get("choices"), dict):  # a value shown by its flag's name for it
        return next(k for k, v in flag["choices"].items() if v == value)
    return "none" if value is None else str(value)


def fields(cls, only: Iterable[str] | None = None) -> list[dataclasses.Field]:
    chosen = None if only is None else set(only)
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata
            and (chosen is None or f.name in chosen)]


def add_flags(parser, cls, *, only: Iterable[str] | None = None,
              required: Iterable[str] = (), help: dict[str, str] | None = None) -> None:
    """One option per setting of `cls` (or those named in `only`), defaulting to None."""
    required, help = set(required), help or {}
    for field in fields(cls, only):
        meta, flag = field.metadata, dict(field.metadata["flag"])
        default = _default(field)
        text = help.get(field.name, meta["help"])
        if (field.name not in required and field.name not in help
                and default is not dataclasses.MISSING and flag.get("action") != "store_true"):
            text += f" (default: {meta['shown'] or _shown(default, flag)})"
        name = flag.pop("flag", "--" + field.name.replace("_", "-"))
        consts = flag.pop("consts", None)
        if consts:  # one flag per value, e.g. --load-in-4bit / --load-in-8bit
            group = parser.add_mutually_exclusive_group()
            for option, value in consts.items():
                group.add_argument(option, dest=field.name, action="store_const", const=value,
                                   help=text.replace("{value}", value))
            continue
        if isinstance(default, bool) and "choices" not in flag:
            flag.setdefault("action", argparse.BooleanOptionalAction)
        elif "type" not in flag and "choices" not in flag and _is_number(default):
            flag["type"] = type(default)
        if isinstance(flag.get("choices"), dict):
            flag["choices"] = list(flag["choices"])
        parser.add_argument(name, dest=field.name, default=None, help=text,
                            required=field.name in required, **flag)


def given(cls, args: argparse.Namespace, only: Iterable[str] | None = None) -> dict:
    """The settings of `cls` passed as flags, as field values."""
    values = {}
    for field in fields(cls, only):
        value = getattr(args, field.name, None)
        choices = field.metadata["flag"].get("choices")
        if value is not None:
            values[field.name] = choices[value] if isinstance(choices, dict) else value
    return values


def validate(obj) -> None:
    """Every setting of a dataclass instance against its Check: one line naming the first
    that fails."""
    for field in fields(type(obj)):
        check, value = field.metadata["check"], getattr(obj, field.name)
        if not check.ok(value):
            beyond = isinstance(value, int) and not -2**63 <= value < 2**63
            raise SkuError(f"{field.name} {value!r}: {check.what}"
                           + (" (of 64 bits)" if beyond else ""))
