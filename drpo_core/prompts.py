"""Prompt sets for training and evaluation: loading, a held-out split, and a resumable stream.

Three file formats are read:

* ``text``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``geneval``: GenEval's ``evaluation_metadata.jsonl``, one JSON object per line with a ``"prompt"``
  key; the whole row is kept as the record's metadata (the GenEval scorer needs it).
* ``parti``: PartiPrompts' tab-separated file with a header row (``Prompt``, ``Category``,
  ``Challenge``, ``Note``); category and challenge are kept as metadata.

The training loop draws prompts from a :class:`PromptStream`. Its order depends only on the seed
and the epoch number, never on process state, so a resumed run sees exactly the prompts the
uninterrupted run would have seen. Each drawn prompt carries its *global prompt index*, the count
of prompts drawn before it; the loop keys sampling noise by that index.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drpo_core.errors import ConfigError, DrpoError
from drpo_core.jsonl import read_jsonl

FORMATS = ("text", "geneval", "parti")
#: held-out prompts evaluated with ``prompts.eval_count: auto`` (the default): a seeded subset of this
#: many prompts of an ``eval_path`` file (``eval_count: all`` for the whole file) ...
EVAL_SUBSET_COUNT = 64
#: ... or this many prompts split from ``path`` (and never trained on) when there is no ``eval_path``
EVAL_SPLIT_COUNT = 8
_SUFFIX_FORMATS = {".txt": "text", ".jsonl": "geneval", ".tsv": "parti"}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt. ``metadata`` holds format-specific fields (``None`` for plain text files)."""

    text: str
    metadata: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------
# loading


def load_prompts(path: str | Path, format: str = "auto") -> list[PromptRecord]:
    """Read a prompt file; ``format`` is ``"text"``, ``"geneval"``, ``"parti"`` or ``"auto"`` (by suffix)."""
    path = Path(path)
    if not path.exists():
        raise DrpoError(f"prompt file not found: {path}")
    if not path.is_file():
        raise DrpoError(f"prompt path is not a file: {path}")
    fmt = _resolve_format(path, format)
    if fmt == "geneval":
        records = _parse_geneval(path)
    elif fmt == "text":
        records = _parse_text(_read_lines(path))
    else:
        records = _parse_parti(path, _read_lines(path))
    if not records:
        raise DrpoError(f"{path}: no prompts found (the file is empty or holds only blank/comment lines)")
    return records


def prompt_format(path: str | Path, format: str = "auto") -> str:
    """The format a prompt file is read in: ``format``, or (``auto``) the one its suffix names."""
    return _resolve_format(Path(path), format)


def _resolve_format(path: Path, format: str) -> str:
    if format in FORMATS:
        return format
    if format != "auto":
        raise ConfigError(f"unknown prompt format {format!r} for {path}: use one of auto, {', '.join(FORMATS)}")
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(_SUFFIX_FORMATS)
        raise ConfigError(f"{path}: cannot tell the prompt format from suffix {path.suffix!r} "
                          f"(known: {known}); set the format explicitly")
    return fmt


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        raise DrpoError(f"prompt file not found: {path}")
    if not path.is_file():
        raise DrpoError(f"prompt path is not a file: {path}")
    try:
        # utf-8-sig: files saved by spreadsheet tools often start with a byte-order mark
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DrpoError(f"{path}: not UTF-8 text (bad byte at offset {err.start})") from None
    # splitlines() would also split on exotic separators (\x0b, \u2028) that may sit inside a prompt
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _parse_text(lines: list[str]) -> list[PromptRecord]:
    records = []
    for line in lines:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            records.append(PromptRecord(stripped))
    return records


def _parse_geneval(path: Path) -> list[PromptRecord]:
    records = []
    for number, row in read_jsonl(path, required=("prompt",), what="prompt file"):
        text = row["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise DrpoError(f'{path}:{number}: "prompt" must be a non-empty string')
        records.append(PromptRecord(text.strip(), row))
    return records


def _parse_parti(path: Path, lines: list[str]) -> list[PromptRecord]:
    # QUOTE_NONE: Parti prompts contain literal double quotes ('"GIGGLE" painted ...') that
    # csv's default quoting would strip; the format never quotes fields, it has no tabs in prompts.
    rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header: list[str] | None = None
    records = []
    for number, row in enumerate(rows, start=1):
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip().lower() for cell in row]
            if "prompt" not in header:
                raise DrpoError(f"{path}:{number}: header has no 'Prompt' column (got {row!r})")
            continue
        cells = dict(zip(header, row, strict=False))
        text = cells.get("prompt", "").strip()
        if not text:
            raise DrpoError(f"{path}:{number}: empty prompt")
        metadata = {key: cells.get(key, "").strip() for key in ("category", "challenge")}
        records.append(PromptRecord(text, metadata))
    return records


# ----------------------------------------------------------------------------------------------
# held-out split


