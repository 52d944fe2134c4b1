"""The online source without a generator: binary selection with a memory of correct samples, graded
ties; and the data source's real images read from a JSONL list."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from drpo_core.errors import DrpoError
from drpo_core.prompts import PromptRecord
from drpo_core.sources import ImageFolderSampler, OnlineSource


class _Visit:
    """One visit of prompt "p": K candidates whose latent is their id; ``correct`` ids score 1."""

    def __init__(self, ids: list[int], correct: set[int], step: int):
        self.records = [type("Record", (), {"text": "p", "metadata": None})()]
        self.indices, self.step, self.correct = [step], step, correct
        self.latents = torch.tensor(ids, dtype=torch.float32)[:, None]
        self.features = self.featurise(self.latents, ['p'] * len(ids))

    def score(self, latents, records):
        scores = torch.tensor([float(int(x) in self.correct) for x in latents[:, 0]])
        return scores.reshape(len(records), -1), torch.ones(len(records), dtype=torch.bool)

    def rollout(self, prompts, round_index):
        raise AssertionError("one rollout round only")

    def featurise(self, latents, prompts):
        return {"x": latents[:, None, :]}


def _source(memory: int) -> OnlineSource:
    return OnlineSource(binary=True, positives=2, negatives=2, rollout_rounds=1, seed=0, positive_memory=memory)


def test_remembered_correct_samples_top_up_a_later_visit():
    source = _source(memory=4)
    first = source.anchors(_Visit([0, 1, 2, 3], correct={0}, step=0), k=4)
    assert not first.keep[0] and first.skips["rollout"] == 1  # one correct of the two needed
    second = source.anchors(_Visit([10, 11, 12, 13], correct={11}, step=1), k=4)
    assert second.keep[0]
    assert sorted(second.positives["x"][0, :, 0].tolist()) == [0.0, 11.0]  # remembered + fresh
    assert set(second.negatives["x"][0, :, 0].tolist()) <= {10.0, 12.0, 13.0}
    assert source.memory["p"][:, 0].tolist() == [0.0, 11.0]


def test_without_memory_the_same_visits_are_skipped():
    source = _source(memory=0)
    for step, ids, correct in [(0, [0, 1, 2, 3], {0}), (1, [10, 11, 12, 13], {11})]:
        assert not source.anchors(_Visit(ids, correct, step), k=4).keep[0]
    assert source.memory == {}


def test_memory_keeps_the_most_recent_and_is_unused_when_the_visit_has_enough():
    source = _source(memory=2)
    source.anchors(_Visit([0, 1, 2, 3], correct={0, 1}, step=0), k=4)
    third = source.anchors(_Visit([20, 21, 22, 23], correct={20, 21}, step=1), k=4)
    assert sorted(third.positives["x"][0, :, 0].tolist()) == [20.0, 21.0]  # fresh ones suffice
    assert source.memory["p"][:, 0].tolist() == [20.0, 21.0]  # capped at 2, newest kept


# -- graded rankers: ties -------------------------------------------------------------------------


class _Graded:
    """One micro-batch of graded scores (B, K) given directly; each candidate's latent is its index."""

    def __init__(self, scores: list[list[float]], step: int = 0, ok: list[bool] | None = None):
        self.scores = torch.tensor(scores, dtype=torch.float64)
        B, K = self.scores.shape
        self.records = [type("Record", (), {"text": f"p{b}", "metadata": None})() for b in range(B)]
        self.indices, self.step = list(range(B)), step
        self.ok = torch.tensor(ok if ok is not None else [True] * B)
        self.latents = torch.arange(float(K)).repeat(B)[:, None]
        self.features = {"x": self.latents[:, None, :]}

    def score(self, latents, records):
        return self.scores, self.ok.clone()


def _graded(batch: _Graded):
    source = OnlineSource(binary=False, positives=2, negatives=2, rollout_rounds=1, seed=0)
    anchors = source.anchors(batch, k=batch.scores.shape[1])
    picked = lambda features: [sorted(row[:, 0].tolist()) for row in features["x"]]  # noqa: E731
    return anchors, picked(anchors.positives), picked(anchors.negatives)


def test_all_equal_scores_are_skipped_as_tied_not_counted_as_failures():
    anchors, _, _ = _graded(_Graded([[1.0] * 6, [0.0, 1, 2, 3, 4, 5], [2.0] * 6], ok=[True, True, False]))
    assert anchors.keep.tolist() == [False, True, False]
    assert anchors.skips == {"failure": 1, "tied": 1}
    assert anchors.stats["score_positives"] == 4.5 and anchors.stats["score_negatives"] == 0.5  # kept prompt only


def test_a_tie_straddling_the_boundary_draws_among_the_tied_candidates_by_step():
    scores = [[9.0, 5.0, 5.0, 5.0, 5.0, 1.0, 0.0]]
    draws = set()
    for step in range(12):
        anchors, pos, neg = _graded(_Graded(scores, step=step))
        assert anchors.keep.tolist() == [True] and anchors.skips["tied"] == 0
        assert pos[0][0] == 0.0  # candidate 0 (score 9) is always a positive
        assert neg == [[5.0, 6.0]]
        assert _graded(_Graded(scores, step=step))[1] == pos  # the same seed, the same draw
        draws.add(pos[0][1])
    assert draws <= {1.0, 2.0, 3.0, 4.0} and len(draws) > 1


