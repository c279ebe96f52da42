"""What every section of the experiment file shares: the frozen, strict spec base (numbers are
numbers, unknown keys refused), paths resolved against the file's folder, timezones, radial units.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

RADIAL_UNITS = ("2th_deg", "q_A^-1")
RadialUnit = Literal["2th_deg", "q_A^-1"]


def did_you_mean(name: str, choices, cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"``, the closest of ``choices`` to a misspelt ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean {close[0]!r}?" if close else ""


class Spec(BaseModel):
    """The base of every section: frozen, unknown keys refused, numbers strict."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # numbers are numbers: npt = "2000" is an error (pydantic's strict mode for numbers)
        return strict_numbers(cls, value, info)


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Resolve a relative path against the experiment file's folder (from the context)."""
    if value is None:
        return None
    base = (info.context or {}).get("base", Path.cwd())
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else (Path(base) / p)


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown timezone {value!r}; expected an IANA name such as 'Europe/London' or 'UTC'"
        ) from None
    return value


def _existing(value: Any, info: ValidationInfo) -> Any:
    p = resolve_path(value, info)
    if p is not None and not Path(p).exists():
        raise ValueError(f"no such file: {str(p)!r}")
    return p


#: a path resolved against the experiment file's folder
ResolvedPath = Annotated[Path, BeforeValidator(resolve_path)]
#: the same, which must exist
ExistingPath = Annotated[Path, BeforeValidator(_existing)]
#: an IANA timezone name
Timezone = Annotated[str, AfterValidator(_check_timezone)]


def _number_type(annotation: Any) -> tuple[type, bool] | None:
    """``(int or float, is_sequence)`` when a field holds a number, an optional number, or a
    tuple or list of numbers; else None."""
    if annotation in (int, float):
        return annotation, False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _number_type(inner[0]) if len(inner) == 1 else None
    if origin in (tuple, list) and args:
        kinds = {a for a in args if a is not Ellipsis}
        if kinds and kinds <= {int, float}:
            return (int if kinds == {int} else float), True
    return None


def strict_numbers(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """Refuse a string or a boolean where the field ``info.field_name`` of ``model`` takes a
    number (pydantic's strict mode for numbers: ``npt = "2000"`` is an error, not 2000), with
    pydantic's own error type, so that it is reported as every other wrong type."""
    field = model.model_fields.get(info.field_name or "")
    kind = _number_type(field.annotation) if field is not None else None
    if kind is None:
        return value
    typ, sequence = kind
    what = "integer" if typ is int else "number"
    if sequence:
        if isinstance(value, (list, tuple)) and any(isinstance(v, (str, bool)) for v in value):
            raise PydanticCustomError("value_error", "expected {what}s, got {value}",
                                      {"what": what, "value": repr(list(value))})
        return value
    if isinstance(value, (str, bool)):
        raise PydanticCustomError(f"{'int' if typ is int else 'float'}_type",
                                  f"Input should be a valid {what} (not {'a string' if isinstance(value, str) else 'a boolean'})")
    return value
