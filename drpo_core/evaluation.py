"""Held-out evaluation: fixed prompts and seeds, base versus current generator.

Reports each ranker's mean score (per group too, when a ranker defines ``groups(record)``), the
diversity among a prompt's samples and the distance to the base generator (reward-hacking
signals), and writes an image grid (base row above current row, pass/fail borders for binary
rankers) and the reward curve as PNGs in the run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.table import Table

from drpo_core.jsonl import read_jsonl
from drpo_core.noise import sample_noise

if TYPE_CHECKING:
    from drpo_core.trainer import Trainer

EVAL_BATCH = 64


class Evaluator:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg.eval
        self.base: dict[str, Any] | None = None
        self.best, self.evals_without_gain = -float("inf"), 0

    def _noise(self) -> torch.Tensor:
        shape = self.trainer.generator.noise_shape
        return torch.stack([sample_noise(shape, i, seed)
                            for i in range(len(self.trainer.eval_prompts)) for seed in self.cfg.seeds])

    def _generate(self, reference: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and images of every (held-out prompt, seed), in batches, without grad."""
        t = self.trainer
        prompts = [r.text for r in t.eval_prompts for _ in self.cfg.seeds]
        noise, latents, images = self._noise(), [], []
        t.generator.train(False)
        with torch.no_grad(), t.accelerator.autocast():
            for start in range(0, len(prompts), EVAL_BATCH):
                batch_noise = noise[start:start + EVAL_BATCH].to(t.device)
                sample = t.generator.reference if reference else t.generator.sample
                x = sample(prompts[start:start + EVAL_BATCH], batch_noise).float()
                latents.append(x.cpu())
                images.append(t.generator.decode(x).float().clamp(0, 1).cpu())
        t.generator.train(True)
        return torch.cat(latents), torch.cat(images)

    def _measure(self, latents: torch.Tensor, images: torch.Tensor) -> dict[str, Any]:
        t = self.trainer
        records = [r for r in t.eval_prompts for _ in self.cfg.seeds]
        out: dict[str, Any] = {}
        for name, ranker, _ in [*t.rankers, *t.eval_rankers]:
            scores = torch.cat([
                torch.as_tensor(ranker.score(images[s:s + EVAL_BATCH], [r.text for r in records[s:s + EVAL_BATCH]],
                                             [r.metadata for r in records[s:s + EVAL_BATCH]]), dtype=torch.float32)
                for s in range(0, len(records), EVAL_BATCH)
            ])
            out[f"score/{name}"] = float(scores.mean())
            out[f"scores/{name}"] = scores
            if hasattr(ranker, "groups"):
                groups: dict[str, list[float]] = {}
                for record, value in zip(records, scores.tolist(), strict=True):
                    for group in ranker.groups(record):
                        groups.setdefault(group, []).append(value)
                out.update({f"score/{name}/{g}": float(np.mean(v)) for g, v in sorted(groups.items())})
        out["features"] = self._pooled_features(latents)
        out["diversity"] = self._diversity(out["features"])
        return out

    def _pooled_features(self, latents: torch.Tensor) -> torch.Tensor:
        """One flat feature vector per sample: every key's particles, concatenated."""
        t = self.trainer
        chunks = []
        with torch.no_grad():
            for start in range(0, len(latents), EVAL_BATCH):
                rows = [r.text for r in t.eval_prompts for _ in self.cfg.seeds][start:start + EVAL_BATCH]
                feats = t.featurise(latents[start:start + EVAL_BATCH].to(t.device), rows)
                chunks.append(torch.cat([v.flatten(1) for _, v in sorted(feats.items())], dim=1).cpu())
        return torch.cat(chunks)

    def _diversity(self, features: torch.Tensor) -> float:
        """Mean pairwise feature distance among each prompt's samples, averaged over prompts."""
        per_prompt = features.reshape(len(self.trainer.eval_prompts), len(self.cfg.seeds), -1)
        if per_prompt.shape[1] < 2:
            return float("nan")
        d = torch.cdist(per_prompt, per_prompt)
        n = per_prompt.shape[1]
        return float(d.sum(dim=(1, 2)).mean() / (n * (n - 1)))

    def run(self, step: int, log: Callable[[dict[str, Any]], object], final: bool = False) -> Any:
        t = self.trainer
        if not t.eval_prompts:
            return None
        if self.base is None:
            base_latents, base_images = self._generate(reference=True)
            self.base = {"images": base_images, **self._measure(base_latents, base_images)}
        latents, images = self._generate(reference=False)
        now = self._measure(latents, images)
        record: dict[str, Any] = {"step": step, "samples": len(images)}
        for key, value in now.items():
            if key.startswith("score/"):
                record[key] = value
                record[f"base_{key}"] = self.base[key]
        record["diversity"] = now["diversity"]
        record["diversity_ratio"] = now["diversity"] / max(self.base["diversity"], 1e-12)
        record["pixel_rms_to_base"] = float((images - self.base["images"]).pow(2).mean().sqrt())
        record["feature_distance_to_base"] = float((now["features"] - self.base["features"]).norm(dim=1).mean())
        log(record)
        self._grid(step, images, now)
        primary = record[f"score/{t.rankers[0][0]}"]
        if final:
            self._curve()
            self._table(record)
            return {k: v for k, v in record.items() if not k.startswith("scores/")}
        if self.cfg.early_stopping_patience and step > 0:
            if primary > self.best:
                self.best, self.evals_without_gain = primary, 0
            else:
                self.evals_without_gain += 1
                if self.evals_without_gain >= self.cfg.early_stopping_patience:
                    t.console.print(f"early stopping at step {step}: no held-out gain in "
                                    f"{self.evals_without_gain} evaluations")
                    return "stop"
        return None

    def _grid(self, step: int, images: torch.Tensor, now: dict[str, Any]) -> None:
        """Base row above current row per prompt, same seeds; green/red borders for binary rankers."""
        t = self.trainer
        n_prompts, n_seeds = min(self.cfg.grid_prompts, len(t.eval_prompts)), min(len(self.cfg.seeds), 8)
        if n_prompts == 0 or self.base is None:
            return
        name, ranker, _ = t.rankers[0]
        binary = getattr(ranker, "binary", False)
        h, w = images.shape[-2:]
        pad = max(2, h // 16)
        canvas = Image.new("RGB", (n_seeds * (w + 2 * pad), 2 * n_prompts * (h + 2 * pad)), "white")
        for p in range(n_prompts):
            for row, (source, scores) in enumerate([(self.base["images"], self.base[f"scores/{name}"]),
                                                    (images, now[f"scores/{name}"])]):
                for s in range(n_seeds):
                    i = p * len(self.cfg.seeds) + s
                    tile = Image.fromarray((source[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                    x, y = s * (w + 2 * pad), (2 * p + row) * (h + 2 * pad)
                    if binary:
                        colour = (40, 170, 60) if scores[i] >= 0.5 else (210, 40, 40)
                        ImageDraw.Draw(canvas).rectangle([x, y, x + w + 2 * pad - 1, y + h + 2 * pad - 1], fill=colour)
                    canvas.paste(tile, (x + pad, y + pad))
        scale = max(1, 96 // h)
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
        canvas.save(t.run_dir / f"grid-step{step:06d}.png")

    def _curve(self) -> None:
        """The held-out score of the first ranker against the step, as a small PNG."""
        t = self.trainer
        key = f"score/{t.rankers[0][0]}"
        records = read_jsonl(t.run_dir / "eval.jsonl", what="evaluation log", skip_torn=True)
        points = [(r["step"], r[key]) for _, r in records if key in r]
        _plot(points, t.run_dir / "reward-curve.png", f"held-out {t.rankers[0][0]}")

    def _table(self, record: dict[str, Any]) -> None:
        table = Table("held-out metric", "base", "finetuned", "change", title=f"evaluation ({record['samples']} samples)")
        for key, value in record.items():
            if key.startswith("score/"):
                base = record[f"base_{key}"]
                table.add_row(key.removeprefix("score/"), f"{base:.4f}", f"{value:.4f}", f"{value - base:+.4f}")
        table.add_row("diversity (ratio to base)", "1.0000", f"{record['diversity_ratio']:.4f}", "")
        table.add_row("pixel RMS to base", "0", f"{record['pixel_rms_to_base']:.4f}", "")
        table.add_row("feature distance to base", "0", f"{record['feature_distance_to_base']:.4f}", "")
        self.trainer.console.print(table)


def _plot(points: list[tuple[float, float]], path: Path, title: str, size: tuple[int, int] = (480, 300)) -> None:
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
