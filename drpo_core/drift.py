r"""The DrPO drift field: the kernel mean-shift "dipole" field that turns ranked anchors into regression targets.

Paper (DrPO, arXiv 2606.02521, as typeset on the project page)
---------------------------------------------------------------
Features ``z = phi(x)`` of the K generated samples of one prompt; anchors are the features of the top-M
(positives ``A+``) and bottom-M (negatives ``A-``) candidates of the ranking::

    E(z)       = gamma * sum_j [ k(z, a_j+) - k(z, a_j-) ]              dipole energy, R_dipole = exp(E)
    V_pref(z)  ~ grad_z log R_dipole(z; A+, A-)                          preference field
    mu_B(x)    = sum_i w_i(x; B) b_i,   w_i = k(x, b_i) / sum_j k(x, b_j)     mean shift over a set B
    V_ref(z_i) = mu_R(z_i) - mu_Z(z_i)                                   reference drift (R: frozen base, Z: batch)
    V_DrPO     = V_pref + lambda * V_ref
    z*_i       = sg(z_i + eta * V_DrPO(z_i))
    L_DrPO     = 1/(2K) sum_i || z_i - z*_i ||^2

What the official code computes, and what this module implements (method.md §4)
-------------------------------------------------------------------------------
For one set of generated particles ``x`` (N, D) with anchors ``positives`` (P, D) and ``negatives`` (M, D):

* targets ``T = [sg(x); negatives; positives]`` (J = N + M + P) with weights
  ``omega = [1 (N times); w- (M times); w+ (P times)]``;
* distances ``d_ij = sqrt(max(|x_i|^2 + |T_j|^2 - 2 x_i.T_j, 1e-8))``;
* feature scale ``s = max(mean_ij(d_ij omega_j) / mean_j(omega_j), 1e-3)`` (self distances included) and
  per-dimension scale ``sigma = max(s / sqrt(D), 1e-3)``; the field lives in sigma units ``x~ = x / sigma``;
* for each radius r: kernel logits ``l = kernel(d, s, r, ...)`` minus ``100 / r`` on the masked self entries,
  affinities ``A_ij = omega_j sqrt(max(softmax_j(l)_ij * softmax_i(l)_ij, 1e-6))`` (row x column softmax),
  masses ``S_pos_i = sum_{j in P} A_ij`` and ``S_neg_i = sum_{j in gen u neg} A_ij`` and the dipole field
  ``F_r,i = S_neg_i sum_{j in P} A_ij (T~_j - x~_i) - S_pos_i sum_{j in gen u neg} A_ij (T~_j - x~_i)``
  ``      = S_pos_i S_neg_i (mu+_i - mu-_i)``  (attraction to positives minus repulsion from negatives and
  from the other generated particles);
* each radius' field is RMS-normalised, ``F_r / sqrt(max(mean(F_r^2), 1e-8))``, and ``F = sum_r F_r``;
* target ``x* = sg(x~ + F)``, loss ``mean_{i,d} (x / sigma - x*)^2`` (value mean(F^2) at the current point;
  gradient ``-2 F / (N D sigma)``).

The reference drift is the same function with ``positives = reference features`` and
``negatives = sg(generated features)``, both self-diagonals masked (``mask_negative_self=True``).

Map from code names to paper symbols
------------------------------------
===================  ==============================================================================
code                 paper / method.md
===================  ==============================================================================
``x``                z (generated features, the particles), (B, N, D)
``positives``        A+ = {phi(x_j+)},  weight ``positive_weight`` = w+
``negatives``        A- = {phi(x_j-)},  weight ``negative_weight`` = w-
``T``, ``omega``     targets [sg(x); A-; A+] and their weights
``s``, ``sigma``     mean kernel distance (distance unit of the kernel), per-dimension scale s / sqrt(D)
``radii`` (r)        kernel temperatures relative to s
``A``                doubly normalised kernel affinities (the w_i(x; B) of the paper, for all sets at once)
``S_pos``, ``S_neg`` total affinity of a particle to the positive / negative side
``F``                eta * V (V_pref for the preference loss, V_ref for the reference loss), in sigma units
``ref_lambda``       lambda
===================  ==============================================================================

Where the official code differs from the paper's equations (we follow the official code)
----------------------------------------------------------------------------------------
1. V_pref is not the literal gradient of E(z): it is the Drifting-model attraction/repulsion mean-shift
   field above, which also repels each particle from the other generated particles.
2. There is no step size eta: every radius' field is normalised to unit RMS and the radii are summed, so
   ``F`` plays the role of ``eta V``. The paper's "eta" ablation values (1000..10000) are the anchor weights
   ``positive_weight`` / ``negative_weight`` (default 3000); gamma has no knob either.
3. V_pref and V_ref are not added into one target: they are two regression losses, each with its own
   scale, target and normalisation, combined as ``L = agg_keys(L_pref) + lambda * agg_keys(L_ref)``.
4. The loss is ``mean`` over particles and dimensions in sigma units, not ``1/(2K) sum ||.||^2``.

Decisions of this implementation (where the official code has B = 1)
--------------------------------------------------------------------
* Batching over prompts: the official code averages ``s`` over (b, i, j) and RMS-normalises over all
  (b, i, d) entries. Here every statistic is per prompt (means over i, j or i, d for each b), so prompts
  of one batch never interact. For B = 1 both are identical.
* Precision: the field is computed without grad in float32 like the official code; float64 inputs are
  kept in float64 (the tests use this to compare against a float64 reference implementation).
* Translation: distances and the field only depend on differences, so they are computed in coordinates
  centred on the mean generated particle of each prompt. This is exact in real arithmetic and avoids the
  cancellation of the expanded-norm distance when features have a large common offset.
* Kernels receive ``dist`` and ``scale`` in feature units and the *uncentred, unscaled* ``x`` and ``T``
  (so a cosine kernel sees the features themselves); the self mask is then subtracted in place from the
  logits they return (a kernel returning a view of ``dist`` gets a copy).
* Key weights: ``key_weights`` (by name prefix, longest match) scales a key's *preference* loss, for
  feature spaces whose keys are not equally informative about the reward; the reference loss keeps
  every key at weight 1. With no weights (the default) this is the official code's plain sum.
* Keys of one shape: ``DriftEstimator`` stacks the keys whose particle sets have the same shapes along
  the batch and computes their fields in one call. Every statistic is per prompt, so this is exact; it
  replaces one call per key by one per shape (the toy world's 41 keys: 8 calls), which matters most on a
  GPU, where the small matrices of one key leave the device waiting on kernel launches.
* Memory: the (B, N, J) matrices are updated in place where possible, so about four of them are alive at
  once per radius (per group of stacked keys).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from torch import Tensor

DEFAULT_RADII = (0.02, 0.05, 0.2)
DEFAULT_ANCHOR_WEIGHT = 3000.0
MASK_PENALTY = 100.0  # masked logits get -MASK_PENALTY / r
AFFINITY_FLOOR = 1e-6  # floor on row x column softmax product, before the square root
DIST_SQ_FLOOR = 1e-8
SCALE_FLOOR = 1e-3
RMS_SQ_FLOOR = 1e-8

KernelFn = Callable[[Tensor, Tensor, float, Tensor, Tensor], Tensor]


@dataclass
class DriftField:
    """The drift field of one particle set; all tensors detached."""

    F: Tensor  # (B, N, D) sum over radii of the unit-RMS fields, in sigma units
    sigma: Tensor  # (B, 1, 1) per-dimension scale s / sqrt(D)
    s: Tensor  # (B, 1, 1) weighted mean distance (the kernel's distance unit)
    rms: Tensor  # (len(radii), B) RMS of each radius' field before normalisation


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float32 like the official code; float64 stays float64 (reference checks in the tests)
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _anchor_weights(weight: float | Tensor, B: int, count: int, like: Tensor) -> Tensor:
    """omega for one anchor block, (B, count): a scalar or per-anchor weights ((count,) or (B, count))."""
    if isinstance(weight, Tensor):
        return weight.to(device=like.device, dtype=like.dtype).expand(B, count)
    return like.new_full((B, count), float(weight))


# The (B, N, J) matrices dominate time and memory: the helpers below work in place where they can.


def pairwise_distance(x: Tensor, T: Tensor) -> Tensor:
    """d_ij = sqrt(max(|x_i|^2 + |T_j|^2 - 2 x_i.T_j, 1e-8)), (B, N, J); the expanded-norm form of the code."""
    d_sq = (x @ T.transpose(-1, -2)).mul_(-2.0)
    d_sq.add_(x.pow(2).sum(-1, keepdim=True)).add_(T.pow(2).sum(-1).unsqueeze(-2))
    return d_sq.clamp_min_(DIST_SQ_FLOOR).sqrt_()


def feature_scale(d: Tensor, omega: Tensor) -> Tensor:
    """s = max(mean_ij(d_ij omega_j) / mean_j omega_j, 1e-3) per prompt, (B, 1, 1)."""
    N, J = d.shape[-2:]
    s = (d.sum(dim=-2) * omega).sum(dim=-1) / (N * J) / omega.mean(dim=-1)
    return s.clamp_min(SCALE_FLOOR).view(-1, 1, 1)


def mask_self_(logits: Tensor, r: float, N: int, mask_negative_self: bool) -> Tensor:
    """Subtract 100 / r where a particle meets itself: the generated block's diagonal (and the negatives')."""
    torch.diagonal(logits[..., :N], dim1=-2, dim2=-1).sub_(MASK_PENALTY / r)
    if mask_negative_self:
        torch.diagonal(logits[..., N:2 * N], dim1=-2, dim2=-1).sub_(MASK_PENALTY / r)
    return logits


def affinity(logits: Tensor, omega: Tensor) -> Tensor:
    """A_ij = omega_j sqrt(max(softmax_j(l)_ij softmax_i(l)_ij, 1e-6)): row x column normalised, geometric mean."""
    A = logits.softmax(dim=-1)  # row: over targets j
    A.mul_(logits.softmax(dim=-2))  # column: over generated particles i (of the same prompt)
    return A.clamp_min_(AFFINITY_FLOOR).sqrt_().mul_(omega.unsqueeze(-2))


def dipole_field(A: Tensor, T: Tensor, x: Tensor, num_neg_side: int) -> Tensor:
    """F_i = S_neg_i sum_{j in P} A_ij (T_j - x_i) - S_pos_i sum_{j in gen u neg} A_ij (T_j - x_i).

    ``A`` (B, N, J), targets ``T`` (B, J, D) and particles ``x`` (B, N, D) in the same (sigma) coordinates;
    the first ``num_neg_side`` = N + M columns are the generated block and the negatives.
    """
    A_neg, A_pos = A[..., :num_neg_side], A[..., num_neg_side:]
    S_neg = A_neg.sum(-1, keepdim=True)
    S_pos = A_pos.sum(-1, keepdim=True)
    attraction = A_pos @ T[:, num_neg_side:] - S_pos * x  # sum_P A (T - x)
    repulsion = A_neg @ T[:, :num_neg_side] - S_neg * x  # sum_{gen u neg} A (T - x)
    return S_neg * attraction - S_pos * repulsion


def drift_field(
    x: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    kernel: KernelFn,
    radii: Sequence[float] = DEFAULT_RADII,
    positive_weight: float | Tensor = DEFAULT_ANCHOR_WEIGHT,
    negative_weight: float | Tensor = DEFAULT_ANCHOR_WEIGHT,
    mask_negative_self: bool = False,
) -> DriftField:
    """The drift field of particles ``x`` (B, N, D) toward ``positives`` (B, P, D), away from ``negatives`` (B, M, D).

    Computed without grad; ``x`` is detached. ``mask_negative_self`` (reference loss) says that
    ``negatives[:, i]`` is a copy of ``x[:, i]`` and masks it too (requires M == N).
    """
    B, N, D = x.shape
    P, M = positives.shape[1], negatives.shape[1]
    if any(a.dim() != 3 or a.shape[0] != B or a.shape[2] != D for a in (positives, negatives)):
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, positives {tuple(positives.shape)}, "
                         f"negatives {tuple(negatives.shape)}")
    if mask_negative_self and M != N:
        raise ValueError(f"mask_negative_self needs as many negatives as particles (M={M}, N={N})")
    dtype = _compute_dtype(x, positives, negatives)
    with torch.no_grad():
        x = x.detach().to(dtype)
        T = torch.cat([x, negatives.detach().to(dtype), positives.detach().to(dtype)], dim=1)  # (B, J, D)
        omega = torch.cat(
            [x.new_ones(B, N), _anchor_weights(negative_weight, B, M, x), _anchor_weights(positive_weight, B, P, x)],
            dim=1,
        )
        # Centre on the mean particle of each prompt: exact for distances and field, better conditioned.
        centre = x.mean(dim=1, keepdim=True)
        x_c, T_c = x - centre, T - centre
        dist = pairwise_distance(x_c, T_c)
        s = feature_scale(dist, omega)
        sigma = (s / math.sqrt(D)).clamp_min(SCALE_FLOOR)
        x_tilde, T_tilde = x_c / sigma, T_c / sigma

        F = torch.zeros_like(x)
        rms = []
        for r in radii:
            logits = kernel(dist, s, r, x, T)
            if logits.untyped_storage().data_ptr() == dist.untyped_storage().data_ptr():
                logits = logits.clone()  # the mask is applied in place: keep dist intact for the next radius
            mask_self_(logits, r, N, mask_negative_self)
            A = affinity(logits, omega)
            F_r = dipole_field(A, T_tilde, x_tilde, N + M)
            rms_r = F_r.pow(2).mean(dim=(1, 2)).clamp_min(RMS_SQ_FLOOR).sqrt()  # per prompt
            F += F_r / rms_r.view(B, 1, 1)
            rms.append(rms_r)
    return DriftField(F=F, sigma=sigma, s=s, rms=torch.stack(rms))


def _squared_error_sum(x: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """sum_{i,d} (x / sigma - sg(target))^2 per prompt, (B,); x keeps its graph."""
    target = target.detach()
    return (x.to(target.dtype) / sigma - target).pow(2).sum(dim=(1, 2))


def regression_loss(x: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """mean over particles and dimensions of (x / sigma - sg(target))^2, (B,)."""
    return _squared_error_sum(x, target, sigma) / (x.shape[1] * x.shape[2])


def drift_loss(
    x: Tensor,
    positives: Tensor,
    negatives: Tensor,
    *,
    kernel: KernelFn,
    radii: Sequence[float] = DEFAULT_RADII,
    positive_weight: float | Tensor = DEFAULT_ANCHOR_WEIGHT,
    negative_weight: float | Tensor = DEFAULT_ANCHOR_WEIGHT,
    mask_negative_self: bool = False,
) -> tuple[Tensor, DriftField]:
    """Regression of ``x`` to ``sg(x / sigma + F)``: the official ``drift_loss``, per prompt (B,)."""
    fld = drift_field(
        x, positives, negatives, kernel=kernel, radii=radii, positive_weight=positive_weight,
        negative_weight=negative_weight, mask_negative_self=mask_negative_self,
    )
    target = x.detach().to(fld.F.dtype) / fld.sigma + fld.F
    return regression_loss(x, target, fld.sigma), fld


@dataclass
class DriftTargets:
    """Regression targets of every feature key, computed once per step (no grad).

    ``pref_target[key]`` (B, N, D) is ``sg(x / sigma + F)`` of the preference field, ``pref_sigma[key]``
    (B, 1, 1) its scale; ``ref_*`` the same for the reference drift (``None`` when it was skipped).
    """

    pref_target: dict[str, Tensor]
    pref_sigma: dict[str, Tensor]
    ref_target: dict[str, Tensor] | None = None
    ref_sigma: dict[str, Tensor] | None = None
    stats: dict[str, float] = field(default_factory=dict)


class DriftLosses(TypedDict):
    """What :meth:`DriftEstimator.loss` returns: losses (B,), one per prompt."""

    pref: Tensor
    #: None when the reference drift was skipped
    ref: Tensor | None
    #: pref + ref_lambda * ref
    total: Tensor


def _same_shape_groups(first: Mapping[str, Tensor], *others: Mapping[str, Tensor] | None) -> list[list[str]]:
    """The keys of ``first``, grouped (in order of first appearance) by their shapes, dtypes and devices in
    every set (``None`` sets aside)."""
    sets = [first, *(t for t in others if t is not None)]
    groups: dict[tuple[tuple[tuple[int, ...], torch.dtype, torch.device], ...], list[str]] = {}
    for key in first:
        signature = tuple((tuple(t[key].shape), t[key].dtype, t[key].device) for t in sets)
        groups.setdefault(signature, []).append(key)
    return list(groups.values())


def _stack(features: Mapping[str, Tensor], keys: list[str]) -> Tensor:
    """The keys' (B, N, D) particle sets stacked along the batch, (len(keys) * B, N, D)."""
    return features[keys[0]] if len(keys) == 1 else torch.cat([features[key] for key in keys])


