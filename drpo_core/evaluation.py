"""Held-out evaluation: fixed prompts and seeds, base versus current generator.

Reports each ranker's mean score (per group too, when a ranker defines ``groups(record)``), the
diversity among a prompt's samples and the distance to the base generator (reward-hacking
signals), and writes an image grid (base row above current row, pass/fail borders for binary
rankers) and the reward curve as PNGs in the run directory.

Evaluation streams: it generates a batch of whole prompts (every seed of a prompt together), the
current generator and the frozen base on the same noise, scores the batch with every ranker and
keeps only what the metrics need (one float per sample and ranker, one distance per sample, one
diversity per prompt, running sums, and the few images of the grid). The base's scores and
diversity are kept after the first evaluation, since the base never changes. The secondary rankers
(``eval.rankers``) are built at the start of each evaluation and released at its end, so they do not
sit beside the training rankers on the accelerator. Evaluation leaves the global random number
generators as it found them.

A ranker that raises or returns something that is not one score per image fails the evaluation with
an :class:`EvaluationError` (one line; the trainer decides what that means at that point). Non-finite
scores do not: a ranker's mean is that of its finite scores, and ``nonfinite/NAME`` (``base_nonfinite/``)
counts the others when there are any.
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from drpo_core.errors import ComponentError
from drpo_core.jsonl import read_jsonl
from drpo_core.noise import sample_noise
from drpo_core.sources import check_scores
from drpo_core.worker import WorkerLost

if TYPE_CHECKING:
    from drpo_core.config import EvalConfig
    from drpo_core.interfaces import Generator, Ranker
    from drpo_core.prompts import PromptRecord

#: samples through the generator and the rankers at once; the prompts whose seeds fit in it are measured
#: together (a prompt with more seeds alone, in several chunks)
EVAL_BATCH = 64
#: seeds per prompt shown in the grid
GRID_SEEDS = 8

Rankers = Sequence[tuple[str, "Ranker"]]


class EvaluationError(ComponentError):
    """A ranker failed during an evaluation (it raised, or its output is not one score per image)."""


@dataclass
class Measurement:
    """One evaluation's record (what ``eval.jsonl`` gets) and the images and scores of its grid."""

    record: dict[str, Any]
    #: per grid prompt, its first seeds' images ``(base, current)``, each ``(seeds, 3, H, W)`` on the CPU
    grid: list[tuple[torch.Tensor, torch.Tensor]]
    #: the first ranker's scores of those images ``(base, current)``
    grid_scores: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Base:
    """What the first evaluation learns about the frozen base: per-sample scores, per-prompt diversity."""

    scores: dict[str, torch.Tensor]
    diversity: float


#: ``featurise(latents, prompts, noise) -> {key: (B, T, D)}``, without grad
Featurise = Callable[[torch.Tensor, Sequence[str], torch.Tensor | None], dict[str, torch.Tensor]]


