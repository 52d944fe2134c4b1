"""GenEval as a ranker (``geneval``, ``geneval-soft``), its rules and its prompts.

``geneval`` scores an image 1.0 when a detector and GenEval's rules (:mod:`drpo_geneval.rules`) find the
prompt's objects, counts, colours and positions, else 0.0: a binary ranker, trained with the binary rollout
(method.md §7.4). ``geneval-soft`` scores the share of clauses met (graded). The variants name GenEval's
sub-tasks (``geneval:counting``): each recommends that task's training prompts (generated, never GenEval's
evaluation prompts: :mod:`drpo_geneval.training_prompts`) and its evaluation prompts; plain ``geneval``
recommends all six. Evaluation reports accuracy per task.

Models: Mask2Former (COCO instance segmentation; transformers' checkpoint, not GenEval's mmdet one, so scores
are close to GenEval's, not identical) or OWLv2, and CLIP ViT-L/14 for colours (:mod:`drpo_geneval.detectors`,
:mod:`drpo_geneval.colors`). ``drpo geneval prompts`` writes training prompts. Registration only: torch and
transformers are imported inside the factories.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import Ranker, Units
from drpo_geneval.options import GenevalOptions
from drpo_geneval.vocabulary import TAGS

if TYPE_CHECKING:
    import typer


def prompt_recommendations(variant: str | None) -> dict[str, Any]:
    """A GenEval task's prompts (all six tasks without a variant): its generated training prompts and all of its
    evaluation prompts."""
    suffix = f"_{variant}" if variant else ""
    return {
        "prompts.path": f"pkg://drpo_geneval/data/train{suffix}.jsonl",
        "prompts.eval_path": f"pkg://drpo_geneval/data/eval{suffix}.jsonl",
        "prompts.eval_count": "all",
    }


def recommendations(variant: str | None) -> dict[str, Any]:
    """The binary ranker's run settings: the task's prompts and the binary rollout of method.md §7.4 (up to 4
    rounds of K no-grad candidates, 8 correct and 8 wrong anchors, else the prompt is skipped)."""
    return {"source.kind": "online", "selection.rollout_rounds": 4, "selection.positives": 8,
            "selection.negatives": 8, **prompt_recommendations(variant)}


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    # units: GenEval is reported in percent correct (counting 33.8 -> 42.5), its Overall the mean of the tasks'
    # accuracies; requires: both score against
    # each prompt's GenEval clauses, so a run's prompt files must be GenEval .jsonl (checked before loading)
    register("geneval", _build, options=GenevalOptions, defaults=recommendations, variants=TAGS,
             units=Units(100, "%", mean_of_groups=True), provides=("binary",), requires=("geneval-prompts",),
             summary="GenEval correctness (0/1): Mask2Former or OWLv2 detections, CLIP colours, GenEval's rules; "
                     "variants per task (geneval:counting)")
    register("geneval-soft", _build_soft, options=GenevalOptions, defaults=prompt_recommendations, variants=TAGS,
             units=Units(100, "%", mean_of_groups=True), requires=("geneval-prompts",),
             summary="GenEval's share of clauses met (graded): the geneval ranker's denser signal")


@hookimpl
def drpo_register_commands(cli: typer.Typer) -> None:
    from drpo_geneval.commands import geneval

    cli.add_typer(geneval, name="geneval")


def _build(options: GenevalOptions, context: BuildContext) -> Ranker:
    from drpo_geneval.ranker import build_ranker

    return build_ranker(options, context)


def _build_soft(options: GenevalOptions, context: BuildContext) -> Ranker:
    from drpo_geneval.ranker import build_ranker

    return build_ranker(options, context, soft=True)
