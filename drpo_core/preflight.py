"""What a run needs from this machine and its files, checked before anything is written or loaded.

``resolve_config`` checks a config on its own (types, ranges, components, feasibility); this module
checks it against the machine: the device exists here, the output directory can hold the run (and
holds no other run), the prompt and pair files read. ``drpo train`` runs these checks before any
model loads, ``drpo config validate`` runs the same ones, so a config validate calls valid is one
train accepts up to what only a built component can tell (a generator's prompt grammar, the feature
keys ``drift.key_weights`` names: checked by the trainer right after building, before the run writes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drpo_core.config import DEVICE_NAMES, DEVICE_PATTERN, ResolvedConfig, resolve_path
from drpo_core.errors import ConfigError, DrpoError
from drpo_core.hub import check_models_offline
from drpo_core.prompts import (
    EVAL_SPLIT_COUNT,
    EVAL_SUBSET_COUNT,
    PromptRecord,
    load_prompts,
    split_prompts,
    subset_prompts,
)


@dataclass
class RunPrompts:
    """A run's training and held-out prompts, and the offline pairs (``source.kind: offline``)."""

    train: list[PromptRecord]
    eval: list[PromptRecord]
    pairs: dict[str, Any] = field(default_factory=dict)
    #: distinct prompts in ``prompts.eval_path`` (the held-out ones may be a subset); None without it
    eval_file_size: int | None = None


def check_run(resolved: ResolvedConfig, *, new_run: bool) -> RunPrompts:
    """Device, output directory (for a ``new_run``: no run in it yet) and prompts of a resolved config;
    returns the prompts. One :class:`DrpoError` line per problem, naming the key and its origin."""
    cfg = resolved.config
    check_device(cfg.train.device, _named(resolved, "train.device"))
    check_output_dir(Path(cfg.output_dir), new_run=new_run)
    return load_run_prompts(resolved)


def check_models_cached(resolved: ResolvedConfig) -> None:
    """Offline, every hub model the run's components name must be cached: one line naming all the missing ones
    (:func:`drpo_core.hub.check_models_offline`), rather than one per attempt as each loads in turn."""
    check_models_offline({where: (options, _section(resolved.config, where).name)
                          for where, options in resolved.options.items()}, resolved.config_dir)


def _section(config: Any, where: str) -> Any:
    """The config section at a dotted key ("rankers.0", "eval.rankers.1", "generator")."""
    for part in where.split("."):
        config = config[int(part)] if part.isdigit() else getattr(config, part)
    return config


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


def check_output_dir(run_dir: Path, *, new_run: bool) -> None:
    """The run directory is (or can become) a writable folder; a ``new_run`` refuses one that holds a run."""
    from drpo_core.runs import check_new_run_dir

    if new_run:
        check_new_run_dir(run_dir)
    elif run_dir.exists() and not run_dir.is_dir():
        raise DrpoError(f"output directory {run_dir} is a file")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder the run's folders will be made in
    if existing != run_dir and not existing.is_dir():
        raise DrpoError(f"output directory {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DrpoError(f"output directory {run_dir}: {existing} is not writable")


def load_run_prompts(resolved: ResolvedConfig) -> RunPrompts:
    """The training and held-out prompts a run uses (and its offline pairs), as the trainer takes them."""
    from drpo_core.sources import read_pairs

    cfg, prompts = resolved.config, resolved.config.prompts

    def path(value: str) -> Path:
        return resolve_path(value, resolved.config_dir)

    pairs = read_pairs(path(cfg.source.path)) if cfg.source.kind == "offline" and cfg.source.path else {}
    if prompts.path is None and pairs:
        records = [PromptRecord(text, None) for text in pairs]
    elif prompts.path is None:
        raise ConfigError("prompts.path: required (a prompt file, or pkg://package/file)")
    else:
        records = load_prompts(path(prompts.path), prompts.format)
    count = prompts.eval_count
    if prompts.eval_path:  # a seeded subset of the file (all of it with eval_count: all)
        held_out = load_prompts(path(prompts.eval_path), prompts.format)
        subset = None if count == "all" else EVAL_SUBSET_COUNT if count == "auto" else count
        train, eval_file_size = records, len({r.text for r in held_out})
        held_out = subset_prompts(held_out, subset, seed=cfg.seed)
    else:
        split = count if isinstance(count, int) else EVAL_SPLIT_COUNT  # "all" needs eval_path (resolve says so)
        (train, held_out), eval_file_size = split_prompts(records, eval_count=split, seed=cfg.seed), None
    if not train:
        raise DrpoError("prompts: no training prompts left after the held-out split")
    return RunPrompts(train, held_out, pairs, eval_file_size)


def _named(resolved: ResolvedConfig, key: str) -> str:
    """``key`` with where its value came from, as config errors name it (``--set: train.device``)."""
    origin = resolved.origins.get(key)
    return f"{origin}: {key}" if origin and origin != "default" else key
