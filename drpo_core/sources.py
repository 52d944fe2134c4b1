"""Drift sources: where the positive and negative anchors of a prompt come from.

* ``online`` (the paper): rank the prompt's own K candidates; the top-M are positives, the bottom-M
  negatives (detached); a prompt whose scores do not put the positives strictly above the negatives is
  skipped as ``tied`` (ranking.py, "Ties"). With binary rankers (0/1 correctness, GenEval style) the
  rollout of method.md §7.4 runs: up to R rounds of K no-grad candidates until M correct and M
  incorrect ones are found, else the prompt is skipped. The K candidates of the first round are the
  trainable particles in every case; later rounds only supply anchors. (The official code instead
  trains on the kept candidates minus the negatives, i.e. on the positives only; we keep all K
  trainable so every candidate is pushed toward correct samples and away from incorrect ones.)
  With ``selection.positive_memory`` N > 0, the source also remembers the N most recent correct
  samples of each prompt (CPU latents, checkpointed); a prompt whose rollout finds fewer than M
  correct ones draws the rest of its positives from them instead of being skipped. Not in the paper:
  it gives hard prompts (few correct samples) a signal on every visit.
* ``offline``: JSONL rows ``{"prompt", "chosen": path|[paths], "rejected": path|[paths]}`` with
  paths relative to the file; the images are encoded by the generator into its space and used as
  positives and negatives (method.md §9).
* ``data``: real samples as positives and no negative anchors: the generated particles themselves
  (the weight-1 block of the field) are the repulsion, as in drifting-model training. The toy
  world pretrains its base generator this way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from drpo_core.errors import ComponentError, DrpoError
from drpo_core.jsonl import read_jsonl
from drpo_core.ranking import select_binary, select_top_bottom, selection_seed, separated

Features = dict[str, torch.Tensor]


@dataclass
class Anchors:
    """Anchor particle sets for B prompts; ``keep[b]`` False when prompt b is skipped."""

    positives: Features
    negatives: Features
    keep: torch.Tensor
    skips: dict[str, int] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


class Candidates(Protocol):
    """What the loop hands a source: the prompts' first-round candidates and helpers."""

    @property
    def records(self) -> Sequence[Any]: ...
    @property
    def indices(self) -> Sequence[int]: ...
    @property
    def latents(self) -> torch.Tensor:
        """(B*K, ...) detached"""
    @property
    def features(self) -> Features:
        """{key: (B*K, T, D)} detached"""
    @property
    def step(self) -> int: ...

    def score(self, latents: torch.Tensor, records: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]: ...
    def rollout(self, prompts: list[int], round_index: int) -> torch.Tensor: ...
    def featurise(self, latents: torch.Tensor, prompts: Sequence[str]) -> Features: ...


