"""Pydantic validation errors as one line naming the key, shared by the run config and plugin options."""

from __future__ import annotations

import difflib
from typing import Any

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
    """Validate a component's options; errors name ``where.key``."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        loc, message = describe(error, model)
        raise ConfigError(f"{'.'.join([where, *loc])}: {message}") from None


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
