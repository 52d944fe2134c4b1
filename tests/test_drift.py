"""The drift field against a float64 reference written here from method.md §4, hand-worked cases, properties."""

from __future__ import annotations

import math

import pytest
import torch

from drpo_core.drift import DriftEstimator, drift_field, drift_loss, regression_loss
from drpo_core.ranking import combine_scores, select_top_bottom
from drpo_kernels.kernels import cosine, laplacian, rbf

KERNELS = {"laplacian": laplacian, "rbf": rbf, "cosine": cosine}


# ----------------------------------------------------------------------------------------------------------
# Reference implementation: plain Python floats, explicit loops, one prompt at a time (method.md §4.2-4.6).
# ----------------------------------------------------------------------------------------------------------


def _ref_logit(kind, d, s, r, xi, tj):
    if kind == "laplacian":
        return -d / (s * r)
    if kind == "rbf":
        return -0.5 * (d / (s * r)) ** 2
    dot = sum(a * b for a, b in zip(xi, tj, strict=True))
    norm = math.sqrt(sum(a * a for a in xi)) * math.sqrt(sum(b * b for b in tj))
    return dot / norm / r


def _softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    total = sum(e)
    return [v / total for v in e]


def reference_prompt(x, pos, neg, kind, radii, w_pos, w_neg, mask_neg_self):
    """Field F (N x D lists), sigma and the per-radius pre-normalisation fields of one prompt."""
    N, D = len(x), len(x[0])
    M, P = len(neg), len(pos)
    T = x + neg + pos
    omega = [1.0] * N + [w_neg] * M + [w_pos] * P
    J = len(T)
    d = [[math.sqrt(max(sum((a - b) ** 2 for a, b in zip(x[i], T[j], strict=True)), 1e-8)) for j in range(J)]
         for i in range(N)]
    s = max(sum(d[i][j] * omega[j] for i in range(N) for j in range(J)) / (N * J) / (sum(omega) / J), 1e-3)
    sigma = max(s / math.sqrt(D), 1e-3)
    F = [[0.0] * D for _ in range(N)]
    raw = []
    for r in radii:
        logits = [[_ref_logit(kind, d[i][j], s, r, x[i], T[j]) for j in range(J)] for i in range(N)]
        for i in range(N):
            logits[i][i] -= 100.0 / r
            if mask_neg_self:
                logits[i][N + i] -= 100.0 / r
        row = [_softmax(logits[i]) for i in range(N)]
        col_t = [_softmax([logits[i][j] for i in range(N)]) for j in range(J)]
        A = [[omega[j] * math.sqrt(max(row[i][j] * col_t[j][i], 1e-6)) for j in range(J)] for i in range(N)]
        F_r = []
        for i in range(N):
            S_pos = sum(A[i][j] for j in range(N + M, J))
            S_neg = sum(A[i][j] for j in range(N + M))
            F_r.append([
                sum((S_neg if j >= N + M else -S_pos) * A[i][j] * (T[j][k] - x[i][k]) / sigma for j in range(J))
                for k in range(D)
            ])
        rms = math.sqrt(max(sum(v * v for row_ in F_r for v in row_) / (N * D), 1e-8))
        for i in range(N):
            for k in range(D):
                F[i][k] += F_r[i][k] / rms
        raw.append(F_r)
    return F, sigma, raw