class DriftSource(Protocol):
    """Where a micro-batch's anchors come from; its state (if any) travels in checkpoints."""

    def anchors(self, batch: Candidates, k: int) -> Anchors: ...

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able values to checkpoint, so a resumed run continues exactly."""
        ...

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None: ...


class _Stateless:
    """A source that keeps nothing between steps."""

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        return None


def gather(features: Features, index: torch.Tensor, k: int) -> Features:
    """Pick candidates ``index`` (B, M) from per-candidate features (B*K, T, D) -> (B, M*T, D)."""
    out = {}
    for key, value in features.items():
        per_prompt = value.reshape(-1, k, *value.shape[1:])
        picked = torch.stack([per_prompt[b, index[b]] for b in range(index.shape[0])])
        out[key] = picked.reshape(picked.shape[0], -1, picked.shape[-1])
    return out


class OnlineSource:
    def __init__(self, *, binary: bool, positives: int, negatives: int, rollout_rounds: int, seed: int,
                 fresh_anchors: bool = False, positive_memory: int = 0):
        self.binary, self.positives, self.negatives = binary, positives, negatives
        self.rollout_rounds, self.seed, self.fresh_anchors = rollout_rounds, seed, fresh_anchors
        # binary rankers: up to ``positive_memory`` recent correct samples per prompt text (CPU latents),
        # which top up the positives of a prompt whose rollout found fewer than M+ correct ones
        self.memory_size = positive_memory
        self.memory: dict[str, torch.Tensor] = {}

    def anchors(self, batch: Candidates, k: int) -> Anchors:
        scores, ok = batch.score(batch.latents, batch.records)  # (B, K), (B,)
        if self.binary:
            return self._binary(batch, scores, ok, k)
        # ties straddling a boundary are drawn with the prompt's seed; prompts whose positives do not
        # all score above their negatives get no anchors (ranking.py, "Ties")
        seeds = [selection_seed(self.seed, batch.step, i, 0) for i in batch.indices]
        pos, neg = select_top_bottom(scores, self.positives, self.negatives, seeds)
        ordered = separated(scores, pos, neg)
        keep = ok & ordered
        anchors = Anchors(gather(batch.features, pos, k), gather(batch.features, neg, k), keep)
        anchors.skips = {"failure": int((~ok).sum()), "tied": int((ok & ~ordered).sum())}
        kept = keep.nonzero().flatten()
        if len(kept):
            anchors.stats = {
                "score_positives": float(scores[kept].gather(1, pos[kept]).mean()),
                "score_negatives": float(scores[kept].gather(1, neg[kept]).mean()),
                "score_mean": float(scores[kept].mean()),
            }
        return anchors

    def _binary(self, batch: Candidates, scores: torch.Tensor, ok: torch.Tensor, k: int) -> Anchors:
        """Method.md §7.4: extend each prompt's pool by no-grad rounds until M correct and M wrong."""
        first_round = batch.latents.reshape(-1, k, *batch.latents.shape[1:])
        # fresh anchors come from extra rounds only, never copies of the trainable candidates
        pools_x = [[] if self.fresh_anchors else list(first_round[b]) for b in range(len(ok))]
        pools_s = [[] if self.fresh_anchors else list(scores[b]) for b in range(len(ok))]
        last_round = self.rollout_rounds + int(self.fresh_anchors)
        for round_index in range(1, last_round):
            # one batch per round: every prompt still short of anchors gets its next K candidates
            short = [b for b in range(len(ok)) if ok[b] and not self._enough(pools_s[b])]
            if not short:
                break
            extra = batch.rollout(short, round_index).reshape(len(short), k, *first_round.shape[2:])
            extra_scores, extra_ok = batch.score(extra.flatten(0, 1), [batch.records[b] for b in short])
            for i, b in enumerate(short):
                ok[b] = ok[b] & extra_ok[i]
                pools_x[b] += list(extra[i])
                pools_s[b] += list(extra_scores[i])
        positives, negatives, keep = {}, {}, torch.zeros(len(ok), dtype=torch.bool)
        skips = {"failure": int((~ok).sum()), "rollout": 0}
        chosen_pos, chosen_neg = [], []
        for b in range(len(ok)):
            if ok[b] and self.memory_size:
                self._top_up(batch.records[b].text, pools_x[b], pools_s[b])
            correct = torch.stack(pools_s[b]) >= 0.5
            seed = selection_seed(self.seed, batch.step, batch.indices[b], 0)
            pos, neg, enough = select_binary(correct[None], self.positives, self.negatives, [seed])
            if not ok[b]:
                continue
            if not enough[0]:
                skips["rollout"] += 1
                continue
            keep[b] = True
            pool = torch.stack(pools_x[b])
            chosen_pos.append(pool[pos[0]])
            chosen_neg.append(pool[neg[0]])
        if keep.any():
            kept = [batch.records[b].text for b in keep.nonzero().flatten().tolist()]
            positives = _per_prompt(batch.featurise(torch.cat(chosen_pos), _each(kept, self.positives)), self.positives)
            negatives = _per_prompt(batch.featurise(torch.cat(chosen_neg), _each(kept, self.negatives)), self.negatives)
        anchors = Anchors(_scatter(positives, keep), _scatter(negatives, keep), keep, skips)
        anchors.stats = {"accuracy": float(scores[ok].float().mean()) if ok.any() else float("nan")}
        return anchors

    def _top_up(self, prompt: str, pool_x: list[torch.Tensor], pool_s: list[torch.Tensor]) -> None:
        """Remember the pool's correct samples; short of M+ correct, add remembered ones to the pool."""
        correct = [x for x, s in zip(pool_x, pool_s, strict=True) if s >= 0.5]
        correct = [x.detach().cpu() for x in correct[-self.memory_size:]]  # copy only what is kept
        remembered = self.memory.get(prompt)
        if remembered is not None and len(correct) < self.positives:
            pool_x += list(remembered.to(pool_x[0].device))
            pool_s += [pool_s[0].new_ones(())] * len(remembered)
        if correct:
            fresh = torch.stack(correct)
            merged = fresh if remembered is None else torch.cat([remembered, fresh])
            self.memory[prompt] = merged[-self.memory_size:]

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The remembered samples as ``memory.{n}`` tensors, and their prompts in the same order."""
        return ({f"memory.{n}": t for n, t in enumerate(self.memory.values())},
                {"memory_prompts": list(self.memory)})

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        prompts = values.get("memory_prompts", [])
        self.memory = {prompt: tensors[f"memory.{n}"] for n, prompt in enumerate(prompts)}

    def _enough(self, scores: list[torch.Tensor]) -> bool:
        if not scores:
            return False
        correct = int((torch.stack(scores) >= 0.5).sum())
        return correct >= self.positives and len(scores) - correct >= self.negatives


def _each(prompts: Sequence[str], m: int) -> list[str]:
    """Each prompt repeated m times: the prompts of m anchor rows per prompt."""
    return [p for p in prompts for _ in range(m)]


def _per_prompt(features: Features, m: int) -> Features:
    return {key: value.reshape(-1, m * value.shape[1], value.shape[-1]) for key, value in features.items()}


def _scatter(features: Features, keep: torch.Tensor) -> Features:
    """Place the kept prompts' anchors at their batch positions (zeros for skipped prompts)."""
    out = {}
    for key, value in features.items():
        full = value.new_zeros(len(keep), *value.shape[1:])
        full[keep] = value
        out[key] = full
    return out


