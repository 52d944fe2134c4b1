"""GenEval's correctness rules, as pure Python (no detector, no torch).

A detector turns an image into ``{class: [Detection, ...]}``; ``evaluate`` checks those detections
against a prompt's metadata exactly as GenEval's ``evaluate_images.py`` does:

* ``include`` clauses are combined with AND, ``exclude`` clauses with OR;
* count: ``len(objects[cls][:count]) >= count``, detections taken in descending score order;
* color: among those first ``count`` detections, at least ``count`` have the requested colour;
* position ``[relation, group]``: every found object has ``relation`` to every object of the
  earlier include clause number ``group`` (see ``relative_position``);
* exclude: ``len(objects[cls]) >= count`` makes the image wrong.

Thresholds (GenEval: 0.3, or 0.9 for counting prompts; at most 16 objects per class) are applied
by ``keep_confident`` before ``evaluate``, as GenEval applies them right after detection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POSITION_THRESHOLD = 0.1
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Detection:
    """One detected object: confidence, box ``(x0, y0, x1, y1)`` in pixels (y down), colour name."""

    score: float
    box: tuple[float, float, float, float]
    color: str | None = None
    mask: Any = None


@dataclass(frozen=True)
class ClauseResult:
    kind: str  # "include" or "exclude"
    clause: Mapping[str, Any]
    satisfied: bool
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    correct: bool
    clauses: tuple[ClauseResult, ...]

    @property
    def fraction_satisfied(self) -> float:
        """Share of clauses met: a denser score than ``correct`` for ranking."""
        return sum(c.satisfied for c in self.clauses) / len(self.clauses) if self.clauses else 1.0


def keep_confident(
    detections: Mapping[str, Sequence[Detection]], threshold: float, max_objects: int = 16
) -> dict[str, list[Detection]]:
    """Detections above ``threshold``, best first, at most ``max_objects`` per class; empty classes dropped."""
    kept = {}
    for cls, found in detections.items():
        best = sorted((d for d in found if d.score > threshold), key=lambda d: d.score, reverse=True)
        if best:
            kept[cls] = best[:max_objects]
    return kept


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of A to B: the centre offset, each axis shrunk by ``threshold * (size_a + size_b)``,
    divided by the unshrunk offset's length; a component beyond +-0.5 names a relation."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box_a[:4], box_b[:4]
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    sizes = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    revised = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, sizes, strict=True)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(
    detections: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    *,
    position_threshold: float = POSITION_THRESHOLD,
) -> Verdict:
    """Whether the detections satisfy every ``include`` clause and no ``exclude`` clause."""
    ordered = {cls: sorted(found, key=lambda d: d.score, reverse=True) for cls, found in detections.items()}
    results: list[ClauseResult] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        found = ordered.get(req["class"], [])[: req["count"]]
        reason = _include_failure(req, found, matched_groups, position_threshold)
        matched_groups.append(None if reason else found)
        results.append(ClauseResult("include", req, not reason, reason))
    for req in metadata.get("exclude", []):
        n = len(ordered.get(req["class"], []))
        violated = n >= req["count"]
        reason = f"expected {req['class']} < {req['count']}, found {n}" if violated else ""
        results.append(ClauseResult("exclude", req, not violated, reason))
    return Verdict(all(r.satisfied for r in results), tuple(results))


def _include_failure(
    req: Mapping[str, Any],
    found: list[Detection],
    matched_groups: list[list[Detection] | None],
    position_threshold: float,
) -> str:
    """Why an include clause fails ("" when it holds), checking count, then colour, then position."""
    cls, count = req["class"], req["count"]
    if len(found) < count:
        return f"expected {cls} >= {count}, found {len(found)}"
    if "color" in req:
        colors = [d.color for d in found]
        if colors.count(req["color"]) < count:
            return f"expected {req['color']} {cls} >= {count}, found colours {colors}"
    if "position" in req:
        relation, group = req["position"]
        if relation not in RELATIONS:
            raise ValueError(f"unknown position relation {relation!r}; known: {', '.join(RELATIONS)}")
        targets = matched_groups[group] if 0 <= group < len(matched_groups) else None
        if targets is None:
            return f"no target for {cls} to be {relation}"
        for obj in found:
            for target in targets:
                if relation not in relative_position(obj.box, target.box, position_threshold):
                    return f"expected {cls} {relation} target"
    return ""


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two boxes, counting pixels inclusively (a box ``(0, 0, 9, 9)`` is 10x10), as
    GenEval's overlap filter does."""

    def area(x0: float, y0: float, x1: float, y1: float) -> float:
        return max(x1 - x0 + 1, 0.0) * max(y1 - y0 + 1, 0.0)

    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a[:4]) + area(*box_b[:4]) - inter
    return inter / union if union else 0.0


def suppress_overlaps(detections: Sequence[Detection], max_overlap: float) -> list[Detection]:
    """Best first, each detection dropped when its box overlaps an already kept one by ``max_overlap`` IoU or
    more (GenEval's ``max_overlap``; 1.0 turns the filter off)."""
    ordered = sorted(detections, key=lambda d: d.score, reverse=True)
    if max_overlap >= 1:
        return ordered
    kept: list[Detection] = []
    for detection in ordered:
        if all(box_iou(detection.box, other.box) < max_overlap for other in kept):
            kept.append(detection)
    return kept
