"""The geneval ranker's rules on hand-built detections: a table of cases read from upstream GenEval's
``evaluate`` and ``relative_position`` (evaluation/evaluate_images.py), and properties that hold by
construction (hypothesis)."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drpo_geneval.options import GenevalOptions
from drpo_geneval.ranker import GenevalRanker, GenevalSoftRanker, metadata_problem
from drpo_geneval.rules import Detection, box_iou, evaluate, relative_position, suppress_overlaps


class ListedDetector:
    """Returns the detections it was given, one mapping per picture."""

    def __init__(self, found):
        self.found, self.min_scores = found, []

    def detect(self, pictures, min_score):
        self.min_scores.append(min_score)
        return [{cls: list(ds) for cls, ds in f.items() if ds} for f in self.found[:len(pictures)]]


class TrueColours:
    """A colour classifier that reads the colour the test gave a detection, and records what it was asked."""

    def __init__(self):
        self.asked = []

    def classify(self, requests):
        self.asked += [(name, d.score) for _, d, name in requests]
        return [d.color or "white" for _, d, _ in requests]


def ranker(found, soft=False, **options):
    colours = TrueColours()
    cls = GenevalSoftRanker if soft else GenevalRanker
    r = cls(ListedDetector(found), lambda: colours, GenevalOptions(**options))
    r.asked = colours.asked
    return r


def verdict(found, meta, **options):
    return ranker([found], **options).verdicts([None], [meta])[0]


def d(score=0.95, box=(0, 0, 10, 10), color=None):
    return Detection(score, box, color)


def counting(cls, n):
    return {"tag": "counting", "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}]}


def position(obj, relation, target):
    return {"tag": "position", "include": [{"class": target, "count": 1},
                                           {"class": obj, "count": 1, "position": [relation, 0]}]}


LEFT, MIDDLE, RIGHT = (0, 0, 10, 10), (40, 0, 50, 10), (80, 0, 90, 10)
SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
TWO = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
ATTR = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                         {"class": "cup", "count": 1, "color": "blue"}]}

# (case, detections, metadata, correct, words of the first failing clause's reason)
CASES = [
    ("single: a detection above 0.3 counts", {"dog": [d(0.31)]}, SINGLE, True, ""),
    ("single: the threshold is strict (0.3 does not count)", {"dog": [d(0.3)]}, SINGLE, False, "dog >= 1, found 0"),
    ("single: other objects do not matter", {"dog": [d()], "cat": [d(), d()]}, SINGLE, True, ""),
    ("two: both objects", {"dog": [d()], "cat": [d(0.4)]}, TWO, True, ""),
    ("two: one missing", {"dog": [d()]}, TWO, False, "cat >= 1, found 0"),
    ("counting: exactly n at 0.9+", {"clock": [d(0.95), d(0.91)]}, counting("clock", 2), True, ""),
    ("counting: the threshold is 0.9 for counting prompts", {"clock": [d(0.95), d(0.89)]}, counting("clock", 2),
     False, "clock >= 2, found 1"),
    ("counting: a third object under 0.9 is not counted", {"clock": [d(0.95), d(0.92), d(0.85)]},
     counting("clock", 2), True, ""),
    ("counting: one too many violates the exclude clause", {"clock": [d(0.95)] * 3}, counting("clock", 2), False,
     "clock < 3, found 3"),
    ("counting: 16 objects at most per class, so 17 can never be found", {"clock": [d(0.95)] * 20},
     {"tag": "counting", "include": [{"class": "clock", "count": 17}]}, False, "found 16"),
    ("exclude: counts every confident object, not only the best count", {"dog": [d(0.5), d(0.4)]},
     {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog", "count": 2}]},
     False, "dog < 2, found 2"),
    ("exclude: clauses are or-ed", {"cat": [d()]},
     {"tag": "x", "include": [], "exclude": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}, False,
     "cat < 1"),
    ("colors: the best detection has the colour", {"car": [d(0.9, color="red"), d(0.5, color="blue")]}, RED_CAR,
     True, ""),
    ("colors: only the best count detections are looked at", {"car": [d(0.9, color="blue"), d(0.5, color="red")]},
     RED_CAR, False, "expected red car >= 1, found colours ['blue']"),
    ("color_attr: each object its own colour", {"car": [d(color="red")], "cup": [d(color="blue")]}, ATTR, True, ""),
    ("color_attr: colours swapped", {"car": [d(color="blue")], "cup": [d(color="red")]}, ATTR, False, "red car"),
    ("position: right of the target", {"teddy bear": [d(box=LEFT)], "dog": [d(box=RIGHT)]},
     position("dog", "right of", "teddy bear"), True, ""),
    ("position: on the wrong side", {"teddy bear": [d(box=RIGHT)], "dog": [d(box=LEFT)]},
     position("dog", "right of", "teddy bear"), False, "dog right of target"),
    ("position: the target missing", {"dog": [d(box=RIGHT)]}, position("dog", "right of", "teddy bear"), False,
     "teddy bear >= 1"),
    ("position: only the target's best count objects form its group",
     {"teddy bear": [d(0.9, LEFT), d(0.5, RIGHT)], "dog": [d(box=MIDDLE)]}, position("dog", "right of", "teddy bear"),
     True, ""),
    ("position: every object of the clause against every object of the group",
     {"teddy bear": [d(box=LEFT), d(box=(60, 0, 70, 10))], "dog": [d(box=RIGHT), d(box=MIDDLE)]},
     {"tag": "position", "include": [{"class": "teddy bear", "count": 2},
                                     {"class": "dog", "count": 2, "position": ["right of", 0]}]},
     False, "dog right of target"),
    ("position: a clause whose colour fails gives no target",
     {"car": [d(box=LEFT, color="blue")], "dog": [d(box=RIGHT)]},
     {"tag": "x", "include": [{"class": "car", "count": 1, "color": "red"},
                              {"class": "dog", "count": 1, "position": ["right of", 0]}]}, False, "red car"),
    ("position: objects at the same place have no relation", {"cat": [d(box=LEFT)], "dog": [d(box=(1, 1, 11, 11))]},
     position("dog", "left of", "cat"), False, "dog left of target"),
]


@pytest.mark.parametrize("found, meta, correct, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_upstream_evaluate_cases(found, meta, correct, reason):
    result = verdict(found, meta)
    assert result.correct is correct
    if reason:
        failed = [c for c in result.clauses if not c.satisfied]
        assert reason in failed[0].reason


# (a, b, relations of a to b): centre offset shrunk by 0.1 x (size a + size b), over the unshrunk length, > 0.5
RELATIVE_POSITIONS = [
    ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),          # (20 - 2) / 20 = 0.9
    ((6, 0, 16, 10), (0, 0, 10, 10), {"right of"}),          # (6 - 2) / 6 = 0.67
    ((4, 0, 14, 10), (0, 0, 10, 10), set()),                 # (4 - 2) / 4 = 0.5 is not beyond 0.5
    ((3, 0, 13, 10), (0, 0, 10, 10), set()),                 # (3 - 2) / 3 = 0.33
    ((0, 30, 10, 40), (0, 0, 10, 10), {"below"}),            # y grows downwards
    ((0, 0, 10, 10), (0, 30, 10, 40), {"above"}),
    ((0, 0, 2, 2), (40, 40, 42, 42), {"left of", "above"}),  # 39.6 / 56.6 = 0.7 on both axes
    ((0, 0, 2, 2), (10, 40, 12, 42), {"above"}),             # 9.6 / 41.2 = 0.23 across, 0.96 up
    ((0, 0, 100, 10), (60, 0, 160, 10), {"left of"}),        # (60 - 20) / 60 = 0.67
    ((0, 0, 100, 100), (30, 0, 130, 100), set()),            # (30 - 20) / 30 = 0.33: big boxes need more
    ((0, 0, 10, 10), (1, 1, 11, 11), set()),                 # both offsets inside the shrink
    ((0, 0, 10, 10), (0, 0, 10, 10), set()),                 # the same box
]


@pytest.mark.parametrize("a, b, relations", RELATIVE_POSITIONS)
def test_upstream_relative_position_cases(a, b, relations):
    assert relative_position(a, b) == relations


def test_position_threshold_option_changes_the_shrink():
    meta = position("dog", "right of", "cat")
    found = {"cat": [d(box=(0, 0, 10, 10))], "dog": [d(box=(4, 0, 14, 10))]}  # offset 4, sizes 20
    assert not verdict(found, meta).correct  # (4 - 2) / 4 = 0.5
    assert verdict(found, meta, position_threshold=0.05).correct  # (4 - 1) / 4 = 0.75


def test_thresholds_follow_the_tag_and_the_options():
    found = {"dog": [d(0.5), d(0.5)]}
    assert verdict(found, {"tag": "two_object", "include": [{"class": "dog", "count": 2}]}).correct
    assert not verdict(found, {"tag": "counting", "include": [{"class": "dog", "count": 2}]}).correct
    assert verdict(found, {"tag": "counting", "include": [{"class": "dog", "count": 2}]}, counting_threshold=0.4).correct
    assert not verdict(found, {"tag": "two_object", "include": [{"class": "dog", "count": 2}]}, threshold=0.6).correct
    r = ranker([found], threshold=0.6, counting_threshold=0.2)
    r.verdicts([None], [SINGLE])
    assert r.detector.min_scores == [0.2]  # the detector is asked for what either threshold may keep


def test_colours_are_classified_only_where_a_clause_looks():
    found = {"car": [d(0.9, color="red"), d(0.8, color="red"), d(0.7)], "cup": [d(0.6, color="blue")]}
    r = ranker([found, found])
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    assert [v.correct for v in r.verdicts([None, None], [meta, SINGLE])] == [True, False]
    assert r.asked == [("car", 0.9), ("car", 0.8)]


def test_overlap_filter_is_off_by_default_and_greedy_when_on():
    twins = {"clock": [d(0.95, (0, 0, 10, 10)), d(0.94, (1, 0, 11, 10)), d(0.93, (50, 0, 60, 10))]}
    assert not verdict(twins, counting("clock", 2)).correct  # three clocks
    assert verdict(twins, counting("clock", 2), max_overlap=0.5).correct  # the near-duplicate is dropped
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # inclusive pixels: 10x10 boxes
    kept = suppress_overlaps([d(0.5, (0, 0, 9, 9)), d(0.9, (5, 0, 14, 9))], 1 / 3)
    assert [k.score for k in kept] == [0.9]


def test_soft_score_is_the_share_of_clauses_met():
    images = __import__("torch").rand(3, 3, 8, 8)
    found = [{"clock": [d()] * 2}, {"clock": [d()] * 3}, {}]
    meta = [counting("clock", 2)] * 3
    soft = ranker(found, soft=True).score(images, ["p"] * 3, meta)
    binary = ranker(found).score(images, ["p"] * 3, meta)
    assert soft.tolist() == [1.0, 0.5, 0.5] and binary.tolist() == [1.0, 0.0, 0.0]


def test_bad_metadata_is_named():
    assert "no GenEval metadata" in metadata_problem(None)
    assert "count must be a positive integer" in metadata_problem({"include": [{"class": "a", "count": 0}]})
    assert "colour 'teal'" in metadata_problem({"include": [{"class": "a", "count": 1, "color": "teal"}]})
    bad_position = {"include": [{"class": "a", "count": 1, "position": ["left of", 0]}]}
    assert "earlier include clause" in metadata_problem(bad_position)
    assert metadata_problem({"tag": "x", "include": [{"class": "a", "count": 1}]}) == ""


# ------------------------------------------------------------------------------------- properties

CLASSES = ["cat", "dog", "car"]
boxes = st.tuples(st.integers(0, 90), st.integers(0, 90), st.integers(1, 40), st.integers(1, 40)).map(
    lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))
colours = st.sampled_from(["red", "blue", None])


@st.composite
def scenes(draw):
    """Detections of a few classes with distinct scores (GenEval orders by score; equal scores have no order)."""
    n = draw(st.integers(0, 12))
    scores = draw(st.lists(st.floats(0.01, 0.99), min_size=n, max_size=n, unique=True))
    found = {}
    for score in scores:
        found.setdefault(draw(st.sampled_from(CLASSES)), []).append(Detection(score, draw(boxes), draw(colours)))
    return found


@st.composite
def metadata(draw):
    first = {"class": draw(st.sampled_from(CLASSES)), "count": draw(st.integers(1, 3))}
    if draw(st.booleans()):
        first["color"] = draw(st.sampled_from(["red", "blue"]))
    include = [first]
    if draw(st.booleans()):
        second = {"class": draw(st.sampled_from(CLASSES)), "count": draw(st.integers(1, 2))}
        if draw(st.booleans()):
            second["position"] = [draw(st.sampled_from(["left of", "right of", "above", "below"])), 0]
        include.append(second)
    meta = {"tag": draw(st.sampled_from(["counting", "position", "colors"])), "include": include}
    if draw(st.booleans()):
        meta["exclude"] = [{"class": first["class"], "count": first["count"] + 1}]
    return meta


def outcome(found, meta):
    result = verdict(found, meta)
    return result.correct, [c.satisfied for c in result.clauses]


@settings(max_examples=150, deadline=None)
@given(scenes(), metadata(), st.randoms(use_true_random=False))
def test_detection_order_does_not_matter(found, meta, rng):
    shuffled = {cls: rng.sample(ds, len(ds)) for cls, ds in rng.sample(list(found.items()), len(found))}
    assert outcome(shuffled, meta) == outcome(found, meta)


@settings(max_examples=150, deadline=None)
@given(scenes(), metadata(), st.lists(st.tuples(st.sampled_from(CLASSES), st.floats(0.0, 1.0), boxes, colours),
                                      max_size=8))
def test_detections_at_or_below_the_threshold_never_count(found, meta, extra):
    threshold = 0.9 if meta["tag"] == "counting" else 0.3
    noisy = {cls: list(ds) for cls, ds in found.items()}
    for cls, fraction, box, colour in extra:
        noisy.setdefault(cls, []).append(Detection(threshold * fraction, box, colour))
    assert outcome(noisy, meta) == outcome(found, meta)


MIRRORED = {"left of": "right of", "right of": "left of", "above": "above", "below": "below"}


def mirror_box(box, width=200):
    return (width - box[2], box[1], width - box[0], box[3])


@settings(max_examples=150, deadline=None)
@given(scenes(), metadata())
def test_mirrored_scenes_swap_left_and_right(found, meta):
    mirrored = {cls: [Detection(x.score, mirror_box(x.box), x.color) for x in ds] for cls, ds in found.items()}
    swapped = {**meta, "include": [
        {**c, "position": [MIRRORED[c["position"][0]], c["position"][1]]} if "position" in c else c
        for c in meta["include"]]}
    assert outcome(mirrored, swapped) == outcome(found, meta)


@settings(max_examples=200, deadline=None)
@given(boxes, boxes)
def test_relative_position_mirrors_and_reverses(a, b):
    relations = relative_position(a, b)
    assert relative_position(mirror_box(a), mirror_box(b)) == {MIRRORED[r] for r in relations}
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    assert relative_position(b, a) == {opposite[r] for r in relations}
    assert not {"left of", "right of"} <= relations and not {"above", "below"} <= relations


def test_evaluate_agrees_with_the_ranker_pipeline_on_sorted_input():
    rng = random.Random(0)
    found = {"dog": sorted((d(rng.uniform(0.31, 1)) for _ in range(3)), key=lambda x: -x.score)}
    assert evaluate(found, SINGLE).correct == verdict(found, SINGLE).correct
