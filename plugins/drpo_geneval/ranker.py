"""The ``geneval`` ranker: a detector, GenEval's rules and, for colour clauses, a CLIP colour classifier.

Per image: detections above the threshold (0.9 for counting prompts, else 0.3), best first, at most 16 per
class, go through :func:`drpo_geneval.rules.evaluate` with the prompt's GenEval metadata. The score is 1.0
when every ``include`` clause holds and no ``exclude`` clause is violated, else 0.0 (``geneval``), or the share
of clauses that hold (``geneval-soft``). Colours are classified only for the detections a colour clause
looks at (the best ``count`` of its class), in batches across the images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from drpo_core.errors import ComponentError
from drpo_core.interfaces import Ranker
from drpo_core.model_rankers import to_pictures
from drpo_geneval.rules import Detection, Verdict, evaluate, keep_confident, suppress_overlaps
from drpo_geneval.vocabulary import COLORS, RELATIONS

if TYPE_CHECKING:
    from PIL import Image

    from drpo_geneval.colors import ColorClassifier
    from drpo_geneval.detectors import Detector, Found
    from drpo_geneval.options import GenevalOptions


def metadata_problem(meta: Any) -> str:
    """Why ``meta`` is not GenEval metadata ("" when it is): include/exclude clauses of class and count, an
    optional colour, an optional position naming an earlier clause."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("include"), list):
        return "no GenEval metadata (a .jsonl prompt file with include/exclude clauses, as data/geneval's)"
    for kind in ("include", "exclude"):
        clauses = meta.get(kind, [])
        if not isinstance(clauses, list):
            return f"{kind} is not a list"
        for index, clause in enumerate(clauses):
            where = f"{kind}[{index}]"
            if not isinstance(clause, Mapping) or not isinstance(clause.get("class"), str):
                return f"{where} has no class"
            count = clause.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                return f"{where}: count must be a positive integer, got {count!r}"
            if "color" in clause and clause["color"] not in COLORS:
                return f"{where}: colour {clause['color']!r} is not one of {', '.join(COLORS)}"
            position = clause.get("position")
            if position is not None and (
                    not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                    or not isinstance(position[1], int) or not 0 <= position[1] < index or kind != "include"):
                return f"{where}: position must be [relation, index of an earlier include clause], got {position!r}"
    return ""


