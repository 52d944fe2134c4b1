"""Whether a device a config or a flag names is one torch can use on this machine (``train.device``, a ranker's
``device`` option, ``--device``): one :class:`ConfigError` line naming the key, before anything loads.
:mod:`drpo_core.preflight` names these too."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from drpo_core.config import DEVICE_NAMES, DEVICE_PATTERN
from drpo_core.errors import ConfigError


def check_device(device: str, where: str = "device") -> None:
    """``device`` is a name drpo knows and this machine has; ``where`` names it in the error."""
    if not DEVICE_PATTERN.match(device):
        raise ConfigError(f"{where}: unknown device {device!r} (use {DEVICE_NAMES})")
    kind, _, index = device.partition(":")
    if kind not in ("cuda", "mps"):
        return
    available = available_devices()
    if kind == "mps" and "mps" not in available:
        raise ConfigError(f"{where}: mps is not available on this machine (available: {', '.join(available)})")
    gpus = [name for name in available if name.startswith("cuda:")]
    if kind == "cuda" and not gpus:
        raise ConfigError(f"{where}: {device} is not available: torch sees no CUDA GPU on this machine "
                          f"(available: {', '.join(available)})")
    if index and int(index) >= len(gpus):
        raise ConfigError(f"{where}: {device} does not exist: this machine has {len(gpus)} CUDA "
                          f"GPU{'s' if len(gpus) > 1 else ''} (available: {', '.join(available)})")


def best_device() -> str:
    """The device ``--device auto`` means: ``cuda`` when torch sees a GPU, else ``mps`` where present, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(device: str, where: str = "--device") -> str:
    """``device`` checked as :func:`check_device` does, with ``auto`` replaced by :func:`best_device`."""
    check_device(device, where)
    return best_device() if device == "auto" else device


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, then ``cuda:0``... and ``mps`` where present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_component_devices(options: Mapping[str, Any], named: Callable[[str], str] = str) -> None:
    """Each component's own ``device`` option (a ranker on a second GPU: ``ModelRunOptions.device``) names a
    device this machine has, as ``train.device`` must: ``options`` maps a section ("rankers.0") to its
    validated options; ``named`` says where a key's value came from."""
    for where, section in options.items():
        device = getattr(section, "device", None)
        if isinstance(device, str):
            check_device(device, named(f"{where}.device"))