def split_prompts(
    records: Sequence[PromptRecord],
    eval_count: int | None = None,
    eval_fraction: float | None = None,
    *,
    seed: int,
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Split into ``(train, eval)``, disjoint by prompt text; both keep the input order.

    Give exactly one of ``eval_count`` (number of distinct prompt texts held out, 0 allowed) or
    ``eval_fraction`` (in ``[0, 1)``, rounded, at least one text when positive). Records that share
    a text always land on the same side, so no eval prompt is ever trained on.

    A text's side is decided by a seeded hash of the text rather than by its position, so the
    split does not change when the file is reordered.
    """
    texts = list(dict.fromkeys(record.text for record in records))
    count = _eval_size(len(texts), eval_count, eval_fraction)
    ranked = sorted(texts, key=lambda text: _text_key(seed, text))
    eval_texts = set(ranked[:count])
    train = [record for record in records if record.text not in eval_texts]
    held_out = [record for record in records if record.text in eval_texts]
    return train, held_out


def subset_prompts(records: Sequence[PromptRecord], count: int | None, *, seed: int) -> list[PromptRecord]:
    """``count`` distinct prompt texts of ``records`` (all of them when ``count`` is ``None`` or at least
    their number), chosen by the seeded text hash of :func:`split_prompts`, in the input order.

    Records that share a text are kept or dropped together. The choice depends on the seed and the texts
    only, not on their order, and a larger ``count`` keeps every prompt a smaller one kept.
    """
    if count is None:
        return list(records)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"prompt subset: count must be a non-negative integer, got {count!r}")
    texts = list(dict.fromkeys(record.text for record in records))
    if count >= len(texts):
        return list(records)
    chosen = set(sorted(texts, key=lambda text: _text_key(seed, text))[:count])
    return [record for record in records if record.text in chosen]


def _eval_size(n_texts: int, eval_count: int | None, eval_fraction: float | None) -> int:
    if (eval_count is None) == (eval_fraction is None):
        raise ConfigError("prompt split: give exactly one of eval_count or eval_fraction")
    if eval_fraction is not None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ConfigError(f"prompt split: eval_fraction must be in [0, 1), got {eval_fraction}")
        count = round(eval_fraction * n_texts)
        if eval_fraction > 0:
            count = max(count, 1)
    else:
        if isinstance(eval_count, bool) or not isinstance(eval_count, int) or eval_count < 0:
            raise ConfigError(f"prompt split: eval_count must be a non-negative integer, got {eval_count!r}")
        count = eval_count
    if count >= n_texts:
        raise ConfigError(f"prompt split: holding out {count} of {n_texts} distinct prompts leaves none "
                          "to train on")
    return count


def _text_key(seed: int, text: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{text}".encode()).digest()


# ----------------------------------------------------------------------------------------------
# the training stream


class PromptStream:
    """Endless, resumable stream of ``(global_index, record)``, reshuffled every epoch.

    The order of epoch ``e`` is a permutation drawn from ``random.Random`` seeded by a hash of
    ``(seed, e)``: it depends on nothing else, so it is the same in every process and on resume.
    """

    def __init__(self, records: Sequence[PromptRecord], seed: int, shuffle: bool = True) -> None:
        if not records:
            raise DrpoError("prompt stream: no prompts to draw from")
        self._records = list(records)
        self._seed = int(seed)
        self._shuffle = shuffle
        self._fingerprint = _fingerprint(self._records)
        self._epoch = 0
        self._position = 0  # index into this epoch's order of the next prompt; always < len(records)
        self._global_index = 0  # prompts drawn so far, across epochs
        self._order = self._epoch_order(0)

    @property
    def epoch(self) -> int:
        """Epoch the next prompt comes from (= number of fully drawn epochs)."""
        return self._epoch

    @property
    def global_index(self) -> int:
        """Global index the next prompt will get (= number of prompts drawn so far)."""
        return self._global_index

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[tuple[int, PromptRecord]]:
        return self

    def __next__(self) -> tuple[int, PromptRecord]:
        item = (self._global_index, self._records[self._order[self._position]])
        self._global_index += 1
        self._position += 1
        if self._position == len(self._records):
            self._start_epoch(self._epoch + 1)
        return item

    def next_batch(self, n: int) -> list[tuple[int, PromptRecord]]:
        """Draw ``n`` prompts; a batch may span an epoch boundary."""
        if n < 0:
            raise ValueError(f"batch size must be non-negative, got {n}")
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position; ``seed``, ``num_prompts`` and ``fingerprint`` guard against resuming
        with a different prompt set or seed, which would silently change the data order."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "global_index": self._global_index,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "num_prompts": len(self._records),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the exact position saved by :meth:`state_dict`."""
        if not isinstance(state, dict):
            raise DrpoError(f"prompt stream state: expected an object, got {type(state).__name__}")
        damaged = [key for key in ("epoch", "position", "global_index")
                   if isinstance(state.get(key), bool) or not isinstance(state.get(key), int)]
        if damaged:
            raise DrpoError(f"prompt stream state: {', '.join(map(repr, damaged))} missing or not an integer "
                            "(a damaged checkpoint)")
        self._check_same_setup(state)
        position = int(state["position"])
        if not 0 <= position < len(self._records):
            raise DrpoError(f"prompt stream state: position {position} is out of range "
                            f"for {len(self._records)} prompts")
        self._start_epoch(int(state["epoch"]))
        self._position = position
        self._global_index = int(state["global_index"])

    def _check_same_setup(self, state: dict[str, Any]) -> None:
        if state.get("num_prompts") != len(self._records) or state.get("fingerprint") != self._fingerprint:
            raise DrpoError(f"prompt stream state was saved for a different prompt set "
                            f"({state.get('num_prompts')} prompts, now {len(self._records)}): "
                            "resume with the same prompt file and split")
        if state.get("seed") != self._seed or state.get("shuffle") != self._shuffle:
            raise DrpoError(f"prompt stream state was saved with seed={state.get('seed')} "
                            f"shuffle={state.get('shuffle')}, this run uses seed={self._seed} "
                            f"shuffle={self._shuffle}: resume with the same settings")

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._position = 0
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self._records)))
        if self._shuffle:
            # a digest as the seed: distinct (seed, epoch) pairs never collide the way seed + epoch would
            key = hashlib.sha256(f"drpo-prompt-stream\0{self._seed}\0{epoch}".encode()).digest()
            random.Random(int.from_bytes(key[:8], "big")).shuffle(order)
        return order


def _fingerprint(records: Sequence[PromptRecord]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