def load_image(path: Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1], resized and centre-cropped to ``size``."""
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as error:
        raise DrpoError(f"cannot read image {path}: {error}") from error
    if size is not None and image.size != (size[1], size[0]):
        scale = max(size[1] / image.width, size[0] / image.height)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - size[1]) // 2, (image.height - size[0]) // 2
        image = image.crop((left, top, left + size[1], top + size[0]))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def read_pairs(path: str | Path) -> dict[str, dict[str, list[Path]]]:
    """Offline JSONL -> {prompt: {"chosen": [paths], "rejected": [paths]}} (paths checked)."""
    path = Path(path)
    pairs: dict[str, dict[str, list[Path]]] = {}
    rows = read_jsonl(path, required=("prompt", "chosen", "rejected"), what="source.path: offline pairs file")
    for number, row in rows:
        entry = pairs.setdefault(_prompt(path, number, row), {"chosen": [], "rejected": []})
        for key in ("chosen", "rejected"):
            entry[key] += _image_paths(path, number, row, key)
    if not pairs:
        raise DrpoError(f"{path}: no pairs in the file")
    return pairs


def _prompt(path: Path, number: int, row: dict[str, Any]) -> str:
    if not isinstance(row["prompt"], str):
        raise DrpoError(f'{path}:{number}: "prompt" must be a string')
    return row["prompt"]


def _image_paths(path: Path, number: int, row: dict[str, Any], key: str) -> list[Path]:
    """``row[key]``, one path or a list of paths relative to ``path``'s folder, each checked."""
    items = [row[key]] if isinstance(row[key], str) else row[key]
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise DrpoError(f'{path}:{number}: "{key}" must be a path or a list of paths')
    for item in items:
        if not (path.parent / item).is_file():
            raise DrpoError(f"{path}:{number}: {'' if key == 'images' else key + ' '}image not found: {item}")
    return [path.parent / item for item in items]


