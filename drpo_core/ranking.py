"""From ranker scores to anchors: combine the rankers of one prompt's K candidates, pick positives/negatives.

DrPO only uses the order of the scores within a prompt's group (method.md §3 steps 5-6, §7.1, §7.4):

* ``rank_candidates``: what the loop calls with every ranker's scores of a micro-batch: non-finite
  scores mark their prompt as failed, the ``selection.shuffle_scores`` control permutes each prompt's
  scores, binary (0/1) rankers combine by product and graded ones by ``combine_scores``.
* ``combine_scores``: per prompt z-score of each ranker (population std clamped at 1e-6), weights
  normalised to sum 1, weighted sum (the official ``score_reward_ensemble``); or an average of ranks.
* ``select_top_bottom``: hard top-M positives / bottom-M negatives by count; ``separated`` tells which
  prompts' positives all score strictly above their negatives.
* ``select_binary``: 0/1 rankers (GenEval): random correct positives and incorrect negatives.

Scores keep the ranker's precision until the order is taken: they are float64 from the ranker's output
on (``sources.check_scores``; float32, bf16 and fp16 convert to float64 exactly) and are combined in
float64, so rounding does not create ties the rankers did not make, and with one ranker any strictly
increasing transform of its scores gives the same anchors.

Ties: a prompt gets no anchors that its scores do not order. Equal scores that straddle a selection
boundary (some of them would be chosen, some not) are broken at random, with a generator seeded by
``selection_seed(run seed, step, prompt index, round)``, not by candidate index; ties that do not
straddle a boundary change nothing. A prompt whose chosen positives and negatives are not strictly
separated (its lowest positive score <= its highest negative score, which includes K equal scores) is
skipped, with the skip reason ``tied`` (``skip_tied`` in metrics.jsonl): its update is zero.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

STD_FLOOR = 1e-6


def _normalised_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{count} score tensors but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def zscore(scores: Tensor) -> Tensor:
    """(r - mean) / max(std_pop, 1e-6) over the K candidates of each prompt, (B, K)."""
    mean = scores.mean(dim=-1, keepdim=True)
    std = scores.std(dim=-1, correction=0, keepdim=True).clamp_min(STD_FLOOR)
    return (scores - mean) / std


def average_rank(scores: Tensor) -> Tensor:
    """Rank 0..K-1 of each candidate within its prompt (higher score, higher rank); ties share their mean rank."""
    less = (scores.unsqueeze(-1) > scores.unsqueeze(-2)).sum(-1)  # candidates strictly below
    equal = (scores.unsqueeze(-1) == scores.unsqueeze(-2)).sum(-1)  # includes itself
    return less.to(scores.dtype) + (equal.to(scores.dtype) - 1) / 2


def combine_scores(scores: Sequence[Tensor], weights: Sequence[float] | None = None,
                   method: str = "zscore") -> Tensor:
    """Weighted combination of several rankers' scores (each (B, K)) into one float64 score per candidate.

    ``method``: "zscore" (official), "rank" (average of per-ranker average ranks) or "none" (raw weighted sum).
    With one ranker every method preserves the order of its scores.
    """
    if len(scores) == 0:
        raise ValueError("no scores to combine")
    transforms = {"zscore": zscore, "rank": average_rank, "none": lambda r: r}
    if method not in transforms:
        raise ValueError(f"method must be one of {sorted(transforms)}, got {method!r}")
    weights = _normalised_weights(weights, len(scores))
    combined: Tensor | None = None
    for w, r in zip(weights, scores, strict=True):
        r = r.detach().to(torch.float64)
        if r.dim() != 2 or torch.isnan(r).any():
            raise ValueError(f"scores must be (B, K) without NaN, got shape {tuple(r.shape)}")
        term = w * transforms[method](r)
        combined = term if combined is None else combined + term
    assert combined is not None  # scores is not empty
    return combined


def rank_candidates(per_ranker: Sequence[Tensor], weights: Sequence[float] | None = None, *,
                    method: str = "zscore", binary: bool = False,
                    shuffle: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One float64 score per candidate from every ranker's scores of B prompts x K candidates.

    ``per_ranker``: one (B, K) tensor per ranker, in that ranker's precision (converted to float64
    exactly). Returns the scores (B, K) float64 and ``finite`` (B,) bool: False for a prompt that some
    ranker scored NaN or infinite (its scores are set to 0 and the prompt must be skipped as a failure).

    * ``shuffle``: the ``selection.shuffle_scores`` control: each prompt's scores are permuted at random
      with this generator (the same permutation for every ranker), so ranking carries no information.
    * ``binary``: 0/1 rankers (GenEval): a candidate is correct (1) when every ranker says so; the
      product, ``weights`` and ``method`` unused.
    * otherwise ``combine_scores(per_ranker, weights, method)``.
    """
    if len(per_ranker) == 0:
        raise ValueError("no scores to rank")
    per_ranker = [torch.as_tensor(s).detach().to(torch.float64) for s in per_ranker]
    shape = per_ranker[0].shape
    if len(shape) != 2 or any(s.shape != shape for s in per_ranker):
        raise ValueError(f"scores must be (B, K) alike, got shapes {[tuple(s.shape) for s in per_ranker]}")
    finite = torch.stack([s.isfinite().all(dim=1) for s in per_ranker]).all(dim=0)
    per_ranker = [s.nan_to_num(0.0, posinf=0.0, neginf=0.0) for s in per_ranker]
    if shuffle is not None:
        order = torch.rand(*shape, generator=shuffle).argsort(dim=1).to(per_ranker[0].device)
        per_ranker = [s.gather(1, order) for s in per_ranker]
    if binary:
        return torch.stack(per_ranker).prod(dim=0), finite
    return combine_scores(per_ranker, weights, method), finite


