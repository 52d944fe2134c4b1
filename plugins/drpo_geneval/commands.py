"""``drpo geneval prompts``: GenEval-style training prompts, kept apart from GenEval's evaluation prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from drpo_core.errors import DrpoError
from drpo_core.prompts import load_prompts

geneval = typer.Typer(no_args_is_help=True, help="GenEval: training prompts.")


@geneval.command()
def prompts(
    output: Annotated[Path, typer.Argument(help="JSONL file to write (GenEval's metadata format).")],
    tags: Annotated[list[str] | None, typer.Option("--tag", help="Task(s); default: all six.")] = None,
    count: Annotated[int, typer.Option(min=1, help="Prompts per task (fewer where the task has fewer).")] = 300,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the draw.")] = 0,
    avoid: Annotated[Path | None, typer.Option(help="Evaluation prompts to keep apart from (GenEval metadata "
                                                     "JSONL); default: GenEval's 553.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite OUTPUT if it exists.")] = False,
) -> None:
    """Write training prompts for GenEval tasks, none of them one of the evaluation prompts."""
    from drpo_geneval.training_prompts import dumps, evaluation_rows, training_rows
    from drpo_geneval.vocabulary import TAGS

    chosen = list(dict.fromkeys(tags or TAGS))
    unknown = [t for t in chosen if t not in TAGS]
    if unknown:
        raise DrpoError(f"--tag: unknown task {unknown[0]!r} (known: {', '.join(TAGS)})")
    if output.exists() and not force:
        raise DrpoError(f"{output} exists: choose another file or pass --force")
    evaluation = evaluation_rows() if avoid is None else _avoided(avoid)
    rows = [row for tag in chosen for row in training_rows(tag, count, seed, evaluation)]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(dumps(rows), encoding="utf-8")
    typer.echo(f"wrote {len(rows)} prompts to {output} ({', '.join(chosen)})")


def _avoided(path: Path) -> list[dict[str, Any]]:
    try:
        return [r.metadata or {"prompt": r.text} for r in load_prompts(path, "geneval")]
    except DrpoError as error:
        raise DrpoError(f"--avoid: {error}") from None
