"""Scores to anchors: ensembles, the loop's rank_candidates, top/bottom selection and ties, binary selection."""

from __future__ import annotations

import pytest
import torch

from drpo_core.ranking import (
    combine_scores,
    rank_candidates,
    select_binary,
    select_top_bottom,
    selection_seed,
    separated,
)


def test_zscore_combination_matches_hand_computation():
    a = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    b = torch.tensor([[10.0, 10.0, 10.0, 10.0]])  # constant ranker: std clamps at 1e-6, z = 0
    za = (a.double() - 3.0) / torch.tensor(3.5).sqrt()  # population variance of [1,2,3,6] = 3.5
    torch.testing.assert_close(combine_scores([a, b], weights=[3.0, 1.0]), 0.75 * za)
    torch.testing.assert_close(combine_scores([a, b]), combine_scores([a, b], weights=[2.0, 2.0]))
    assert combine_scores([a]).dtype == torch.float64


def test_rank_average_with_ties():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    torch.testing.assert_close(combine_scores([a], method="rank"),
                               torch.tensor([[0.0, 1.5, 1.5, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(combine_scores([a, b], method="rank"),
                               torch.tensor([[1.5, 1.75, 1.25, 1.5]], dtype=torch.float64))


def test_combine_rejects_bad_input():
    a = torch.zeros(1, 4)
    with pytest.raises(ValueError):
        combine_scores([a], method="softmax")
    with pytest.raises(ValueError):
        combine_scores([a, a], weights=[1.0])
    with pytest.raises(ValueError):
        combine_scores([a], weights=[-1.0])
    with pytest.raises(ValueError):
        combine_scores([torch.tensor([[0.0, float("nan")]])])


def test_top_bottom_order_and_tie_rule():
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7], [1.0, 1.0, 1.0, 1.0, 1.0]])
    pos, neg = select_top_bottom(scores, 2, 2)
    assert pos.tolist() == [[1, 4], [0, 1]]  # best first; equal scores: lower index is better
    assert neg.tolist() == [[2, 0], [4, 3]]  # worst first; equal scores: higher index is worse
    pos, neg = select_top_bottom(torch.tensor([[2.0, 5.0, 5.0, 1.0]]), 1, 0)
    assert pos.tolist() == [[1]] and neg.shape == (1, 0)


def test_top_bottom_permutation_equivariant():
    scores = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    pos, neg = select_top_bottom(scores, 4, 4)
    pos_p, neg_p = select_top_bottom(scores[:, perm], 4, 4)
    assert torch.equal(perm[pos_p], pos) and torch.equal(perm[neg_p], neg)


def test_too_many_anchors_raises():
    with pytest.raises(ValueError):
        select_top_bottom(torch.zeros(1, 5), 3, 3)
    select_top_bottom(torch.zeros(1, 6), 3, 3)


def test_selection_seed_is_stable_and_distinct():
    seed = selection_seed(42, 10, 3, 0)
    assert seed == selection_seed(42, 10, 3, 0)
    assert seed == 7929967783004063818  # fixed across processes and Python versions (blake2b)
    assert len({selection_seed(42, 10, 3, r) for r in range(4)} | {selection_seed(43, 10, 3, 0)}) == 5
    assert 0 <= seed < 2**63


def test_binary_selection_determinism():
    correct = torch.tensor([[True, False] * 12])
    seeds = [selection_seed(0, 1, 2, 0)]
    pos, neg, ok = select_binary(correct, 4, 4, seeds)
    assert ok.tolist() == [True]
    assert correct[0, pos[0]].all() and not correct[0, neg[0]].any()
    assert pos[0].unique().numel() == 4 and torch.equal(pos[0], pos[0].sort().values)
    again = select_binary(correct, 4, 4, seeds)
    assert torch.equal(again[0], pos) and torch.equal(again[1], neg)
    other = select_binary(correct, 4, 4, [selection_seed(0, 1, 2, 1)])  # another round
    assert not (torch.equal(other[0], pos) and torch.equal(other[1], neg))


def test_binary_selection_not_enough():
    correct = torch.tensor([[True, True, False, False, False], [True, True, True, False, True],
                            [True, True, True, False, False]])
    pos, neg, ok = select_binary(correct, 3, 2, [1, 2, 3])
    assert ok.tolist() == [False, False, True]
    assert (pos[:2] == 0).all() and (neg[:2] == 0).all()
    assert sorted(pos[2].tolist()) == [0, 1, 2] and sorted(neg[2].tolist()) == [3, 4]
    with pytest.raises(ValueError):
        select_binary(correct, 1, 1, [1])


# -- rank_candidates: what the loop calls -------------------------------------------------------


def test_rank_candidates_combines_in_float64_and_matches_combine_scores():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g, dtype=torch.float64)
    scores, finite = rank_candidates([a, b], [2.0, 1.0], method="zscore")
    assert scores.dtype == torch.float64 and finite.tolist() == [True] * 3
    assert torch.equal(scores, combine_scores([a, b], [2.0, 1.0]))
    squeezed = 1e4 + 1e-3 * a.double()  # below float32 resolution at 1e4, not below float64's
    assert torch.equal(rank_candidates([squeezed])[0].argsort(), rank_candidates([a])[0].argsort())


