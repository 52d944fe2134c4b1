"""Where a component's model comes from: a local directory or a Hugging Face hub id, and whether the hub
may be reached. Shared by every plugin that loads with ``from_pretrained`` (generators, feature spaces,
rankers), so they resolve paths and report a missing model offline the same way."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from drpo_core.errors import PluginError, first_line

_TRUE = {"1", "ON", "YES", "TRUE"}
Loaded = TypeVar("Loaded")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (in the environment or in huggingface_hub's constants)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve_model(model: str, config_dir: Path, *, where: str = "model path") -> tuple[str, bool]:
    """``(model, is_local)``: an existing directory (relative paths from the working directory, else from the
    config's folder) or a hub id. Hub ids are ``name`` or ``org/name``; anything else was meant as a path and
    must exist. ``where`` starts the error messages."""
    from drpo_core.config import resolve_path

    path = resolve_path(model, Path(config_dir))
    if path.exists():
        if not path.is_dir():
            raise PluginError(f"{where} {model!r} is a file, not a model directory or hub id")
        return str(path), True
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        raise PluginError(f"{where} {model!r} does not exist")
    return model, False


def cached_on_hub(model: str) -> bool:
    """The local Hugging Face cache holds a snapshot of hub repository ``model`` (any revision)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def missing_models(sources: Mapping[str, str], config_dir: Path) -> dict[str, str]:
    """Of ``{where: model}``, the hub ids that cannot load while ``HF_HUB_OFFLINE`` is set: neither a local
    path nor in the cache (``{}`` when the hub may be reached: they download when loaded)."""
    if not hub_offline():
        return {}
    missing = {}
    for where, model in sources.items():
        name, is_local = resolve_model(model, config_dir, where=where)
        if not is_local and not cached_on_hub(name):
            missing[where] = name
    return missing


def offline_message(missing: Mapping[str, str]) -> str:
    """One line naming every missing model and the commands that fetch them."""
    fetch = " && ".join(f"hf download {name}" for name in dict.fromkeys(missing.values()))
    named = ", ".join(f"{where} {name}" for where, name in missing.items())
    return (f"models not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: {named}; download first "
            f"({fetch}) or set those options to local directories")


def from_hub_or_cache(load: Callable[..., Loaded], model: str, is_local: bool, kwargs: Mapping[str, Any],
                      *, owner: str = "") -> Loaded:
    """``load(model, **kwargs)`` (a ``from_pretrained``) from local files first, from the hub only when it may
    be reached; every failure is one line, prefixed with ``owner`` ("ranker 'clip'") when given."""
    prefix = f"{owner}: " if owner else ""
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface_hub an argument it deprecated: not ours
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            return load(model, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        if is_local:
            raise PluginError(f"{prefix}could not load model {model!r}: {first_line(error)}") from error
        if hub_offline():
            raise PluginError(f"{prefix}model {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                              f"is set: download it first (hf download {model}) or set it to a local directory"
                              ) from error
    try:
        return load(model, **kwargs)
    except (OSError, ValueError) as error:
        raise PluginError(f"{prefix}could not load model {model!r} from the hub: {first_line(error)}") from error


def check_models_offline(components: Mapping[str, tuple[Any, str]], config_dir: Path) -> None:
    """Offline (``HF_HUB_OFFLINE``), the hub models of components ``{where: (validated options, "name:variant")}``
    must be in the local cache: one line naming every missing one and how to fetch it, before any loads.

    The models are the options annotated ``LocalPath`` that name hub ids, or what an options class's
    ``hub_models(variant)`` returns when it defines one (a default that depends on another option, a model
    only some variants load). ``config_dir``: where relative paths are taken from."""
    from drpo_core.config import resolve_path
    from drpo_core.registry import split_reference

    sources: dict[str, str] = {}
    for where, (options, reference) in components.items():
        for key, model in _hub_models(options, split_reference(reference)[1]).items():
            if not resolve_path(model, config_dir).exists():  # local files and folders load as they are
                sources[f"{where}.{key}"] = model
    missing = missing_models(sources, config_dir)
    if missing:
        raise PluginError(offline_message(missing))


def _hub_models(options: Any, variant: str | None) -> dict[str, str]:
    from drpo_core.config import is_local_path

    if hasattr(options, "hub_models"):
        return dict(options.hub_models(variant))
    fields = getattr(type(options), "model_fields", {})
    return {key: value for key, info in fields.items() if is_local_path(info)
            and isinstance(value := getattr(options, key), str)}
