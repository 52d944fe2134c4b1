"""The one JSON-lines reader: every row an object, every error one line naming ``file:line``.

Used for prompt files (GenEval's metadata), offline pairs, real-image lists, sample manifests and the
run logs (``metrics.jsonl``, ``eval.jsonl``). Blank lines are skipped; line numbers count every
line, blank ones included, so they match an editor's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drpo_core.errors import DrpoError

_BOM = b"\xef\xbb\xbf"  # files saved by spreadsheet tools often start with one


def strict_line(record: Any) -> str:
    """``record`` as one line of strict JSON: a non-finite float (a diversity over one seed, the mean of no
    finite score) becomes ``null``, which every JSON reader takes (``NaN`` is not JSON)."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def read_jsonl(path: str | Path, *, required: Sequence[str] = (), what: str = "JSONL file",
               skip_torn: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each non-blank line of ``path``, in file order.

    Raises :class:`~drpo_core.errors.DrpoError` with one line: ``"{what} not found: {path}"`` for a
    missing file, else ``"{path}:{line}: ..."`` for a line that is not UTF-8, not JSON, not a JSON
    object, or lacks one of the ``required`` keys. ``skip_torn``: a last line without its newline
    (an append-only log whose writer died mid-line) is dropped instead of parsed.
    """
    path = Path(path)
    if not path.exists():
        raise DrpoError(f"{what} not found: {path}")
    if not path.is_file():
        raise DrpoError(f"{what} is not a file: {path}")
    lines = path.read_bytes().removeprefix(_BOM).split(b"\n")
    if skip_torn or not lines[-1]:
        lines.pop()  # the text after the last newline: empty, or the torn line
    rows = []
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DrpoError(f"{path}:{number}: not UTF-8 text (bad byte at column {error.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DrpoError(f"{path}:{number}: bad JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise DrpoError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [key for key in required if key not in row]
        if missing:
            keys = ", ".join(f'"{key}"' for key in missing)
            raise DrpoError(f"{path}:{number}: missing {keys} key{'s' if len(missing) > 1 else ''}")
        rows.append((number, row))
    return rows
