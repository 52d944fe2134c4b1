"""GenEval's rules (drpo_geneval.rules): count, colour, position, include/exclude logic."""

import pytest

from drpo_geneval.rules import Detection, evaluate, keep_confident, relative_position


def det(score=1.0, box=(0, 0, 10, 10), color=None):
    return Detection(score, box, color)


def counting(cls, count, color=None):
    include = {"class": cls, "count": count}
    if color:
        include["color"] = color
    return {"tag": "counting", "include": [include], "exclude": [{"class": cls, "count": count + 1}]}


def test_count_exact_passes_and_too_few_or_too_many_fail():
    meta = counting("dog", 2)
    assert evaluate({"dog": [det(), det()]}, meta).correct
    assert not evaluate({"dog": [det()]}, meta).correct
    assert not evaluate({"dog": [det()] * 3}, meta).correct  # violates the exclude clause
    assert not evaluate({}, meta).correct
    assert not evaluate({"cat": [det(), det()]}, meta).correct


def test_include_without_exclude_is_at_least():
    meta = {"include": [{"class": "dog", "count": 2}]}
    assert evaluate({"dog": [det()] * 5}, meta).correct


def test_colour_counts_only_the_best_scored_detections():
    meta = {"include": [{"class": "ball", "count": 2, "color": "red"}]}
    red_best = {"ball": [det(0.5, color="blue"), det(0.9, color="red"), det(0.8, color="red")]}
    assert evaluate(red_best, meta).correct
    blue_in_top2 = {"ball": [det(0.95, color="blue"), det(0.9, color="red"), det(0.8, color="red")]}
    verdict = evaluate(blue_in_top2, meta)
    assert not verdict.correct
    assert "red" in verdict.clauses[0].reason


def test_exclude_clauses_are_or():
    meta = {"include": [], "exclude": [{"class": "a", "count": 1}, {"class": "b", "count": 2}]}
    assert evaluate({"b": [det()]}, meta).correct
    assert not evaluate({"a": [det()]}, meta).correct
    assert not evaluate({"b": [det(), det()]}, meta).correct


def test_include_clauses_are_and_and_clause_results_are_reported():
    meta = {"include": [{"class": "a", "count": 1}, {"class": "b", "count": 1}]}
    verdict = evaluate({"a": [det()]}, meta)
    assert not verdict.correct
    assert [c.satisfied for c in verdict.clauses] == [True, False]
    assert verdict.fraction_satisfied == 0.5


def test_relative_position_uses_the_shrunk_offset():
    left, right = (0, 0, 10, 10), (20, 0, 30, 10)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 20, 10, 30)) == {"above"}
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    # centres 1 px apart, boxes 10 px wide: 1 - 0.1 * 20 < 0, no relation
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # diagonal at 45 degrees: each normalised component is ~0.7 minus the shrink, both relations hold
    assert relative_position((0, 0, 2, 2), (40, 40, 42, 42)) == {"left of", "above"}
    # a steep diagonal names only the dominant direction
    assert relative_position((0, 0, 2, 2), (10, 40, 12, 42)) == {"above"}


def test_position_checks_every_found_object_against_the_target_group():
    meta = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    cat, dog_right, dog_left = det(box=(0, 0, 10, 10)), det(box=(30, 0, 40, 10)), det(box=(-30, 0, -20, 10))
    assert evaluate({"cat": [cat], "dog": [dog_right]}, meta).correct
    assert not evaluate({"cat": [cat], "dog": [dog_left]}, meta).correct
    verdict = evaluate({"dog": [dog_right]}, meta)  # target group not matched
    assert not verdict.correct
    assert "no target" in verdict.clauses[1].reason


def test_unknown_relation_is_an_error():
    meta = {"include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]}
    with pytest.raises(ValueError, match="near"):
        evaluate({"a": [det()], "b": [det()]}, meta)


def test_keep_confident_thresholds_sorts_and_caps():
    found = {"a": [det(0.2), det(0.95), det(0.91)], "b": [det(0.1)]}
    kept = keep_confident(found, threshold=0.9, max_objects=1)
    assert list(kept) == ["a"]
    assert [d.score for d in kept["a"]] == [0.95]