def test_strictly_separated_scores_keep_the_top_and_bottom():
    anchors, pos, neg = _graded(_Graded([[0.3, 0.9, 0.1, 0.5, 0.7, 0.2]]))
    assert anchors.keep.tolist() == [True] and anchors.skips == {"failure": 0, "tied": 0}
    assert pos == [[1.0, 4.0]] and neg == [[2.0, 5.0]]


def test_scores_keep_the_rankers_precision_and_wrong_counts_are_one_error():
    import pytest

    from drpo_core.errors import ComponentError
    from drpo_core.sources import check_scores

    values = torch.tensor([0.1, 0.2, 1 / 3], dtype=torch.float64)
    for low in (torch.float32, torch.bfloat16, torch.float16):
        narrow = values.to(low)
        checked = check_scores(narrow[:, None], 3, "r")
        assert checked.dtype == torch.float64 and torch.equal(checked.to(low), narrow)
    squeezed = [1e4 + 1e-9, 1e4 + 2e-9]  # equal in float32
    assert check_scores(squeezed, 2, "r").tolist() == squeezed
    assert torch.equal(check_scores(values.numpy(), 3, "r"), values)
    with pytest.raises(ComponentError, match=r"ranker 'r' returned 4 scores for 3 images"):
        check_scores(torch.zeros(2, 2), 3, "r")
    with pytest.raises(ComponentError, match=r"ranker 'r' returned scores that are not numbers"):
        check_scores(["high", "low"], 2, "r")


# -- ImageFolderSampler -----------------------------------------------------------------------------


def _image(path, value: int, size=(6, 4)) -> str:
    """A flat grey image of ``value`` (its identity once sampled: mean * 255), ``size`` (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path.name


@pytest.fixture
def images_file(tmp_path):
    """Cats 10, 20, 30 (two rows for one prompt), a dog 200, paths relative to the file's folder."""
    for value in (10, 20, 30):
        _image(tmp_path / "data" / "cats" / f"{value}.png", value)
    _image(tmp_path / "data" / "dog.png", 200)
    path = tmp_path / "data" / "images.jsonl"
    rows = [{"prompt": "a cat", "images": ["cats/10.png", "cats/20.png"]}, {"prompt": "a dog", "images": "dog.png"},
            {"prompt": "a cat", "images": ["cats/30.png"]}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(row) + "\n" for row in rows[1:]))
    return path


def _values(images: torch.Tensor) -> list[int]:
    assert torch.equal(images, images[:, :1, :1, :1].expand_as(images))  # each image is flat
    return (images[:, 0, 0, 0] * 255).round().int().tolist()


def test_image_folder_samples_a_prompts_images_by_seed(images_file):
    sampler = ImageFolderSampler(images_file, image_size=(8, 8))
    cat = PromptRecord("a cat")
    first = sampler.sample(cat, 6, seed=0)
    assert first.shape == (6, 3, 8, 8) and first.dtype == torch.float32  # resized from 6x4
    assert _values(first) == [30, 10, 30, 10, 20, 10]  # torch.randint under a generator seeded 0
    assert torch.equal(sampler.sample(cat, 6, seed=0), first)  # the same seed, the same images
    draws = {tuple(_values(sampler.sample(cat, 6, seed=seed))) for seed in range(8)}
    assert len(draws) > 1 and set().union(*draws) == {10, 20, 30}  # the file's two rows, one pool
    assert _values(sampler.sample(PromptRecord("a dog"), 2, seed=5)) == [200, 200]


def test_image_folder_unknown_prompt_is_one_clear_error(images_file):
    sampler = ImageFolderSampler(images_file, image_size=(8, 8))
    with pytest.raises(DrpoError, match="^data source: no images for prompt 'a bird'$"):
        sampler.sample(PromptRecord("a bird"), 2, seed=0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"prompt": "a bird"}', 'images.jsonl:5: missing "images" key'),
        ('{"prompt": "a bird", "images": ["bird.png"]}', "images.jsonl:5: image not found: bird.png"),
        ('{"prompt": "a bird", "images": [1]}', 'images.jsonl:5: "images" must be a path or a list of paths'),
        ('{"prompt": ["a bird"], "images": []}', 'images.jsonl:5: "prompt" must be a string'),
        ('{"prompt": "a bird", ', "images.jsonl:5: bad JSON"),
    ],
)
def test_image_folder_bad_row_names_file_and_line(images_file, row, message):
    images_file.write_text(images_file.read_text() + row + "\n")
    with pytest.raises(DrpoError, match=message) as info:
        ImageFolderSampler(images_file, image_size=(8, 8))
    assert str(info.value).startswith(f"{images_file}:5: ")


def test_image_folder_missing_file(tmp_path):
    with pytest.raises(DrpoError, match="^source.path: data file not found: .*none.jsonl$"):
        ImageFolderSampler(tmp_path / "none.jsonl", image_size=(8, 8))