class OfflineSource(_Stateless):
    """Static chosen/rejected images as anchors (method.md §9); one prompt per micro-batch row."""

    def __init__(self, pairs: dict[str, dict[str, list[Path]]], encode: Callable[[torch.Tensor], torch.Tensor],
                 image_size: tuple[int, int]):
        self.pairs = pairs  # from read_pairs
        self.encode, self.image_size = encode, image_size
        self._cache: dict[Path, torch.Tensor] = {}

    def _latents(self, paths: list[Path]) -> torch.Tensor:
        missing = [p for p in paths if p not in self._cache]
        if missing:
            images = torch.stack([load_image(p, self.image_size) for p in missing])
            for p, latent in zip(missing, self.encode(images), strict=True):
                self._cache[p] = latent.detach()
        return torch.stack([self._cache[p] for p in paths])

    def anchors(self, batch: Candidates, k: int) -> Anchors:
        if len(batch.records) != 1:
            raise DrpoError("source.kind offline: set train.prompts_per_step to 1 (anchor counts differ)")
        entry = self.pairs.get(batch.records[0].text)
        if entry is None:
            raise DrpoError(f"offline source: no pairs for prompt {batch.records[0].text!r}")
        prompt = batch.records[0].text
        chosen, rejected = entry["chosen"], entry["rejected"]
        positives = _per_prompt(batch.featurise(self._latents(chosen), [prompt] * len(chosen)), len(chosen))
        negatives = _per_prompt(batch.featurise(self._latents(rejected), [prompt] * len(rejected)), len(rejected))
        return Anchors(positives, negatives, torch.ones(1, dtype=torch.bool))


class DataSampler(Protocol):
    """Real samples for a prompt: ``sample(record, n, seed) -> images (n, 3, H, W) in [0, 1]``."""

    def sample(self, record: Any, n: int, seed: int) -> torch.Tensor: ...


class ImageFolderSampler:
    """Real samples from a JSONL of ``{"prompt", "images": path|[paths]}`` (paths relative to the file)."""

    def __init__(self, path: str | Path, image_size: tuple[int, int]):
        path = Path(path)
        self.images: dict[str, list[Path]] = {}
        for number, row in read_jsonl(path, required=("prompt", "images"), what="source.path: data file"):
            self.images.setdefault(_prompt(path, number, row), []).extend(_image_paths(path, number, row, "images"))
        self.image_size = image_size

    def sample(self, record: Any, n: int, seed: int) -> torch.Tensor:
        paths = self.images.get(record.text)
        if not paths:
            raise DrpoError(f"data source: no images for prompt {record.text!r}")
        pick = torch.randint(len(paths), (n,), generator=torch.Generator().manual_seed(seed))
        return torch.stack([load_image(paths[i], self.image_size) for i in pick.tolist()])


class DataSource(_Stateless):
    def __init__(self, sampler: DataSampler, encode: Callable[[torch.Tensor], torch.Tensor], positives: int,
                 seed: int):
        self.sampler, self.encode, self.positives, self.seed = sampler, encode, positives, seed

    def anchors(self, batch: Candidates, k: int) -> Anchors:
        real = [self.sampler.sample(r, self.positives, selection_seed(self.seed, batch.step, i, 0))
                for r, i in zip(batch.records, batch.indices, strict=True)]
        latents = self.encode(torch.cat(real).to(batch.latents.device))
        positives = _per_prompt(batch.featurise(latents, _each([r.text for r in batch.records], self.positives)),
                                self.positives)
        empty = {key: value[:, :0] for key, value in positives.items()}
        return Anchors(positives, empty, torch.ones(len(batch.records), dtype=torch.bool))


class InvalidScores(ComponentError):
    """A ranker returned something that is not scores (``None``, text, ...). The loop skips the prompts
    it was asked to score, as when a ranker raises, and counts them against the failure budget; a
    wrong *number* of scores stays a plain ``ComponentError`` that stops the run."""


def check_scores(scores: Any, expected: int, name: str) -> torch.Tensor:
    """A ranker's output as a float64 CPU tensor of ``expected`` values, or one clear error.

    float64 keeps the ranker's precision until the order is taken: float32, bf16 and fp16 tensors and
    lists of Python floats convert to it exactly. Raises :class:`InvalidScores` for output that is not
    numbers and ``ComponentError`` for a wrong count.
    """
    if scores is None:
        raise InvalidScores(f"ranker {name!r} returned None, not scores")
    try:
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidScores(f"ranker {name!r} returned scores that are not numbers "
                            f"({type(scores).__name__}: {error})") from None
    if scores.numel() != expected:
        raise ComponentError(f"ranker {name!r} returned {scores.numel()} scores for {expected} images")
    return scores


def summarise_skips(skips: Mapping[str, int]) -> dict[str, int]:
    return {f"skip_{reason}": count for reason, count in skips.items()}