def reference_loss_and_grad(x, pos, neg, kind, radii, w_pos, w_neg, mask_neg_self=False):
    """Per-prompt loss (B,) and d(sum loss)/dx in float64, by autograd on the reference target."""
    losses, grads = [], []
    for b in range(x.shape[0]):
        F, sigma, _ = reference_prompt(x[b].tolist(), pos[b].tolist(), neg[b].tolist(), kind, radii, w_pos,
                                       w_neg, mask_neg_self)
        xb = x[b].detach().clone().requires_grad_(True)
        target = xb.detach() / sigma + torch.tensor(F, dtype=torch.float64)
        loss = ((xb / sigma - target) ** 2).mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(xb.grad)
    return torch.stack(losses), torch.stack(grads)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _inputs(B=2, N=12, P=5, M=4, D=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(B, N, D, generator=g, dtype=dtype) + 2.0  # fixed scale, common offset
    pos = 0.5 * torch.randn(B, P, D, generator=g, dtype=dtype) + 2.3
    neg = 0.5 * torch.randn(B, M, D, generator=g, dtype=dtype) + 1.7
    return x, pos, neg


SETTINGS = [((0.02, 0.05, 0.2), 3000.0, 3000.0), ((0.1,), 1.0, 1.0), ((0.05, 0.5), 10.0, 500.0)]


@pytest.mark.parametrize("kind", sorted(KERNELS))
@pytest.mark.parametrize("mask_neg_self", [False, True])
@pytest.mark.parametrize("radii,w_pos,w_neg", SETTINGS)
def test_matches_float64_reference(kind, mask_neg_self, radii, w_pos, w_neg):
    x, pos, neg = _inputs(seed=len(radii) + 7 * mask_neg_self)
    if mask_neg_self:
        neg = x.clone()  # the reference-drift use: negatives are sg(generated)
    x = x.requires_grad_(True)
    loss, _ = drift_loss(x, pos, neg, kernel=KERNELS[kind], radii=radii, positive_weight=w_pos,
                         negative_weight=w_neg, mask_negative_self=mask_neg_self)
    loss.sum().backward()
    ref_loss, ref_grad = reference_loss_and_grad(x.detach(), pos, neg, kind, radii, w_pos, w_neg, mask_neg_self)
    assert loss.dtype == torch.float64
    assert ((loss.detach() - ref_loss).abs() / ref_loss).max() <= 1e-5
    assert _rel(x.grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("kind", sorted(KERNELS))
def test_float32_path_is_close_to_float64_reference(kind):
    """Float32 (the training precision) against the float64 reference: also within 1e-5 (measured ~1e-6)."""
    x, pos, neg = _inputs(seed=3)
    x32 = x.float().requires_grad_(True)
    loss, _ = drift_loss(x32, pos.float(), neg.float(), kernel=KERNELS[kind])
    loss.sum().backward()
    ref_loss, ref_grad = reference_loss_and_grad(x, pos, neg, kind, (0.02, 0.05, 0.2), 3000.0, 3000.0)
    assert loss.dtype == torch.float32
    assert ((loss.detach().double() - ref_loss).abs() / ref_loss).max() <= 1e-5
    assert _rel(x32.grad.double(), ref_grad) <= 1e-5


def test_gradient_is_minus_two_F_over_N_D_sigma():
    x, pos, neg = _inputs()
    x.requires_grad_(True)
    loss, fld = drift_loss(x, pos, neg, kernel=laplacian)
    loss.sum().backward()
    N, D = x.shape[1:]
    torch.testing.assert_close(x.grad, -2 * fld.F / (N * D * fld.sigma), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss.detach(), fld.F.pow(2).mean(dim=(1, 2)), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Small cases worked by hand
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 4])
def test_one_particle_between_a_positive_and_a_negative(D):
    """x = 0, positive at +a e1, negative at -a e1, weights w.

    Self distance sqrt(1e-8) = 1e-4 is masked (its affinity is the floor 1e-3); both anchors are at distance a,
    so the row softmax gives 1/2 each and (one particle) the column softmax 1: A_pos = A_neg = w/sqrt(2).
    F = S_neg A_pos (a/sigma) - S_pos A_neg (-a/sigma) = (a/sigma) (w/sqrt 2) (sqrt(2) w + 1e-3) along +e1,
    the same for every radius, with s = (1e-4 + 2 w a) / (1 + 2 w) and sigma = s / sqrt(D).
    After unit-RMS normalisation over (i, d) each radius contributes sqrt(D) e1, so F = 3 sqrt(D) e1.
    """
    a, w = 0.7, 3000.0
    e1 = torch.zeros(1, 1, D, dtype=torch.float64)
    e1[..., 0] = 1.0
    fld = drift_field(0 * e1, a * e1, -a * e1, kernel=laplacian, positive_weight=w, negative_weight=w)
    s = (1e-4 + 2 * w * a) / (1 + 2 * w)
    sigma = s / math.sqrt(D)
    F_pre = (a / sigma) * (w / math.sqrt(2)) * (math.sqrt(2) * w + 1e-3)
    assert fld.s.item() == pytest.approx(s, rel=1e-12)
    assert fld.sigma.item() == pytest.approx(sigma, rel=1e-12)
    # rms over (i, d) of a field that is F_pre e1: F_pre / sqrt(D)
    torch.testing.assert_close(fld.rms, torch.full((3, 1), F_pre / math.sqrt(D), dtype=torch.float64),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(fld.F, 3 * math.sqrt(D) * e1, rtol=1e-10, atol=1e-12)


def test_two_particles_mirror_symmetric():
    """Particles at -1 and +1, a positive at 0, negatives at -3 and +3 (D = 1, w = 3000), mirror symmetric.

    s = sum_ij d_ij omega_j / (N sum_j omega_j) = 2 (1e-4 + 2 + 2w + 4w + w) / (2 (2 + 3w)) = 2.3330...
    By symmetry F_2 = -F_1 at every radius, and unit RMS over the two particles makes |F_i| = 1 per radius
    unless the field vanishes. It does vanish at r = 0.02: s r = 0.047, so every negative-side logit is at
    least 21 below the positive's, the row softmax there is < 1e-6 and all negative-side affinities sit on the
    floor 1e-3 omega_j (3 for each negative, 1e-3 for the particles): their mean mu- is 0 = mu+, F = 0 (its RMS
    hits the 1e-4 clamp). At r = 0.05 and 0.2 the nearer negative (distance 2 vs 4) dominates mu-, so
    mu+ - mu- points to the positive: F_1 = 0 + 1 + 1 = +2, F_2 = -2 (inward, although the other particle,
    weight 1, repels).
    """
    x = torch.tensor([[[-1.0], [1.0]]], dtype=torch.float64)
    pos = torch.tensor([[[0.0]]], dtype=torch.float64)
    neg = torch.tensor([[[-3.0], [3.0]]], dtype=torch.float64)
    fld = drift_field(x, pos, neg, kernel=laplacian)
    w = 3000.0
    assert fld.s.item() == pytest.approx((1e-4 + 2 + 7 * w) / (2 + 3 * w), rel=1e-12)
    assert fld.rms[0].item() == pytest.approx(1e-4, rel=1e-9)  # clamped: the r = 0.02 field is (almost) 0
    assert (fld.rms[1:] > 1e4).all()
    torch.testing.assert_close(fld.F, torch.tensor([[[2.0], [-2.0]]], dtype=torch.float64), rtol=0, atol=1e-7)


def test_field_is_translation_invariant_and_zero_without_anchor_mass():
    x, pos, neg = _inputs()
    shifted = drift_field(x + 100.0, pos + 100.0, neg + 100.0, kernel=laplacian)
    plain = drift_field(x, pos, neg, kernel=laplacian)
    torch.testing.assert_close(shifted.F, plain.F, rtol=1e-9, atol=1e-9)
    # zero anchor weights: no positive mass, S_pos = 0, so the field vanishes (rms clamps at 1e-4)
    empty = drift_field(x, pos, neg, kernel=laplacian, positive_weight=0.0, negative_weight=0.0)
    assert empty.F.abs().max() == 0


# ----------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------


def _candidates(B=2, K=8, T=3, D=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, K, T, D, generator=g, dtype=torch.float64)


def _gather(features, idx):
    """(B, K, T, D) features, (B, m) candidate indices -> (B, m*T, D) particle set."""
    B, _, T, D = features.shape
    picked = torch.gather(features, 1, idx.view(B, -1, 1, 1).expand(-1, -1, T, D))
    return picked.reshape(B, -1, D)


def _loss_from_scores(features, scores, method="zscore"):
    pos_idx, neg_idx = select_top_bottom(combine_scores(scores, method=method), 2, 2)
    x = features.reshape(features.shape[0], -1, features.shape[-1]).clone().requires_grad_(True)
    loss, _ = drift_loss(x, _gather(features, pos_idx), _gather(features, neg_idx), kernel=laplacian)
    loss.sum().backward()
    return pos_idx, neg_idx, loss.detach(), x.grad


@pytest.mark.parametrize("method", ["zscore", "rank"])
def test_single_ranker_monotone_transform_gives_identical_loss(method):
    features = _candidates()
    scores = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    transformed = torch.exp(2 * scores) + scores**3  # strictly increasing
    a = _loss_from_scores(features, [scores], method)
    b = _loss_from_scores(features, [transformed], method)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)  # bit-identical anchors, loss and gradient


def test_zscore_ensemble_is_invariant_to_affine_but_not_monotone_transforms():
    g = torch.Generator().manual_seed(11)
    r1, r2, r3 = (torch.randn(3, 10, generator=g) for _ in range(3))
    base = select_top_bottom(combine_scores([r1, r2, r3]), 3, 3)
    affine = select_top_bottom(combine_scores([r1, 3.7 * r2 - 5.0, r3]), 3, 3)
    assert all(torch.equal(u, v) for u, v in zip(base, affine, strict=True))
    torch.testing.assert_close(combine_scores([r1, 3.7 * r2 - 5.0, r3]), combine_scores([r1, r2, r3]))
    # a monotone but non-affine transform of one ranker changes the z-scores, and here the winner:
    # z([0,1,2,10]) + z([3,2,1,0]) is largest at candidate 0, z(log1p([0,1,2,10])) + z(...) at candidate 3
    s1 = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    s2 = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert select_top_bottom(combine_scores([s1, s2]), 1, 0)[0].item() == 0
    assert select_top_bottom(combine_scores([torch.log1p(s1), s2]), 1, 0)[0].item() == 3


def test_permuting_candidates_permutes_results():
    B, K, T, D = 2, 8, 3, 4
    feats = {"a": _candidates(B, K, 1, D, seed=2), "b": _candidates(B, K, T, D, seed=3)}
    refs = {k: v + 0.1 * torch.randn_like(v) for k, v in feats.items()}
    scores = torch.randn(B, K, generator=torch.Generator().manual_seed(4))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(6))
    estimator = DriftEstimator(laplacian)

    def run(features, references, sc):
        pos_idx, neg_idx = select_top_bottom(combine_scores([sc]), 2, 2)
        flat = {k: v.reshape(B, -1, D) for k, v in features.items()}
        tg = estimator.targets(flat, {k: _gather(v, pos_idx) for k, v in features.items()},
                               {k: _gather(v, neg_idx) for k, v in features.items()},
                               {k: v.reshape(B, -1, D) for k, v in references.items()})
        return pos_idx, neg_idx, tg, estimator.loss(flat, tg)

    pos0, neg0, tg0, loss0 = run(feats, refs, scores)
    pos1, neg1, tg1, loss1 = run({k: v[:, perm] for k, v in feats.items()},
                                 {k: v[:, perm] for k, v in refs.items()}, scores[:, perm])
    assert torch.equal(perm[pos1], pos0) and torch.equal(perm[neg1], neg0)
    for key, v in feats.items():
        Tk = v.shape[2]
        for name in ("pref_target", "ref_target"):
            t0 = getattr(tg0, name)[key].view(B, K, Tk, D)
            t1 = getattr(tg1, name)[key].view(B, K, Tk, D)
            torch.testing.assert_close(t1, t0[:, perm], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(tg1.pref_sigma[key], tg0.pref_sigma[key], rtol=1e-12, atol=0)
    for name in ("pref", "ref", "total"):
        torch.testing.assert_close(loss1[name], loss0[name], rtol=1e-10, atol=0)


def test_swapping_positives_and_negatives_flips_the_dipole():
    """With w+ = w- the swap permutes target columns, so A is unchanged and, per radius before normalisation,

        F(x, P, N) + F(x, N, P) = F(x, P u N, {})

    (exactly): the dipole terms cancel and what remains is attraction to all anchors against the repulsion
    of the generated set. That remainder is small when anchors outweigh particles (w = 3000 vs 1), so the
    normalised fields are nearly opposite; F(x, P, N) = -F(x, N, P) does not hold exactly.
    """
    x, pos, neg = _inputs()
    for r in (0.02, 0.05, 0.2):
        kw = {"kernel": laplacian, "radii": (r,)}
        a, b = drift_field(x, pos, neg, **kw), drift_field(x, neg, pos, **kw)
        both = drift_field(x, torch.cat([neg, pos], 1), neg[:, :0], **kw)
        pre = [f.F * f.rms.view(-1, 1, 1) for f in (a, b, both)]
        torch.testing.assert_close(pre[0] + pre[1], pre[2], rtol=1e-9, atol=1e-9 * pre[0].abs().max().item())
    a, b = drift_field(x, pos, neg, kernel=laplacian), drift_field(x, neg, pos, kernel=laplacian)
    assert _rel(a.F, -b.F) < 0.02  # measured 0.005
    assert _rel(a.F, b.F) > 1.9


def test_gradient_reaches_only_generated_particles():
    x, pos, neg = _inputs()
    ref = x.detach() + 0.05
    x, pos, neg, ref = (t.clone().requires_grad_(True) for t in (x, pos, neg, ref))
    estimator = DriftEstimator(laplacian)
    targets = estimator.targets({"k": x}, {"k": pos}, {"k": neg}, {"k": ref})
    assert not any(t.requires_grad for t in (*targets.pref_target.values(), *targets.ref_target.values()))
    estimator.loss({"k": x}, targets)["total"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None and ref.grad is None
    loss, fld = drift_loss(x, pos, neg, kernel=laplacian)
    assert not fld.F.requires_grad and not fld.sigma.requires_grad


def test_chunked_losses_and_gradients_add_up():
    B, K, D = 2, 6, 5
    feats = {"one": _candidates(B, K, 1, D, seed=7), "four": _candidates(B, K, 4, D, seed=8)}
    ppc = {"one": 1, "four": 4}
    flat = {k: v.reshape(B, -1, D) for k, v in feats.items()}
    anchors = {k: v[:, :2].reshape(B, -1, D) for k, v in feats.items()}
    worst = {k: v[:, -2:].reshape(B, -1, D) for k, v in feats.items()}
    ref = {k: v + 0.1 for k, v in flat.items()}
    for aggregation in ("sum", "mean"):
        estimator = DriftEstimator(laplacian, aggregation=aggregation)
        targets = estimator.targets(flat, anchors, worst, ref)
        leaves = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
        full = estimator.loss({k: v.reshape(B, -1, D) for k, v in leaves.items()}, targets)
        full["total"].sum().backward()
        full_grads = {k: v.grad.clone() for k, v in leaves.items()}
        for v in leaves.values():
            v.grad = None
        totals = []
        for start, stop, per in ((0, 2, None), (2, 5, ppc), (5, 6, ppc)):
            chunk = {k: v[:, start:stop].reshape(B, -1, D) for k, v in leaves.items()}
            out = estimator.loss(chunk, targets, start=start, stop=stop, particles_per_candidate=per)
            out["total"].sum().backward()
            totals.append(out["total"].detach())
        torch.testing.assert_close(sum(totals), full["total"].detach(), rtol=1e-12, atol=0)
        for k, v in leaves.items():
            torch.testing.assert_close(v.grad, full_grads[k], rtol=1e-12, atol=1e-15)
        # the unchunked path equals the plain regression loss of each key
        pref = [regression_loss(flat[k], targets.pref_target[k], targets.pref_sigma[k]) for k in flat]
        expected = sum(pref) if aggregation == "sum" else sum(pref) / 2
        torch.testing.assert_close(full["pref"].detach(), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        estimator.loss({k: v[:, 2:].reshape(B, -1, D) for k, v in feats.items()}, targets, start=2)


def test_key_weights_scale_the_preference_loss_by_longest_prefix():
    B, K, D = 2, 6, 5
    flat = {k: _candidates(B, K, 1, D, seed=i).reshape(B, -1, D) for i, k in enumerate(("enc", "enc_cells", "patch"))}
    anchors = {k: v[:, :2] for k, v in flat.items()}
    worst = {k: v[:, -2:] for k, v in flat.items()}
    ref = {k: v + 0.1 for k, v in flat.items()}
    plain = DriftEstimator(laplacian)
    weighted = DriftEstimator(laplacian, key_weights={"enc": 4.0, "enc_cells": 0.5})
    assert [weighted.key_weight(k) for k in flat] == [4.0, 0.5, 1.0]
    targets = plain.targets(flat, anchors, worst, ref)
    per_key = {k: regression_loss(flat[k], targets.pref_target[k], targets.pref_sigma[k]) for k in flat}
    out = weighted.loss(flat, targets)
    expected = 4.0 * per_key["enc"] + 0.5 * per_key["enc_cells"] + per_key["patch"]
    torch.testing.assert_close(out["pref"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["ref"], plain.loss(flat, targets)["ref"], rtol=0, atol=0)  # reference untouched


def test_reference_skipped_when_lambda_is_zero():
    calls = []

    def spy(dist, scale, radius, x, targets):
        calls.append(targets.shape[1])
        return laplacian(dist, scale, radius, x, targets)

    x, pos, neg = _inputs()
    ref = x + 0.1
    data = ({"k": x}, {"k": pos}, {"k": neg})
    tg = DriftEstimator(spy, ref_lambda=0.0).targets(*data, {"k": ref})
    assert len(calls) == 3 and tg.ref_target is None
    out = DriftEstimator(spy, ref_lambda=0.0).loss({"k": x}, tg)
    assert out["ref"] is None and torch.equal(out["total"], out["pref"])
    calls.clear()
    tg = DriftEstimator(spy).targets(*data, None)  # no reference given: skipped too
    assert len(calls) == 3 and tg.ref_target is None
    calls.clear()
    estimator = DriftEstimator(spy, ref_lambda=0.2)
    tg = estimator.targets(*data, {"k": ref})
    assert len(calls) == 6 and "k/ref/rms_r0.02" in tg.stats
    assert all(isinstance(v, float) for v in tg.stats.values())
    out = estimator.loss({"k": x}, tg)
    torch.testing.assert_close(out["total"], out["pref"] + 0.2 * out["ref"])


def test_reference_field_equals_drift_field_with_masked_self_negatives():
    x, _, _ = _inputs()
    ref = x.flip(1) + 0.2
    estimator = DriftEstimator(rbf, ref_radii=(0.1, 0.3), ref_positive_weight=50.0, ref_negative_weight=20.0)
    tg = estimator.targets({"k": x}, {"k": x[:, :3]}, {"k": x[:, 3:5]}, {"k": ref})
    fld = drift_field(x, ref, x, kernel=rbf, radii=(0.1, 0.3), positive_weight=50.0, negative_weight=20.0,
                      mask_negative_self=True)
    torch.testing.assert_close(tg.ref_target["k"], x / fld.sigma + fld.F, rtol=1e-12, atol=1e-12)


def test_input_validation():
    x, pos, neg = _inputs()
    with pytest.raises(ValueError, match="mask_negative_self"):
        drift_field(x, pos, neg, kernel=laplacian, mask_negative_self=True)
    with pytest.raises(ValueError):
        drift_field(x, pos[..., :3], neg, kernel=laplacian)
    with pytest.raises(ValueError):
        DriftEstimator(laplacian, aggregation="max")


def test_prompts_do_not_interact_and_low_precision_inputs_compute_in_float32():
    x, pos, neg = _inputs(B=3)
    batch = drift_field(x, pos, neg, kernel=laplacian)
    for b in range(3):
        one = drift_field(x[b:b + 1], pos[b:b + 1], neg[b:b + 1], kernel=laplacian)
        torch.testing.assert_close(one.F, batch.F[b:b + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.rms, batch.rms[:, b:b + 1], rtol=1e-12, atol=0)
    xb = x.bfloat16().requires_grad_(True)
    loss, fld = drift_loss(xb, pos.bfloat16(), neg.bfloat16(), kernel=laplacian)
    assert loss.dtype == fld.F.dtype == torch.float32
    loss.sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_keys_of_one_shape_are_batched_exactly_like_one_call_per_key():
    # "a", "b" and "c" share a shape and go through one call; "d" has other particles and goes alone
    sets = {key: _inputs(B=2, seed=i) for i, key in enumerate("abc")}
    x_d, pos_d, neg_d = _inputs(B=2, seed=3)
    sets["d"] = (x_d[:, :4], pos_d, neg_d)
    generated, positives, negatives = ({key: v[i] for key, v in sets.items()} for i in range(3))
    reference = {key: x.flip(1) + 0.1 for key, x in generated.items()}
    calls = []

    def counting_laplacian(dist, scale, radius, x, targets):
        calls.append(dist.shape[0])
        return laplacian(dist, scale, radius, x, targets)

    estimator = DriftEstimator(counting_laplacian, radii=(0.05, 0.2))
    tg = estimator.targets(generated, positives, negatives, reference)
    assert calls == [6, 6, 6, 6, 2, 2, 2, 2]  # pref and ref, 2 radii: the group of 3 keys x B=2, then "d"
    for key, x in generated.items():
        pref = drift_field(x, positives[key], negatives[key], kernel=laplacian, radii=(0.05, 0.2))
        ref = drift_field(x, reference[key], x, kernel=laplacian, radii=(0.05, 0.2), mask_negative_self=True)
        torch.testing.assert_close(tg.pref_target[key], x / pref.sigma + pref.F, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(tg.ref_target[key], x / ref.sigma + ref.F, rtol=1e-12, atol=1e-12)
        assert tg.stats[f"{key}/pref/rms_r0.05"] == pytest.approx(pref.rms[0].mean().item(), rel=1e-12)
        assert tg.stats[f"{key}/ref/field_sq"] == pytest.approx(ref.F.pow(2).mean().item(), rel=1e-12)
        assert tg.stats[f"{key}/pref/sigma"] == pytest.approx(pref.sigma.mean().item(), rel=1e-12)
