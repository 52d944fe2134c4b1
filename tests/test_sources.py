"""The online source's binary selection with a memory of correct samples (no generator needed)."""

import torch

from drpo_core.sources import OnlineSource


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
