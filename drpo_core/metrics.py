"""Run metrics: an append-only JSON-lines log that can be rewound on resume, and a per-step phase timer.

``metrics.jsonl`` holds one JSON object per line, flushed as soon as it is written, so a killed run
loses at most the line being written. A checkpoint records the log's line count; resuming opens the
log with ``resume_lines=n``, which drops the lines the killed run wrote after that checkpoint (and
a torn last line) so that every step appears exactly once.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from drpo_core.errors import DrpoError
from drpo_core.jsonl import read_jsonl


class MetricsLog:
    """Append-only JSON-lines file.

    ``MetricsLog(path)`` starts a new log and refuses a non-empty existing file (it belongs to
    another run). ``MetricsLog(path, resume_lines=n)`` continues a log after its first ``n`` lines.
    """

    def __init__(self, path: str | Path, resume_lines: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_lines is None:
            self._check_new()
        existed = self.path.exists()
        # binary append: exact byte offsets for truncate, and no newline translation on Windows
        self._file = open(self.path, "ab")
        self._line_count = _count_complete_lines(self.path)
        if resume_lines is not None:
            kept = self.truncate(resume_lines)
            if kept < resume_lines:
                # metrics do not affect training, so a short log is worth a warning, not a failed resume
                found = f"has only {kept} complete lines" if existed else "is missing"
                warnings.warn(f"{self.path} {found}; the checkpoint expected {resume_lines}", stacklevel=2)

    def _check_new(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            raise DrpoError(f"{self.path} already holds metrics: resume that run or use a new run directory")

    @property
    def line_count(self) -> int:
        """Number of complete lines in the file (store it in the checkpoint)."""
        return self._line_count

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and flush it to the operating system."""
        if not isinstance(record, dict):
            raise TypeError(f"metrics record must be a dict, got {type(record).__name__}")
        line = json.dumps(record, default=_to_json) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        self._line_count += 1

    def truncate(self, n_lines: int) -> int:
        """Keep the first ``n_lines`` complete lines (fewer if the file has fewer) and drop the rest,
        including a torn last line. Returns the number of lines kept."""
        if n_lines < 0:
            raise ValueError(f"n_lines must be non-negative, got {n_lines}")
        self._file.flush()
        kept, offset = _complete_lines_prefix(self.path, n_lines)
        self._file.truncate(offset)
        self._file.flush()
        self._line_count = kept
        return kept

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _to_json(value: Any) -> Any:
    """Turn one-element tensors and numpy scalars into Python numbers (json's ``default`` hook)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (np.generic, np.ndarray)) and value.size == 1:
        return value.item()
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serializable")


def _complete_lines_prefix(path: Path, n_lines: int) -> tuple[int, int]:
    """(lines kept, byte offset just after them) for the first ``n_lines`` newline-terminated lines."""
    kept = offset = 0
    with open(path, "rb") as f:
        for line in f:
            if kept == n_lines or not line.endswith(b"\n"):
                break
            kept += 1
            offset += len(line)
    return kept, offset


def _count_complete_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics log; a torn last line (a killed writer) is skipped."""
    return [record for _, record in read_jsonl(path, what="metrics file", skip_torn=True)]


class StepTimer:
    """Wall-clock seconds per phase of one training step.

    ::

        timer.start_step(sync=step % 50 == 0)
        with timer("sample"):
            ...
        with timer("rank"):
            ...
        log.write({"step": step, **timer.split()})

    CUDA kernels run asynchronously, so without synchronizing a phase's time lands in whichever
    later phase waits on the GPU. ``sync=True`` synchronizes at every phase boundary for exact
    numbers; it costs throughput, so the loop turns it on only every few steps.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = defaultdict(float)
        self._sync = False

    def start_step(self, sync: bool = False) -> None:
        """Set whether this step's phase boundaries synchronize CUDA (until the next ``start_step``)."""
        self._sync = sync

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._seconds[phase] += time.perf_counter() - start

    def split(self) -> dict[str, float]:
        """Seconds per phase since the last split, in first-use order; resets the counters."""
        seconds = dict(self._seconds)
        self._seconds = defaultdict(float)
        return seconds

    def _synchronize(self) -> None:
        # is_initialized: a run that never touched CUDA has nothing to wait for, and must not
        # create a CUDA context just to time itself
        if self._sync and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
