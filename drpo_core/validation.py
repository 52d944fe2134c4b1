"""Pydantic validation errors as one line naming the key, shared by the run config and plugin options."""

from __future__ import annotations

import difflib
import math
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from drpo_core.errors import ConfigError


def describe(error: ValidationError, model: type[BaseModel], first: Any = None) -> tuple[list[str], str]:
    """An error's location (key path) and message, with "did you mean" for a misspelled key; ``first``
    picks one of ``error.errors()`` (default: the first)."""
    first = first or error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key" + _suggestion(model, loc)
    elif first["type"] == "missing":
        message = "required field is missing"
    elif "input" in first and first["type"] not in ("value_error",):
        message += f" (got {first['input']!r})"
    return loc, message


def validate_model(model: type[BaseModel], data: dict[str, Any], where: str) -> BaseModel:
    """Validate a component's options; errors name ``where.key``. The run config's rules hold for every
    plugin's options too: no non-finite float anywhere, no boolean where a number goes."""
    for key, value in data.items():
        _check_value(model, key, value, f"{where}.{key}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        loc, message = describe(error, model)
        raise ConfigError(f"{'.'.join([where, *loc])}: {message}") from None


def _check_value(model: type[BaseModel], key: str, value: Any, dotted: str) -> None:
    if isinstance(value, bool):
        field = getattr(model, "model_fields", {}).get(key)
        if field is not None and _numbers_only(field.annotation):
            raise ConfigError(f"{dotted}: expected a number, got a boolean ({value})")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{dotted}: must be a finite number (got {value})")
    elif isinstance(value, dict):
        for inner, item in value.items():
            _check_value(BaseModel, str(inner), item, f"{dotted}.{inner}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(BaseModel, str(index), item, f"{dotted}.{index}")


def _numbers_only(annotation: Any) -> bool:
    """``int``, ``float`` or an optional one: a field where ``true`` would silently count as 1."""
    types = set(get_args(annotation)) if get_origin(annotation) in (Union, UnionType) else {annotation}
    types.discard(type(None))
    return bool(types) and types <= {int, float}


def _suggestion(model: type[BaseModel], loc: list[str]) -> str:
    """``did you mean ...`` for a misspelled key, looking up the model the key sits in."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            break
        annotation = fields[part].annotation
        current = getattr(annotation, "__args__", (annotation,))[0] if not hasattr(
            annotation, "model_fields") else annotation
    known = list(getattr(current, "model_fields", {}))
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
