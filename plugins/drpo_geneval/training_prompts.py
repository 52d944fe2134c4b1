"""Training prompts for GenEval's sub-tasks, generated from GenEval's own templates and kept apart from its
553 evaluation prompts (the paper trained on its evaluation prompts; drpo does not).

Rows have GenEval's metadata format (``{"tag", "include", ["exclude"], "prompt"}``, as ``evaluation_metadata.jsonl``).
Each tag's prompts follow GenEval's grammar ("a photo of two clocks", "a photo of a dog right of a teddy bear",
"a photo of a purple suitcase and an orange pizza"): objects from its 80 names, counts 2-4, its 10 colours
(never a coloured person), its 4 relations. A training row never repeats an evaluation prompt's text, nor,
where the task has room, its content (the same clauses worded the same way): single-object prompts cannot
avoid GenEval's 80 objects, so they are worded differently instead ("a picture of a bench").

The rows are drawn by a seeded generator, per tag, and depend only on the seed and the count.
The files shipped in ``drpo_geneval/data`` (``train_<tag>.jsonl``, ``train.jsonl`` with every tag, and the
evaluation prompts split by tag, ``eval_<tag>.jsonl``) are :func:`package_files`; ``drpo geneval prompts``
writes other selections.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from drpo_geneval.vocabulary import COLORS, OBJECT_NAMES, RELATIONS, TAGS

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
#: how single-object training prompts are worded (GenEval's evaluation uses "a photo of ...")
SINGLE_OBJECT_WORDINGS = ("a picture of {}", "an image of {}", "a photograph of {}", "{}")
#: training prompts per tag in the shipped files (fewer where the task has fewer)
PACKAGE_COUNT = 300
PACKAGE_SEED = 0
Row = dict[str, Any]


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _coloured_objects() -> list[str]:
    return [name for name in OBJECT_NAMES if name != "person"]  # GenEval has no "a red person"


def _row(tag: str, include: list[dict[str, Any]], prompt: str, exclude: list[dict[str, Any]] | None = None) -> Row:
    row: Row = {"tag": tag, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    row["prompt"] = prompt
    return row


def all_rows(tag: str) -> Iterable[Row] | None:
    """Every row of a small task, in a fixed order; None for the large ones (drawn at random instead)."""
    if tag == "single_object":
        return (_row(tag, [{"class": n, "count": 1}], w.format(with_article(n)))
                for w in SINGLE_OBJECT_WORDINGS for n in OBJECT_NAMES)
    if tag == "counting":
        return (_row(tag, [{"class": n, "count": k}], f"a photo of {NUMBERS[k]} {plural(n)}",
                     [{"class": n, "count": k + 1}]) for k in (2, 3, 4) for n in OBJECT_NAMES)
    if tag == "colors":
        return (_row(tag, [{"class": n, "count": 1, "color": c}], f"a photo of {with_article(c)} {n}")
                for c in COLORS for n in _coloured_objects())
    return None


def random_row(tag: str, rng: np.random.Generator) -> Row:
    """One row of a large task."""
    if tag == "two_object":
        a, b = (OBJECT_NAMES[i] for i in rng.choice(len(OBJECT_NAMES), 2, replace=False))
        return _row(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}],
                    f"a photo of {with_article(a)} and {with_article(b)}")
    if tag == "position":
        a, b = (OBJECT_NAMES[i] for i in rng.choice(len(OBJECT_NAMES), 2, replace=False))
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        # the first clause is the reference object, the second must stand in relation to it
        return _row(tag, [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                    f"a photo of {with_article(a)} {relation} {with_article(b)}")
    if tag == "color_attr":
        objects = _coloured_objects()
        a, b = (objects[i] for i in rng.choice(len(objects), 2, replace=False))
        ca, cb = (COLORS[i] for i in rng.choice(len(COLORS), 2, replace=False))
        return _row(tag, [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}")
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {', '.join(TAGS)}")


def content(row: Mapping[str, Any]) -> str:
    """A row's clauses, whatever its wording and their order: what two rows asking for the same image share
    ("a bird and a scissors" is "a scissors and a bird"). A position clause points at another clause by its
    index, so clauses keep their order there."""
    def canonical(clauses: Sequence[Any]) -> list[str]:
        texts = [json.dumps(clause, sort_keys=True) for clause in clauses]
        return texts if any("position" in clause for clause in clauses) else sorted(texts)

    return json.dumps([canonical(row.get("include", [])), canonical(row.get("exclude", []))])


def training_rows(tag: str, count: int, seed: int, avoid: Sequence[Mapping[str, Any]]) -> list[Row]:
    """``count`` distinct training rows of ``tag`` (all the task has when it has fewer), none sharing a text with
    ``avoid`` (the evaluation rows), nor its content except for single objects."""
    if tag not in TAGS:
        raise ValueError(f"unknown GenEval tag {tag!r}; known: {', '.join(TAGS)}")
    texts = {row["prompt"] for row in avoid}
    contents = {content(row) for row in avoid} if tag != "single_object" else set()
    rng = np.random.default_rng([seed, TAGS.index(tag)])

    def allowed(row: Row) -> bool:
        return row["prompt"] not in texts and content(row) not in contents

    enumerated = all_rows(tag)
    if enumerated is not None:
        pool = [row for row in enumerated if allowed(row)]
        order = rng.permutation(len(pool))
        return [pool[i] for i in order[:count]]
    rows: list[Row] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < count and attempts < 100 * count:
        attempts += 1
        row = random_row(tag, rng)
        if allowed(row) and row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def evaluation_rows() -> list[Row]:
    """GenEval's 553 evaluation rows, as shipped in this package."""
    return read_rows(Path(str(files("drpo_geneval").joinpath("data/eval.jsonl"))))


def read_rows(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def dumps(rows: Iterable[Row]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def package_files(evaluation: Sequence[Row]) -> dict[str, list[Row]]:
    """The shipped prompt files, by name: training rows per tag and for every tag, evaluation rows per tag."""
    out: dict[str, list[Row]] = {"eval.jsonl": list(evaluation)}
    every: list[Row] = []
    for tag in TAGS:
        rows = training_rows(tag, PACKAGE_COUNT, PACKAGE_SEED, evaluation)
        out[f"train_{tag}.jsonl"] = rows
        out[f"eval_{tag}.jsonl"] = [row for row in evaluation if row["tag"] == tag]
        every += rows
    out["train.jsonl"] = every
    return out


def write_package_files(directory: Path, evaluation: Sequence[Row]) -> list[Path]:
    """Write :func:`package_files` into ``directory`` (how the shipped files were made, from
    ``data/geneval/evaluation_metadata.jsonl``)."""
    written = []
    for name, rows in package_files(evaluation).items():
        path = directory / name
        path.write_text(dumps(rows), encoding="utf-8")
        written.append(path)
    return written
