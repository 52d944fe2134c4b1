"""Training checkpoints: everything needed to resume a run exactly, written atomically.

Layout under ``RUN_DIR/checkpoints/``::

    step-000006/
        trainable.safetensors   the generator's trainable weights
        optimizer.pt            optimizer.state_dict()   (torch.save, loadable with weights_only=True)
        scheduler.pt            lr scheduler state_dict()
        rng.pt                  python, numpy, torch CPU/CUDA/MPS random states
        state.json              step plus the caller's JSON state (prompt stream, metrics line count, ...)
        config.yaml             the resolved config text
    latest                      text file naming the newest complete step directory

A checkpoint is first written to a hidden ``.tmp-step-000006-*`` sibling, every file is fsynced,
then the directory is renamed into place and only after that the ``latest`` pointer is replaced.
A run killed at any moment therefore leaves ``latest`` naming a complete checkpoint; leftover
``.tmp-*`` directories are ignored and cleaned up by the next save.

Everything is read back with ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from drpo_core.errors import ComponentError, ConfigError, DrpoError

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
FORMAT_VERSION = 1
REQUIRED_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
                  "config.yaml")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """A loaded checkpoint; all tensors are on the CPU."""

    path: Path
    step: int
    trainable: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any]
    config_text: str


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ----------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    trainable: Mapping[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler_state: dict[str, Any],
    state: dict[str, Any],
    config_text: str,
    keep_last: int | None = 3,
    rng_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint for ``step`` atomically and return its directory.

    Also captures the current RNG states, or saves ``rng_state`` (from :func:`capture_rng_state`)
    instead: the loop passes the states of a step's start when it checkpoints a step it could not
    finish. Afterwards only the ``keep_last`` newest step directories are kept (``None`` keeps
    all); the one ``latest`` names is never deleted.

    Floating-point trainable tensors must be finite: a NaN or an infinity is refused with one
    line before anything is written, so the previous checkpoint and ``latest`` stay as they were.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
    # validate everything before touching the disk, so bad input never leaves a partial directory
    state_text = _state_json(step, state)
    _check_weights_only_loadable(optimizer_state, "optimizer_state")
    _check_weights_only_loadable(scheduler_state, "scheduler_state")
    tensors = _cpu_tensors(trainable)
    _check_finite(tensors)

    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = _tmp_path(ckpt_dir, name)
    tmp.mkdir()
    try:
        _write_files(tmp, tensors, optimizer_state, scheduler_state, state_text, config_text,
                     capture_rng_state() if rng_state is None else rng_state)
        _fsync_dir(tmp)
        final = ckpt_dir / name
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(ckpt_dir, name)
    _prune(ckpt_dir, keep_last)
    return final


def _write_files(tmp: Path, tensors: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                 scheduler_state: dict[str, Any], state_text: str, config_text: str,
                 rng_state: dict[str, Any]) -> None:
    save_file(tensors, str(tmp / "trainable.safetensors"))
    _fsync_file(tmp / "trainable.safetensors")
    _write_synced(tmp / "optimizer.pt", lambda f: torch.save(optimizer_state, f))
    _write_synced(tmp / "scheduler.pt", lambda f: torch.save(scheduler_state, f))
    _write_synced(tmp / "rng.pt", lambda f: torch.save(rng_state, f))
    _write_synced(tmp / "config.yaml", lambda f: f.write(config_text.encode("utf-8")))
    # state.json last: a directory holding it has all the other files too
    _write_synced(tmp / "state.json", lambda f: f.write(state_text.encode("utf-8")))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is renamed away first, then deleted.

    (A non-empty directory cannot be replaced by rename on POSIX or Windows.)
    """
    old = None
    if final.exists():
        old = _tmp_path(final.parent, f"old-{final.name}")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)  # put the previous checkpoint back
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_latest(ckpt_dir: Path, name: str) -> None:
    tmp = _tmp_path(ckpt_dir, LATEST_FILE)
    try:
        _write_synced(tmp, lambda f: f.write(f"{name}\n".encode()))
        os.replace(tmp, ckpt_dir / LATEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(ckpt_dir)


def _prune(ckpt_dir: Path, keep_last: int | None) -> None:
    # leftovers of killed saves: nothing else writes here while this run saves
    for path in ckpt_dir.iterdir():
        if path.name.startswith(_TMP_PREFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    if keep_last is None:
        return
    latest = _read_latest(ckpt_dir)
    for _, path in _step_dirs(ckpt_dir)[:-keep_last]:
        if path.name != latest:
            shutil.rmtree(path)


def _state_json(step: int, state: dict[str, Any]) -> str:
    if not isinstance(state, dict):
        raise DrpoError(f"checkpoint state must be a dict, got {type(state).__name__}")
    try:
        return json.dumps({"format_version": FORMAT_VERSION, "step": step, "state": state}, indent=2)
    except (TypeError, ValueError) as err:
        raise DrpoError(f"checkpoint state is not JSON-serializable: {err}") from None


def _cpu_tensors(trainable: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = {}
    for key, value in trainable.items():
        if not isinstance(value, torch.Tensor):
            raise DrpoError(f"trainable[{key!r}] is a {type(value).__name__}, not a tensor")
        # a private copy: safetensors rejects tensors sharing storage, and the snapshot must not change
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
    return tensors


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse NaN and infinite values in floating-point tensors: such weights are lost already, and
    saving them would replace the last good checkpoint as ``latest``."""
    bad = [key for key, value in tensors.items()
           if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all())]
    if bad:
        raise DrpoError(f"refusing to checkpoint non-finite weights: {len(bad)} of {len(tensors)} tensors hold "
                        f"NaN or infinite values (first: {bad[0]!r}); the previous checkpoint is kept")


# what torch.load(weights_only=True) can rebuild; anything else would only fail at resume time
_PLAIN_TYPES = (str, int, float, bool, complex, type(None), torch.Tensor, torch.dtype, torch.device)


def _check_weights_only_loadable(obj: Any, where: str) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_weights_only_loadable(key, f"{where} key")
            _check_weights_only_loadable(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for index, value in enumerate(obj):
            _check_weights_only_loadable(value, f"{where}[{index}]")
    elif not isinstance(obj, _PLAIN_TYPES):
        raise DrpoError(f"{where} holds a {type(obj).__name__}, which torch.load(weights_only=True) "
                        "cannot read back: keep state dicts to tensors and plain Python values")


# ----------------------------------------------------------------------------------------------
# durable writes


def _tmp_path(parent: Path, label: str) -> Path:
    # not tempfile.mkdtemp/mkstemp: they create owner-only (0700/0600) entries, and the renamed
    # checkpoint should get the usual permissions (umask) like every other file of the run
    return parent / f"{_TMP_PREFIX}{label}-{secrets.token_hex(6)}"


def _write_synced(path: Path, write: Callable[[Any], Any]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    # opened for writing: Windows cannot fsync (_commit) a read-only handle
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable. POSIX only: Windows cannot open a directory, and
    NTFS journals renames itself. Best effort: some file systems refuse to fsync a directory."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# finding and loading


def resolve_checkpoint(run_dir_or_path: str | Path, which: str | int = "latest") -> Path:
    """Return a checkpoint directory.

    ``run_dir_or_path`` is a run directory, its ``checkpoints`` directory, or a step directory
    (returned as is). ``which`` is ``"latest"``, a step number, or a directory name such as
    ``"step-000006"``. Leftover ``.tmp-*`` directories are never chosen.
    """
    path = Path(run_dir_or_path)
    if not path.exists():
        raise DrpoError(f"checkpoint path not found: {path}")
    if (path / "state.json").is_file() or _STEP_DIR.match(path.name):
        return _check_complete(path)
    ckpt_dir = _checkpoints_dir(path)
    if not ckpt_dir.is_dir() or not _step_dirs(ckpt_dir):
        raise DrpoError(f"no checkpoint in {path}: run without --resume first")
    if which == "latest":
        return _check_complete(_latest_dir(ckpt_dir))
    name = step_dir_name(which) if isinstance(which, int) else str(which)
    if name.isdigit():
        name = step_dir_name(int(name))
    target = ckpt_dir / name
    if not _STEP_DIR.match(name) or not target.is_dir():
        available = ", ".join(p.name for _, p in _step_dirs(ckpt_dir))
        raise DrpoError(f"no checkpoint {which!r} in {ckpt_dir} (available: {available})")
    return _check_complete(target)


def _checkpoints_dir(path: Path) -> Path:
    # the checkpoints directory itself holds `latest` or step directories; otherwise it is a run directory
    if (path / LATEST_FILE).is_file() or _step_dirs(path):
        return path
    return path / CHECKPOINTS_DIR


def _latest_dir(ckpt_dir: Path) -> Path:
    name = _read_latest(ckpt_dir)
    if name is not None and _STEP_DIR.match(name) and (ckpt_dir / name).is_dir():
        return ckpt_dir / name
    # pointer missing or dangling (killed while re-saving the same step): the newest
    # step directory is complete, because step directories only appear by atomic rename
    newest = _step_dirs(ckpt_dir)[-1][1]
    warnings.warn(f"{ckpt_dir / LATEST_FILE} is missing or names no checkpoint; using {newest.name}",
                  stacklevel=3)
    return newest


def _read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete step directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for path in ckpt_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _check_complete(path: Path) -> Path:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise DrpoError(f"checkpoint {path} is incomplete (missing {', '.join(missing)})")
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint (a step directory, or a run directory: its latest checkpoint) onto the CPU."""
    ckpt = resolve_checkpoint(path)
    meta = _load_json(ckpt / "state.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DrpoError(f"{ckpt / 'state.json'}: unsupported checkpoint format_version "
                        f"{meta.get('format_version')!r} (this drpo reads {FORMAT_VERSION})")
    try:
        trainable = load_file(str(ckpt / "trainable.safetensors"), device="cpu")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise DrpoError(f"{ckpt / 'trainable.safetensors'}: cannot read ({err})") from None
    return Checkpoint(
        path=ckpt,
        step=int(meta["step"]),
        trainable=trainable,
        optimizer_state=_torch_load(ckpt / "optimizer.pt"),
        scheduler_state=_torch_load(ckpt / "scheduler.pt"),
        state=meta["state"],
        rng=_torch_load(ckpt / "rng.pt"),
        config_text=(ckpt / "config.yaml").read_text(encoding="utf-8"),
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DrpoError(f"{path}: cannot read ({first_line})") from None


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DrpoError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or "step" not in data or "state" not in data:
        raise DrpoError(f"{path}: expected an object with 'step' and 'state'")
    step = data["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise DrpoError(f"{path}: 'step' must be a non-negative integer, got {step!r}")
    if not isinstance(data["state"], dict):
        raise DrpoError(f"{path}: 'state' must be an object, got {type(data['state']).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# random number generator states


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states, as tensors and plain lists so ``weights_only`` loading accepts them."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`capture_rng_state`; devices this machine lacks are skipped with a warning."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        _restore_cuda(state["cuda"])
    if "mps" in state:
        if torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])
        else:
            warnings.warn("checkpoint has an MPS RNG state but MPS is not available: not restored", stacklevel=2)


def _restore_cuda(states: list[torch.Tensor]) -> None:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(states):
        warnings.warn(f"checkpoint has RNG states for {len(states)} CUDA devices, this machine has "
                      f"{available}: restoring the first {min(available, len(states))}", stacklevel=3)
    for index, device_state in enumerate(states[:available]):
        torch.cuda.set_rng_state(device_state, index)


# ----------------------------------------------------------------------------------------------
# the trainable file's layout


def split_trainable(
    trainable: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """A checkpoint's trainable tensors: the generator's weights, the EMA weights (``ema.{i}``) and the
    remembered correct samples (``memory.{n}``), each list in its saved order."""
    def numbered(prefix: str) -> list[torch.Tensor]:
        return [trainable[f"{prefix}.{i}"] for i in range(sum(key.startswith(f"{prefix}.") for key in trainable))]

    weights = {key: value for key, value in trainable.items() if not key.startswith(("ema.", "memory."))}
    return weights, numbered("ema"), numbered("memory")


def check_state_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any], what: str = "weights") -> None:
    """Weights for a network must have its tensors, no others, each of its shape: else one
    :class:`ComponentError` line (``load_state_dict`` would raise a long RuntimeError, or broadcast)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = {key: tuple(getattr(state[key], "shape", ())) for key in set(expected) & set(state)}
    resized = sorted(key for key, shape in shapes.items() if shape != tuple(expected[key].shape))
    if not (missing or unexpected or resized):
        return
    if resized:
        example = f"{resized[0]} is {shapes[resized[0]]}, the network's {tuple(expected[resized[0]].shape)}"
    else:
        example = f"{(missing or unexpected)[0]} {'missing' if missing else 'unexpected'}"
    raise ComponentError(f"{what} do not fit the network: {len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(resized)} resized tensors, e.g. {example}")


def assign_parameters(params: Sequence[torch.nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``params`` in place, in order (EMA weights in, trained weights back)."""
    with torch.no_grad():
        for param, value in zip(params, values, strict=True):
            param.copy_(value)