class DriftEstimator:
    """Preference + reference drift targets and losses over a dict of feature keys (method.md §3 steps 8-9)."""

    def __init__(
        self,
        kernel: KernelFn,
        *,
        radii: Sequence[float] = DEFAULT_RADII,
        positive_weight: float = DEFAULT_ANCHOR_WEIGHT,
        negative_weight: float = DEFAULT_ANCHOR_WEIGHT,
        ref_lambda: float = 0.2,
        ref_positive_weight: float = DEFAULT_ANCHOR_WEIGHT,
        ref_negative_weight: float = DEFAULT_ANCHOR_WEIGHT,
        ref_radii: Sequence[float] | None = None,
        aggregation: str = "sum",
        key_weights: Mapping[str, float] | None = None,
    ):
        if aggregation not in ("sum", "mean"):
            raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
        self.kernel = kernel
        self.radii = tuple(radii)
        self.positive_weight = positive_weight
        self.negative_weight = negative_weight
        self.ref_lambda = float(ref_lambda)
        self.ref_positive_weight = ref_positive_weight
        self.ref_negative_weight = ref_negative_weight
        self.ref_radii = self.radii if ref_radii is None else tuple(ref_radii)
        self.aggregation = aggregation
        self.key_weights = dict(key_weights or {})

    def key_weight(self, key: str) -> float:
        """Weight of a key's preference loss: the longest matching name prefix in key_weights, else 1."""
        matches = [prefix for prefix in self.key_weights if key.startswith(prefix)]
        return self.key_weights[max(matches, key=len)] if matches else 1.0

    def targets(
        self,
        generated: Mapping[str, Tensor],
        positives: Mapping[str, Tensor],
        negatives: Mapping[str, Tensor],
        reference: Mapping[str, Tensor] | None = None,
    ) -> DriftTargets:
        """Fields and targets of every key; the reference drift is skipped when ref_lambda == 0 or no reference."""
        if self.ref_lambda == 0.0:
            reference = None
        out = DriftTargets(pref_target={}, pref_sigma={})
        ref_target: dict[str, Tensor] = {}
        ref_sigma: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        # Keys of one shape go through one batched call: every statistic of the field is per prompt
        # (per batch row), so stacking keys along the batch is exact, and far fewer (GPU) kernel launches.
        for keys in _same_shape_groups(generated, positives, negatives, reference):
            x = _stack(generated, keys).detach()
            pref = drift_field(
                x, _stack(positives, keys), _stack(negatives, keys), kernel=self.kernel, radii=self.radii,
                positive_weight=self.positive_weight, negative_weight=self.negative_weight,
            )
            self._collect(out.pref_target, out.pref_sigma, stats, "pref", keys, x, pref, self.radii)
            if reference is not None:
                # V_ref = mu_R - mu_Z: reference features attract, the generated set (itself masked) repels.
                ref = drift_field(
                    x, _stack(reference, keys), x, kernel=self.kernel, radii=self.ref_radii,
                    positive_weight=self.ref_positive_weight, negative_weight=self.ref_negative_weight,
                    mask_negative_self=True,
                )
                self._collect(ref_target, ref_sigma, stats, "ref", keys, x, ref, self.ref_radii)
        if reference is not None:
            out.ref_target, out.ref_sigma = ref_target, ref_sigma
        # one device-to-host copy for all diagnostics
        out.stats = dict(zip(stats, torch.stack(list(stats.values())).tolist(), strict=True)) if stats else {}
        return out

    @staticmethod
    def _collect(targets: dict[str, Tensor], sigmas: dict[str, Tensor], stats: dict[str, Tensor], kind: str,
                 keys: list[str], x: Tensor, fld: DriftField, radii: Sequence[float]) -> None:
        """Targets ``sg(x / sigma + F)`` and scales of a group's field, split back per key, and each key's
        diagnostics (means over prompts): per-radius RMS, s, sigma and mean(F^2) = the loss value now."""
        G = len(keys)
        target = x.to(fld.F.dtype) / fld.sigma + fld.F
        per_key = {f"rms_r{r:g}": rms_r.view(G, -1).mean(-1) for r, rms_r in zip(radii, fld.rms, strict=True)}
        per_key.update(s=fld.s.view(G, -1).mean(-1), sigma=fld.sigma.view(G, -1).mean(-1),
                       field_sq=fld.F.pow(2).view(G, -1).mean(-1))
        for g, (key, t, sigma) in enumerate(zip(keys, target.chunk(G), fld.sigma.chunk(G), strict=True)):
            targets[key], sigmas[key] = t, sigma
            for name, values in per_key.items():
                stats[f"{key}/{kind}/{name}"] = values[g]

    def loss(
        self,
        generated: Mapping[str, Tensor],
        targets: DriftTargets,
        start: int = 0,
        stop: int | None = None,
        particles_per_candidate: Mapping[str, int] | None = None,
    ) -> DriftLosses:
        """Losses (B,) of the particles of candidates ``start:stop`` (all of them by default).

        Particles are candidate-major (candidate k owns rows k*T:(k+1)*T). A chunk's loss is normalised by
        the full N * D, so the losses (and gradients) of disjoint chunks add up to the unchunked ones.
        """
        pref: list[Tensor] = []
        ref: list[Tensor] = []
        ref_target, ref_sigma = targets.ref_target, targets.ref_sigma
        for key, target in targets.pref_target.items():
            x = generated[key]
            rows = self._rows(key, x.shape[1], target.shape[1], start, stop, particles_per_candidate)
            full_size = target.shape[1] * target.shape[2]
            error = _squared_error_sum(x, target[:, rows], targets.pref_sigma[key]) / full_size
            pref.append(self.key_weight(key) * error)
            if ref_target is not None and ref_sigma is not None:
                ref.append(_squared_error_sum(x, ref_target[key][:, rows], ref_sigma[key]) / full_size)
        pref_loss = self._aggregate(pref)
        ref_loss = self._aggregate(ref) if ref_target is not None else None
        total = pref_loss if ref_loss is None else pref_loss + self.ref_lambda * ref_loss
        return {"pref": pref_loss, "ref": ref_loss, "total": total}

    def _aggregate(self, losses: list[Tensor]) -> Tensor:
        total = torch.stack(losses).sum(dim=0)
        return total / len(losses) if self.aggregation == "mean" else total

    @staticmethod
    def _rows(key: str, n: int, N: int, start: int, stop: int | None,
              particles_per_candidate: Mapping[str, int] | None) -> slice:
        """Target rows of a chunk holding n particles of candidates start:stop."""
        if particles_per_candidate is not None:
            T = particles_per_candidate[key]
        elif start == 0:
            T = None  # rows 0:n, no need to know T
        elif stop is not None and n % (stop - start) == 0:
            T = n // (stop - start)
        else:
            raise ValueError(f"{key}: pass particles_per_candidate or stop to locate candidates {start}:{stop}")
        first = 0 if T is None else start * T
        if (T is not None and stop is not None and n != (stop - start) * T) or first + n > N:
            raise ValueError(f"{key}: {n} particles do not fit candidates {start}:{stop} of {N} particles")
        return slice(first, first + n)
