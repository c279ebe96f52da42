"""Error translation: a pydantic validation error into ``(key path, message)`` in the words of the
experiment file: what was expected, the valid keys and the closest one ("did you mean").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .base import did_you_mean
from .inputs import TAGS

_SECTION_HINTS: dict[str, str] = {}      # sections of later versions: name -> what they are


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The valid keys of the table at ``loc`` (used for 'did you mean')."""
    current: Any = model
    for part in loc:
        if part in TAGS or isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [k for k, f in current.model_fields.items() if not f.exclude]
    return None


def _model_in(annotation: Any) -> Any:
    """The first BaseModel inside an annotation such as ``X | None`` or a tagged union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        return _model_in(origin)
    return None


def describe(err: dict[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    """``(key path, message)`` for one pydantic error of validating ``root`` (the experiment)."""
    loc = tuple(p for p in err["loc"] if p not in TAGS)
    key = ".".join(str(p) for p in loc)
    etype = err["type"]
    if etype == "extra_forbidden":
        name = str(loc[-1]) if loc else ""
        valid = _fields_at(root, loc[:-1]) or []
        if len(loc) == 1 and name in _SECTION_HINTS:
            return key, (
                f"the [{name}] section ({_SECTION_HINTS[name]}) is not supported by this version "
                "of xrdpipe yet"
            )
        hint = did_you_mean(name, valid)
        where = f"[{'.'.join(str(p) for p in loc[:-1])}]" if len(loc) > 1 else "the top level"
        return key, f"unknown key{hint} (valid keys in {where}: {', '.join(valid)})"
    if etype == "missing":
        return key, "required key is missing"
    if etype == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return key, f"expected {expected}, got {err.get('input')!r}"
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if etype not in ("value_error", "times_kind", "background_kind") and "input" in err and not isinstance(
        err["input"], (dict, list)
    ):
        msg = f"{msg[0].lower()}{msg[1:]}, got {err['input']!r}"
    return key, msg