class Evaluator:
    """Evaluates a generator on held-out prompts; built by the trainer with what it needs:

    * ``generator``: the trained generator (``sample``, ``reference`` on the same noise, ``decode``);
    * ``featurise(latents, prompts, noise) -> {key: (B, T, D)}``: the run's feature function (diversity
      and distance);
    * ``rankers``: the training rankers ``[(name, ranker)]``, the first one primary (early stopping,
      grid borders, reward curve);
    * ``build_eval_rankers() -> [(name, ranker)]``: builds the secondary rankers, once per evaluation;
    * ``prompts``: the held-out prompts; ``config``: the run's ``eval`` section;
    * ``run_dir`` for the PNGs, ``console`` for the table and messages, ``autocast``: a factory of the
      mixed-precision context (``accelerator.autocast``) entered around generation.
    """

    def __init__(self, generator: Generator, featurise: Featurise,
                 rankers: Rankers, build_eval_rankers: Callable[[], Rankers],
                 prompts: Sequence[PromptRecord], config: EvalConfig, run_dir: str | Path,
                 console: Console | None = None,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext):
        if not rankers:
            raise ValueError("evaluation needs at least one ranker")
        self.generator, self.featurise, self.autocast = generator, featurise, autocast
        self.rankers, self.build_eval_rankers = list(rankers), build_eval_rankers
        self.prompts, self.cfg = list(prompts), config
        self.run_dir, self.console = Path(run_dir), console or Console()
        self.base: _Base | None = None
        self.best, self.evals_without_gain = -float("inf"), 0
        self.history: list[tuple[int, float]] = []  # (step, primary score)

    # -- measuring ----------------------------------------------------------------------------

    def measure(self) -> Measurement:
        """Build the secondary rankers, stream the evaluation, release them; the RNGs are left untouched."""
        with _rng_untouched():
            eval_rankers = list(self.build_eval_rankers())
            built = bool(eval_rankers)
            try:
                return self._stream([*self.rankers, *eval_rankers])
            finally:
                del eval_rankers  # the last reference: the rankers go now, not at the next evaluation
                _release_memory(collect=built)

    def _stream(self, rankers: Rankers) -> Measurement:
        seeds, prompts, gen = list(self.cfg.seeds), self.prompts, self.generator
        n_seeds, first = len(seeds), self.base is None
        grid_prompts, grid_seeds = min(self.cfg.grid_prompts, len(prompts)), min(n_seeds, GRID_SEEDS)
        scores: dict[str, list[torch.Tensor]] = {name: [] for name, _ in rankers}
        base_scores: dict[str, list[torch.Tensor]] = {name: [] for name, _ in rankers}
        diversity: list[torch.Tensor] = []
        base_diversity: list[torch.Tensor] = []
        distances: list[torch.Tensor] = []
        squares, pixels = 0.0, 0
        grid: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in range(grid_prompts)]
        gen.train(False)
        try:
            for group in _prompt_groups(len(prompts), n_seeds):
                pooled: list[torch.Tensor] = []
                base_pooled: list[torch.Tensor] = []
                for chunk in _chunks([(p, s) for p in group for s in range(n_seeds)]):
                    texts = [prompts[p].text for p, _ in chunk]
                    metadata = [prompts[p].metadata for p, _ in chunk]
                    noise = torch.stack([sample_noise(gen.noise_shape, p, seeds[s]) for p, s in chunk])
                    with torch.no_grad():
                        latents, images = self._generate(gen.sample, texts, noise.to(gen.device))
                        base_latents, base_images = self._generate(gen.reference, texts, noise.to(gen.device))
                        for name, ranker in rankers:
                            scores[name].append(_score(name, ranker, images, texts, metadata))
                            if first:
                                base_scores[name].append(_score(name, ranker, base_images, texts, metadata))
                        squares += float((images - base_images).double().pow(2).sum())
                        pixels += images.numel()
                        for i, (p, s) in enumerate(chunk):
                            if p < grid_prompts and s < grid_seeds:
                                grid[p][0].append(base_images[i].cpu())
                                grid[p][1].append(images[i].cpu())
                        del images, base_images
                        pooled.append(self._pooled(latents, texts, noise))
                        base_pooled.append(self._pooled(base_latents, texts, noise))
                        del latents, base_latents
                # every seed of the group's prompts is in: their distances and diversity, then drop them
                features, base_features = torch.cat(pooled), torch.cat(base_pooled)
                del pooled, base_pooled
                distances.append((features - base_features).norm(dim=1).cpu())
                diversity.append(_diversity_sums(features, len(group)))
                if first:
                    base_diversity.append(_diversity_sums(base_features, len(group)))
                del features, base_features
        finally:
            gen.train(True)
        if first:
            self.base = _Base({name: torch.cat(s) for name, s in base_scores.items()},
                              _diversity(base_diversity, n_seeds))
        assert self.base is not None
        now = {name: torch.cat(s) for name, s in scores.items()}
        record: dict[str, Any] = {"samples": len(prompts) * n_seeds}
        sample_records = [r for r in prompts for _ in seeds]
        for name, ranker in rankers:
            for prefix, values in (("", now[name]), ("base_", self.base.scores[name])):
                record[f"{prefix}score/{name}"] = _finite_mean(values)
                if not values.isfinite().all():
                    record[f"{prefix}nonfinite/{name}"] = int((~values.isfinite()).sum())
            for key, base_value, value in _group_means(ranker, sample_records, self.base.scores[name], now[name]):
                record[f"score/{name}/{key}"] = value
                record[f"base_score/{name}/{key}"] = base_value
        record["diversity"] = _diversity(diversity, n_seeds)
        record["diversity_ratio"] = record["diversity"] / max(self.base.diversity, 1e-12)
        record["pixel_rms_to_base"] = float(np.sqrt(squares / max(pixels, 1)))
        record["feature_distance_to_base"] = float(torch.cat(distances).mean())
        primary = self.rankers[0][0]
        shown = [slice(p * n_seeds, p * n_seeds + grid_seeds) for p in range(grid_prompts)]
        return Measurement(record, [(torch.stack(base), torch.stack(current)) for base, current in grid],
                           [(self.base.scores[primary][i], now[primary][i]) for i in shown])

    def _generate(self, sample: Callable[..., torch.Tensor], texts: list[str],
                  noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            latents = sample(texts, noise).float()
            return latents, self.generator.decode(latents).float().clamp(0, 1)

    def _pooled(self, latents: torch.Tensor, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        """One flat feature vector per sample: every key's particles, concatenated."""
        features = self.featurise(latents, prompts, noise.to(latents.device))
        return torch.cat([v.flatten(1) for _, v in sorted(features.items())], dim=1)

    # -- one evaluation -------------------------------------------------------------------------

    def run(self, step: int, log: Callable[[dict[str, Any]], object], final: bool = False) -> Any:
        """Measure, log the record, write the grid; at the end also the curve and the table, and return
        the record; in between, return ``"stop"`` when early stopping says so."""
        if not self.prompts:
            return None
        measurement = self.measure()
        record = {"step": step, **measurement.record}
        log(record)
        self._grid(step, measurement)
        primary = record[f"score/{self.rankers[0][0]}"]
        self.history.append((step, primary))
        if final:
            self._curve()
            self._table(record)
            return record
        if self.cfg.early_stopping_patience and step > 0:
            if primary > self.best:
                self.best, self.evals_without_gain = primary, 0
            else:
                self.evals_without_gain += 1
                if self.evals_without_gain >= self.cfg.early_stopping_patience:
                    self.console.print(f"early stopping at step {step}: no held-out gain in "
                                       f"{self.evals_without_gain} evaluations")
                    return "stop"
        return None

    def _grid(self, step: int, measurement: Measurement) -> None:
        """Base row above current row per prompt, same seeds; green/red borders for binary rankers."""
        n_prompts = len(measurement.grid)
        if n_prompts == 0:
            return
        n_seeds = len(measurement.grid[0][0])
        binary = getattr(self.rankers[0][1], "binary", False)
        h, w = measurement.grid[0][0].shape[-2:]
        pad = max(2, h // 16)
        canvas = Image.new("RGB", (n_seeds * (w + 2 * pad), 2 * n_prompts * (h + 2 * pad)), "white")
        for p, (images, scores) in enumerate(zip(measurement.grid, measurement.grid_scores, strict=True)):
            for row in range(2):  # base above current
                for s in range(n_seeds):
                    tile = Image.fromarray((images[row][s].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                    x, y = s * (w + 2 * pad), (2 * p + row) * (h + 2 * pad)
                    if binary:
                        colour = (40, 170, 60) if scores[row][s] >= 0.5 else (210, 40, 40)
                        ImageDraw.Draw(canvas).rectangle([x, y, x + w + 2 * pad - 1, y + h + 2 * pad - 1], fill=colour)
                    canvas.paste(tile, (x + pad, y + pad))
        scale = max(1, 96 // h)
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
        canvas.save(self.run_dir / f"grid-step{step:06d}.png")

    def _curve(self) -> None:
        """The held-out score of the first ranker against the step, as a small PNG."""
        name, path = self.rankers[0][0], self.run_dir / "eval.jsonl"
        key = f"score/{name}"
        points = self.history  # this evaluator's; the run's log also holds those before a resume
        if path.is_file():
            points = [(r["step"], r[key]) for _, r in read_jsonl(path, what="evaluation log", skip_torn=True)
                      if r.get(key) is not None]
        _plot(points, self.run_dir / "reward-curve.png", f"held-out {name}")

    def _table(self, record: dict[str, Any]) -> None:
        table = Table("held-out metric", "base", "finetuned", "change", title=f"evaluation ({record['samples']} samples)")
        for key, value in record.items():
            if key.startswith("score/"):
                name, base = key.removeprefix("score/"), record[f"base_{key}"]
                change = f"{value - base:+.4f}" if math.isfinite(value - base) else "n/a"
                table.add_row(name, _mean_text(base, record.get(f"base_nonfinite/{name}")),
                              _mean_text(value, record.get(f"nonfinite/{name}")), change)
        ratio = record["diversity_ratio"]  # undefined with one seed per prompt
        table.add_row("diversity (ratio to base)", "1.0000" if math.isfinite(ratio) else "n/a",
                      f"{ratio:.4f}" if math.isfinite(ratio) else "n/a (one seed)", "")
        table.add_row("pixel RMS to base", "0", f"{record['pixel_rms_to_base']:.4f}", "")
        table.add_row("feature distance to base", "0", f"{record['feature_distance_to_base']:.4f}", "")
        self.console.print(table)


def _mean_text(mean: float, nonfinite: int | None) -> str:
    """A table cell: the mean of the finite scores, and how many were not finite."""
    text = f"{mean:.4f}" if math.isfinite(mean) else "n/a"
    return f"{text} ({nonfinite} non-finite)" if nonfinite else text


def _prompt_groups(n_prompts: int, n_seeds: int) -> Iterator[list[int]]:
    """Prompts whose samples are measured together: as many whole prompts as fit in ``EVAL_BATCH``
    samples (one prompt when it alone has more seeds)."""
    per_group = max(1, EVAL_BATCH // n_seeds)
    for start in range(0, n_prompts, per_group):
        yield list(range(start, min(n_prompts, start + per_group)))


def _chunks(samples: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """At most ``EVAL_BATCH`` (prompt, seed) pairs at a time through the generator and the rankers."""
    for start in range(0, len(samples), EVAL_BATCH):
        yield samples[start:start + EVAL_BATCH]


def _score(name: str, ranker: Any, images: torch.Tensor, prompts: list[str],
           metadata: list[Any]) -> torch.Tensor:
    """One float32 score per image (float64 on the way: float32 values come back exactly), or one line."""
    try:
        return check_scores(ranker.score(images, prompts, metadata), len(images), name).float()
    except WorkerLost:  # a ranker past its deadline: the trainer checkpoints and stops
        raise
    except ComponentError as error:
        raise EvaluationError(str(error)) from None
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise EvaluationError(f"ranker {name!r} raised {type(error).__name__}"
                              + (f": {lines[0]}" if lines else "")) from error


def _finite_mean(values: torch.Tensor) -> float:
    """The mean of the finite values (NaN when there are none)."""
    finite = values[values.isfinite()]
    return float(finite.mean()) if finite.numel() else float("nan")


def _diversity_sums(features: torch.Tensor, n_prompts: int) -> torch.Tensor:
    """Per prompt, the sum of the pairwise feature distances among its samples."""
    per_prompt = features.reshape(n_prompts, -1, features.shape[-1])
    return torch.cdist(per_prompt, per_prompt).sum(dim=(1, 2)).cpu()


def _diversity(sums: list[torch.Tensor], n_seeds: int) -> float:
    """Mean pairwise feature distance among each prompt's samples, averaged over prompts."""
    if n_seeds < 2:
        return float("nan")
    return float(torch.cat(sums).mean() / (n_seeds * (n_seeds - 1)))


def _group_means(ranker: Any, records: Sequence[PromptRecord], base: torch.Tensor,
                 now: torch.Tensor) -> Iterator[tuple[str, float, float]]:
    """``(group, base mean, current mean)`` of each group ``ranker.groups(record)`` names, sorted."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        for group in ranker.groups(record):
            groups.setdefault(group, []).append(i)
    for group, members in sorted(groups.items()):
        index = torch.tensor(members)
        yield group, _finite_mean(base[index].double()), _finite_mean(now[index].double())


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """The global RNGs (Python, NumPy, torch CPU and CUDA) as they were before, afterwards: evaluation,
    and the rankers it builds, never shift what training draws."""
    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _release_memory(collect: bool) -> None:
    """Free what evaluation held: collect released components (``collect``) and return cached CUDA blocks."""
    if collect:
        gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _plot(points: Sequence[tuple[float, float]], path: Path, title: str, size: tuple[int, int] = (480, 300)) -> None:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 50, 30, size[0] - 20, size[1] - 30
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)
        coords = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
                  for x, y in points]
        if len(coords) > 1:
            draw.line(coords, fill=(30, 90, 200), width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(30, 90, 200))
        draw.text((4, top), f"{y1:.3f}", fill="black")
        draw.text((4, bottom - 10), f"{y0:.3f}", fill="black")
        draw.text((left, bottom + 6), f"step {x0:g}", fill="black")
        draw.text((right - 60, bottom + 6), f"step {x1:g}", fill="black")
    image.save(path)
