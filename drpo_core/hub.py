"""Where a component's model comes from: a local directory or a Hugging Face hub id, and whether the hub
may be reached. Shared by every plugin that loads with ``from_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

from drpo_core.errors import PluginError

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (in the environment or in huggingface_hub's constants)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve_model(model: str, config_dir: Path) -> tuple[str, bool]:
    """``(model, is_local)``: an existing directory (relative paths from the config's folder) or a hub id.
    Hub ids are ``name`` or ``org/name``; anything else was meant as a path and must exist."""
    path = Path(model).expanduser()
    if not path.is_absolute():
        path = Path(config_dir) / path
    if path.exists():
        return str(path), True
    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        raise PluginError(f"model path {model!r} does not exist")
    return model, False