def test_rank_candidates_marks_non_finite_prompts_and_zeroes_their_scores():
    a = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    b = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [float("inf"), 1.0, 2.0]])
    scores, finite = rank_candidates([a, b], method="none")
    assert finite.tolist() == [False, True, False]
    assert torch.isfinite(scores).all()
    assert torch.equal(scores[2], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))  # inf -> 0


def test_rank_candidates_binary_is_the_product():
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    scores, _ = rank_candidates([a, b], [5.0, 1.0], binary=True)
    assert scores.dtype == torch.float64 and scores.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_rank_candidates_shuffle_permutes_every_ranker_alike_and_is_seeded():
    a = torch.arange(8.0).repeat(2, 1)
    shuffled, _ = rank_candidates([a, 2 * a], method="none", shuffle=torch.Generator().manual_seed(1))
    again, _ = rank_candidates([a, 2 * a], method="none", shuffle=torch.Generator().manual_seed(1))
    assert torch.equal(shuffled, again)
    assert not torch.equal(shuffled, rank_candidates([a, 2 * a], method="none")[0])
    # one permutation for both rankers: the sum stays a multiple of 3 of a permutation of 0..7
    assert torch.equal((shuffled / 1.5).sort(dim=1).values, a.double())


def test_rank_candidates_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        rank_candidates([torch.zeros(2, 4), torch.zeros(2, 5)])
    with pytest.raises(ValueError):
        rank_candidates([])


# -- ties: drawn at a boundary with the prompt's seed, skipped when positives and negatives tie -------


def test_seeded_selection_equals_the_index_rule_without_ties_at_a_boundary():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 12, generator=g, dtype=torch.float64)
    scores[:, 0] = scores[:, 1] = scores.max(dim=1).values + 1  # tied, both inside the positives
    seeds = [selection_seed(0, 5, i, 0) for i in range(4)]
    for pos_neg in [(3, 3), (4, 2), (2, 5)]:
        plain = select_top_bottom(scores, *pos_neg)
        seeded = select_top_bottom(scores, *pos_neg, seeds=seeds)
        assert all(torch.equal(u, v) for u, v in zip(plain, seeded, strict=True))
        assert separated(scores, *plain).all()


def test_a_tie_straddling_the_boundary_is_drawn_with_the_seed():
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 3.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    drawn = set()
    for seed in range(20):
        pos, neg = select_top_bottom(scores, 2, 2, seeds=[seed])
        again = select_top_bottom(scores, 2, 2, seeds=[seed])
        assert torch.equal(pos, again[0]) and torch.equal(neg, again[1])  # deterministic per seed
        assert pos[0, 0].item() == 0 and pos[0, 1].item() in {1, 2, 3, 4}
        assert neg.tolist() == [[7, 6]]  # no tie at the bottom boundary: unchanged
        assert separated(scores, pos, neg).item()
        drawn.add(pos[0, 1].item())
    assert len(drawn) > 1 and drawn != {1}  # not the lowest index every time


def test_all_equal_or_shared_ties_are_not_separated():
    scores = torch.tensor([[1.0] * 6, [2.0, 2.0, 2.0, 2.0, 2.0, 1.0], [3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    pos, neg = select_top_bottom(scores, 2, 2, seeds=[7, 8, 9])
    for b in range(3):  # one total order: a candidate is never both positive and negative
        assert not set(pos[b].tolist()) & set(neg[b].tolist())
    assert separated(scores, pos, neg).tolist() == [False, False, True]
    with pytest.raises(ValueError):
        select_top_bottom(scores, 2, 2, seeds=[1])