def select_top_bottom(scores: Tensor, num_positives: int, num_negatives: int,
                      seeds: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Indices (B, Mp) of the top-Mp candidates, best first, and (B, Mn) of the bottom-Mn, worst first.

    ``seeds`` (one per prompt, see ``selection_seed``): equal scores that straddle a boundary are drawn
    at random with a generator seeded by the prompt's seed. Without seeds the lower candidate index
    counts as better. Either way, equal scores within the chosen sets are listed by index (positives:
    lower index first; negatives: higher index first), so a draw only decides which candidates are
    chosen, and scores without ties at a boundary give the same result with or without seeds.
    Raises when Mp + Mn > K.
    """
    B, K = scores.shape
    if num_positives < 0 or num_negatives < 0 or num_positives + num_negatives > K:
        raise ValueError(f"cannot pick {num_positives} positives and {num_negatives} negatives out of {K}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if seeds is None:
        tie_order = torch.arange(K, device=scores.device).expand(B, K)
    else:
        if len(seeds) != B:
            raise ValueError(f"{B} prompts but {len(seeds)} seeds")
        tie_order = torch.stack([torch.randperm(K, generator=torch.Generator().manual_seed(int(seed)))
                                 for seed in seeds]).to(scores.device)
    # one total order per prompt: score descending, equal scores in tie_order; the same order gives
    # both sets, so positives and negatives never share a candidate
    ranked = torch.sort(scores.gather(1, tie_order), dim=-1, descending=True, stable=True).indices
    order = tie_order.gather(1, ranked)
    positives = _by_score(scores, order[:, :num_positives], best_first=True)
    negatives = _by_score(scores, order[:, K - num_negatives:], best_first=False)
    return positives, negatives


def _by_score(scores: Tensor, chosen: Tensor, best_first: bool) -> Tensor:
    """``chosen`` (B, M) candidates listed best first (equal scores: lower index first) or worst first."""
    chosen = chosen.sort(dim=-1, descending=not best_first).values
    picked = scores.gather(1, chosen)
    return chosen.gather(1, torch.sort(picked, dim=-1, descending=best_first, stable=True).indices)


def separated(scores: Tensor, positives: Tensor, negatives: Tensor) -> Tensor:
    """(B,) bool: the prompt's lowest positive scores strictly above its highest negative.

    False where the order of the scores does not tell the chosen sets apart (all K scores equal, or a
    tie that the positives and negatives share): such a prompt is skipped (reason ``tied``). True
    when either set is empty.
    """
    if positives.shape[1] == 0 or negatives.shape[1] == 0:
        return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores.gather(1, positives).amin(dim=1) > scores.gather(1, negatives).amax(dim=1)


def selection_seed(run_seed: int, step: int, prompt_index: int, round_index: int) -> int:
    """A stable 63-bit seed of (run seed, step, prompt, rollout round): blake2b, not Python's salted hash()."""
    message = f"drpo-select:{run_seed}:{step}:{prompt_index}:{round_index}".encode()
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little") & (2**63 - 1)


def select_binary(correct: Tensor, num_positives: int, num_negatives: int,
                  seeds: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``num_positives`` correct and ``num_negatives`` incorrect candidates per prompt (GenEval rollout).

    ``correct`` (B, K) bool, one seed per prompt (see ``selection_seed``). Returns positives (B, Mp),
    negatives (B, Mn) as ascending candidate indices, and ``ok`` (B,): False where a prompt lacks enough of
    either (its rows are filled with 0 and must be skipped).
    """
    B, K = correct.shape
    if len(seeds) != B:
        raise ValueError(f"{B} prompts but {len(seeds)} seeds")
    correct = correct.detach().cpu().bool()
    positives = torch.zeros(B, num_positives, dtype=torch.long)
    negatives = torch.zeros(B, num_negatives, dtype=torch.long)
    ok = torch.zeros(B, dtype=torch.bool)
    for b in range(B):  # prompts, not particles: B is small
        generator = torch.Generator().manual_seed(int(seeds[b]))
        order = torch.randperm(K, generator=generator)  # a random order; take the first of each class
        good, bad = order[correct[b, order]], order[~correct[b, order]]
        if len(good) >= num_positives and len(bad) >= num_negatives:
            positives[b] = good[:num_positives].sort().values
            negatives[b] = bad[:num_negatives].sort().values
            ok[b] = True
    return positives, negatives, ok