class GenevalRanker(Ranker):
    """GenEval's correctness of each image for its prompt's metadata: 1.0 or 0.0."""

    binary = True

    def __init__(self, detector: Detector, colors: Callable[[], ColorClassifier], options: GenevalOptions) -> None:
        self.detector = detector
        self._colors_factory = colors
        self._colors: ColorClassifier | None = None
        self.options = options

    @property
    def colors(self) -> ColorClassifier:
        """The colour classifier, loaded when a colour clause first needs it."""
        if self._colors is None:
            self._colors = self._colors_factory()
        return self._colors

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              metadata: Sequence[Mapping[str, Any] | None]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ComponentError(f"ranker 'geneval' takes images (B, 3, H, W), got {getattr(images, 'shape', images)}")
        if not len(images) == len(prompts) == len(metadata):
            raise ComponentError(f"ranker 'geneval' got {len(images)} images, {len(prompts)} prompts and "
                                 f"{len(metadata)} metadata")
        for prompt, meta in zip(prompts, metadata, strict=True):
            problem = metadata_problem(meta)
            if problem:
                raise ComponentError(f"ranker 'geneval': prompt {prompt!r}: {problem}")
        scores = torch.full((len(images),), float("nan"))
        rows = images.detach().flatten(1).isfinite().all(dim=1).nonzero().flatten().tolist()
        if rows:
            pictures = to_pictures(images[rows])
            verdicts = self.verdicts(pictures, [metadata[i] or {} for i in rows])
            scores[rows] = torch.tensor([self.value(v) for v in verdicts], dtype=torch.float32)
        return scores

    def value(self, verdict: Verdict) -> float:
        return float(verdict.correct)

    def verdicts(self, pictures: Sequence[Image.Image], metadata: Sequence[Mapping[str, Any]]) -> list[Verdict]:
        """GenEval's verdict on each picture for its metadata."""
        o = self.options
        raw = self.detector.detect(pictures, min(o.threshold, o.counting_threshold))
        found = [self.confident(r, m) for r, m in zip(raw, metadata, strict=True)]
        self._classify_colours(pictures, found, metadata)
        return [evaluate(f, m, position_threshold=o.position_threshold) for f, m in zip(found, metadata, strict=True)]

    def confident(self, raw: Found, meta: Mapping[str, Any]) -> dict[str, list[Detection]]:
        """GenEval's filter right after detection: the tag's threshold, best first, at most ``max_objects`` per
        class, then the overlap filter (off by default) among those."""
        o = self.options
        threshold = o.counting_threshold if meta.get("tag") == "counting" else o.threshold
        kept = keep_confident(raw, threshold, max_objects=o.max_objects)
        return {cls: suppress_overlaps(found, o.max_overlap) for cls, found in kept.items()}

    def _classify_colours(self, pictures: Sequence[Image.Image], found: list[dict[str, list[Detection]]],
                          metadata: Sequence[Mapping[str, Any]]) -> None:
        """Set the colour of each detection a colour clause looks at (the best ``count`` of its class)."""
        wanted: list[tuple[int, str, int]] = []  # (image, class, rank)
        for image, meta in enumerate(metadata):
            for clause in meta.get("include", []):
                if "color" in clause:
                    ranks = range(min(clause["count"], len(found[image].get(clause["class"], []))))
                    wanted += [(image, clause["class"], r) for r in ranks if (image, clause["class"], r) not in wanted]
        if not wanted:
            return
        requests = [(pictures[i], found[i][cls][r], cls) for i, cls, r in wanted]
        for (i, cls, r), colour in zip(wanted, self.colors.classify(requests), strict=True):
            found[i][cls][r] = dataclasses.replace(found[i][cls][r], color=colour)

    def groups(self, record: Any) -> list[str]:
        """Evaluation reports accuracy per GenEval sub-task (the record's tag)."""
        tag = (getattr(record, "metadata", None) or {}).get("tag")
        return [str(tag)] if tag else []


class GenevalSoftRanker(GenevalRanker):
    """The share of a prompt's clauses an image satisfies: a graded score (0, 1/2, 1 for a counting prompt)."""

    binary = False

    def value(self, verdict: Verdict) -> float:
        return verdict.fraction_satisfied


def build_ranker(options: GenevalOptions, context: Any, *, soft: bool = False) -> GenevalRanker:
    """The detector and, for the tasks with colours (and plain ``geneval``), the colour classifier; offline,
    every model they need that is missing is named in one line before anything loads."""
    from drpo_core.errors import PluginError
    from drpo_core.hub import missing_models, offline_message
    from drpo_core.model_rankers import pick_device, pick_dtype
    from drpo_geneval.colors import load_color_classifier
    from drpo_geneval.detectors import load_detector

    device = pick_device(options.device, context)
    dtype = pick_dtype(options.dtype, device, context)
    needed = options.hub_models(context.variant)  # CLIP now for the tasks with colours, else on a colour clause
    missing = missing_models(needed, context.config_dir)
    if missing:
        raise PluginError(f"ranker {'geneval-soft' if soft else 'geneval'!r}: {offline_message(missing)}")
    detector = load_detector(options, context, device, dtype)

    def colors() -> ColorClassifier:
        return load_color_classifier(options.clip_model, context, device, dtype, 4 * options.batch_size,
                                     options.background)

    ranker = (GenevalSoftRanker if soft else GenevalRanker)(detector, colors, options)
    if "clip_model" in needed:
        _ = ranker.colors
    return ranker
