"""GenEval-style rankers for the toy world: the programmatic detector plus ``drpo_geneval.rules``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from drpo_core.errors import ComponentError
from drpo_core.interfaces import Ranker
from drpo_geneval.rules import evaluate
from drpo_shapes.detect import as_array, detect_batch
from drpo_shapes.world import parse_prompt, prompt_metadata


class ShapesCountingRanker(Ranker):
    """1.0 when the image shows exactly the prompt's objects (count, colour, shape), else 0.0.

    Metadata passed by the loop wins; prompts without it are parsed with the world's grammar.
    """

    binary = True

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any] | None],
    ) -> torch.Tensor:
        if not (len(images) == len(prompts) == len(metadata)):
            raise ComponentError(
                f"shapes ranker got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata"
            )
        scores = []
        for found, prompt, meta in zip(detect_batch(as_array(images)), prompts, metadata, strict=True):
            verdict = evaluate(found, meta if meta is not None else prompt_metadata(prompt))
            scores.append(float(verdict.correct))
        return torch.tensor(scores, dtype=torch.float32)

    def groups(self, record: Any) -> list[str]:
        """Evaluation breaks accuracy down by count, shape and colour."""
        scene = parse_prompt(record.text)
        return [f"count={scene.count}", f"shape={scene.shape}", f"color={scene.color}"]
