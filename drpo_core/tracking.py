"""Experiment trackers (``log.trackers``): the per-step record and the evaluation metrics as scalars.

Names are the keys of ``metrics.jsonl`` and ``eval.jsonl``, nested keys joined by ``/``, under
``train/`` and ``eval/``::

    metrics.jsonl  {"step": 3, "loss_pref": .., "mean/pref/s": .., "time": {"sample": ..}}
      -> train/loss_pref, train/mean/pref/s, train/time/sample  at step 3
    eval.jsonl     {"step": 3, "score/pickscore": .., "diversity": ..}
      -> eval/score/pickscore, eval/diversity  at step 3

Every number is logged (ints, floats, non-finite ones too); text (a failure's reason) and lists are
not. Only the main process writes.

- ``tensorboard``: event files in ``RUN/tensorboard/``. A resumed run opens a new event file that
  purges the steps after its checkpoint (a killed run may have logged some), so TensorBoard shows
  each step once.
- ``wandb``: ``wandb.init(dir=RUN, name=RUN's folder name, project=$WANDB_PROJECT or "drpo")``; the run's
  wandb id is kept in ``RUN/wandb/drpo-run-id``, so a resume continues the same wandb run.
  ``WANDB_MODE=offline`` works without an account. A wandb that cannot start is one line, before the run
  writes anything.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from drpo_core.errors import DrpoError


def scalars(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a record, named ``prefix/key`` (nested keys joined by ``/``); ``step`` is left out."""
    return _numbers({key: value for key, value in record.items() if key != "step"}, prefix)


def _numbers(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out.update(_numbers(value, name))
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


class Trackers:
    """The trackers ``names`` of one training session, from ``start_step`` (0, or the step a resume starts
    after); a no-op where ``enabled`` is false (processes other than the main one) or without names."""

    def __init__(self, names: Iterable[str] = (), run_dir: str | Path = ".", *, start_step: int = 0,
                 resumed: bool = False, config: dict[str, Any] | None = None, enabled: bool = True) -> None:
        self._writers: list[Any] = []
        if not enabled:
            return
        try:
            for name in dict.fromkeys(names):  # each once, in order
                opener = {"tensorboard": _TensorBoard, "wandb": _WandB}[name]
                self._writers.append(opener(Path(run_dir), start_step, resumed, config or {}))
        except BaseException:
            self.close()
            raise

    def log(self, record: Mapping[str, Any], section: str) -> None:
        """Log a ``metrics.jsonl`` (``section="train"``) or ``eval.jsonl`` (``"eval"``) record at its step."""
        if not self._writers:
            return
        values = scalars(record, section)
        for writer in self._writers:
            writer.log(values, int(record["step"]))

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


class _TensorBoard:
    def __init__(self, run_dir: Path, start_step: int, resumed: bool, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run continues after its checkpoint's step: readers drop what a killed run logged beyond it
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if resumed else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # like metrics.jsonl: a killed run loses at most the step being written

    def close(self) -> None:
        self.writer.close()


class _WandB:
    #: the wandb run id of a drpo run, kept in its wandb folder: a resume continues that wandb run
    ID_FILE = Path("wandb") / "drpo-run-id"

    def __init__(self, run_dir: Path, start_step: int, resumed: bool, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / self.ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:16]
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "drpo", name=run_dir.name,
                                  dir=str(run_dir), id=run_id, resume="allow", config=config)
        except Exception as error:  # no API key, no network, ...: one line, before the run writes anything
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise DrpoError(f"log.trackers: wandb did not start: {first} (log in with `wandb login`, or set "
                            "WANDB_MODE=offline to keep the run on this machine)") from error
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
