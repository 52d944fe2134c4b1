"""The DrPO training loop, top to bottom.

One optimizer step = ``grad_accum`` micro-batches of ``prompts_per_step`` prompts. Per prompt:

1. K noises from CPU generators keyed by (run seed, global prompt index, candidate);
2. the K candidates (no grad) and the frozen reference on the same noises (no grad);
3. decode without grad, rank, select anchors (the drift source);
4. features of candidates, anchors and reference, then the detached drift targets;
5. the generator and features again *with* grad, in chunks of ``candidate_chunk`` candidates
   (the target is detached and the loss separates per candidate, so chunks add up exactly),
   regression onto the targets, backward into the generator's trainable parameters only.
   With ``train.single_pass`` step 2 samples with grad and step 5 reuses that graph (small generators).

Library use::

    from drpo_core.config import resolve_config
    from drpo_core.trainer import Trainer
    summary = Trainer(resolve_config("recipe.yaml")).train()
"""

from __future__ import annotations

import math
import shutil
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

from drpo_core import checkpoint as ckpt
from drpo_core.checkpoint import assign_parameters, split_trainable
from drpo_core.config import RankerConfig, ResolvedConfig, resolve_path
from drpo_core.context import BuildContext
from drpo_core.drift import DriftEstimator
from drpo_core.errors import ComponentError, ConfigError, DrpoError, first_line, reason
from drpo_core.evaluation import EvaluationError, Evaluator
from drpo_core.interfaces import FeatureContext
from drpo_core.interrupts import StopSignals
from drpo_core.jsonl import strict_line
from drpo_core.metrics import MetricsLog, StepTimer, read_metrics
from drpo_core.noise import make_noise
from drpo_core.preflight import check_run
from drpo_core.prompts import PromptRecord, PromptStream
from drpo_core.ranking import rank_candidates
from drpo_core.registry import Registry, get_registry
from drpo_core.runs import check_new_run_dir, finish_run_info, finished_a_step, write_run_info
from drpo_core.sources import (
    DataSampler,
    DataSource,
    DriftSource,
    ImageFolderSampler,
    InvalidScores,
    OfflineSource,
    OnlineSource,
    check_scores,
    summarise_skips,
)
from drpo_core.tracking import Trackers
from drpo_core.worker import WorkerLost, build_ranker


@dataclass
class _Batch:
    """One micro-batch's candidates, handed to the drift source (see ``sources.Candidates``)."""

    trainer: Trainer
    records: list[PromptRecord]
    indices: list[int]
    noise: torch.Tensor  # (B*K, ...)
    latents: torch.Tensor  # (B*K, ...) detached
    features: dict[str, torch.Tensor]
    step: int

    def score(self, latents: torch.Tensor, records: Sequence[PromptRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.score(latents, records)

    def rollout(self, prompts: list[int], round_index: int) -> torch.Tensor:
        """Round ``round_index``'s K extra candidates of each prompt in ``prompts`` (batch positions)."""
        k, shape, seed = self.trainer.k, self.trainer.generator.noise_shape, self.trainer.cfg.seed
        candidates = range(round_index * k, (round_index + 1) * k)
        noise = torch.cat([make_noise(shape, seed, self.indices[b], candidates) for b in prompts])
        with torch.no_grad(), self.trainer.accelerator.autocast():
            return self.trainer.generator.sample([self.records[b].text for b in prompts for _ in range(k)],
                                                 noise.to(self.trainer.device)).float()

    def featurise(self, latents: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.trainer.featurise(latents, prompts)


class Trainer:
    trackers = Trackers()  # log.trackers: none until train() opens them

    def __init__(self, resolved: ResolvedConfig, *, registry: Registry | None = None,
                 command_line: Sequence[str] | None = None, console: Console | None = None,
                 data_sampler: DataSampler | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.resolved, self.cfg = resolved, resolved.config
        # the device, the output folder and the prompt files, before anything is loaded
        self._inputs = check_run(resolved, new_run=False)
        self.registry = registry or get_registry()
        self.command_line = list(command_line or [])
        self.console = console or Console()
        self.run_dir = Path(self.cfg.output_dir)
        train = self.cfg.train
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision, cpu=train.device == "cpu", project_dir=str(self.run_dir),
        )  # log.trackers are drpo_core.tracking's, opened by train()
        self.device = self.accelerator.device if train.device in ("auto", "cpu") else torch.device(train.device)
        self.k = self.cfg.selection.candidates
        self._shuffle_rng = torch.Generator().manual_seed(self.cfg.seed)  # selection.shuffle_scores only
        self._last_failure = ""  # the latest failed prompt's reason, for the stop message
        self._failures: Counter[str] = Counter()  # this micro-batch's failed prompts by reason (score())
        self._step = 0  # completed steps, for the messages of a stopped run
        # every random draw a component makes while it is built (LoRA's initial A matrices, say) follows the run seed
        set_seed(self.cfg.seed)
        self._build_components()
        self._build_prompts()
        self._check_features()
        self.source = self._build_source(data_sampler)

    # -- setup -----------------------------------------------------------------------------

    def _build_components(self) -> None:
        cfg, options = self.cfg, self.resolved.options
        context = BuildContext(device=str(self.device), mixed_precision=cfg.train.mixed_precision,
                               seed=cfg.seed, config_dir=self.resolved.config_dir)

        def build(kind: str, reference: str, where: str) -> Any:  # options were validated by resolve_config
            return self.registry.build(kind, reference, options.get(where, {}), context, where)

        self.generator = build("generator", cfg.generator.name, "generator")
        if cfg.train.gradient_checkpointing:
            self.generator.enable_gradient_checkpointing()
        self.features = build("feature", cfg.features.name, "features").to(self.device)
        self._context = context  # the secondary rankers (eval.rankers) are built by each evaluation
        self.rankers = [(r.name, self._build_ranker(r, f"rankers.{i}"), r.weight) for i, r in enumerate(cfg.rankers)]
        kernel = build("kernel", cfg.kernel.name, "kernel")
        drift = cfg.drift
        self.estimator = DriftEstimator(
            kernel, radii=tuple(drift.radii), positive_weight=drift.positive_weight,
            negative_weight=drift.negative_weight, ref_lambda=drift.ref_lambda,
            ref_positive_weight=drift.ref_positive_weight, ref_negative_weight=drift.ref_negative_weight,
            ref_radii=tuple(drift.ref_radii) if drift.ref_radii else None, aggregation=drift.aggregation,
            key_weights=drift.key_weights,
        )
        self.binary = self.rankers[0][1].binary  # one kind for all: checked by resolve_config
        params = self.generator.trainable_parameters()
        if not params:
            raise DrpoError(f"generator {cfg.generator.name!r} has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=cfg.train.betas,
                                      weight_decay=cfg.train.weight_decay, eps=cfg.train.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)
        self.ema = [p.detach().clone() for p in params] if cfg.train.ema_decay else None

    def _build_ranker(self, section: RankerConfig, where: str) -> Any:
        """A ranker in this process; with ``timeout`` set, in a worker process that is ended when a call
        passes it (drpo_core/worker.py)."""
        return build_ranker(self.registry, section.name, self.resolved.options.get(where, {}), self._context,
                            where=where, timeout=section.timeout)

    def _build_eval_rankers(self) -> list[tuple[str, Any]]:
        return [(r.name, self._build_ranker(r, f"eval.rankers.{i}")) for i, r in enumerate(self.cfg.eval.rankers)]

    def _build_source(self, data_sampler: DataSampler | None) -> DriftSource:
        cfg = self.cfg
        height, width = self._probe_image().shape[-2:]
        image_size = (height, width)
        if cfg.source.kind == "offline":
            return OfflineSource(self._pairs, self.generator.encode, image_size)
        if cfg.source.kind == "data":
            if data_sampler is None:
                if not cfg.source.path:
                    raise DrpoError("source.path is required when source.kind is data (a JSONL of images)")
                data_sampler = ImageFolderSampler(self._path(cfg.source.path), image_size)
            return DataSource(data_sampler, self.generator.encode, cfg.selection.positives, cfg.seed)
        return OnlineSource(binary=self.binary, positives=cfg.selection.positives,
                            negatives=cfg.selection.negatives, rollout_rounds=cfg.selection.rollout_rounds,
                            seed=cfg.seed, fresh_anchors=cfg.selection.fresh_anchors,
                            positive_memory=cfg.selection.positive_memory)

    def _probe_image(self) -> torch.Tensor:
        """One base image, to learn the size data images are brought to."""
        noise = make_noise(self.generator.noise_shape, 0, 0, range(1)).to(self.device)
        with torch.no_grad():
            return self.generator.decode(self.generator.reference([self.train_prompts[0].text], noise))

    def _path(self, path: str) -> Path:
        return resolve_path(path, self.resolved.config_dir)

    def _build_prompts(self) -> None:
        inputs = self._inputs  # read by drpo_core.preflight, as `drpo config validate` reads them
        self._pairs, self.train_prompts, self.eval_prompts = inputs.pairs, inputs.train, inputs.eval
        self._eval_file_size = inputs.eval_file_size
        # a prompt the generator cannot take fails now, not in the first evaluation after the run has begun
        self.generator.check_prompts(list(dict.fromkeys(r.text for r in [*self.train_prompts, *self.eval_prompts])))
        self.stream = PromptStream(self.train_prompts, seed=self.cfg.seed, shuffle=self.cfg.prompts.shuffle)

    def _check_features(self) -> None:
        """The feature space on one probe sample: it must give keys, and each ``drift.key_weights`` prefix
        must match one of them (a misspelt prefix would otherwise weigh nothing, silently)."""
        prompts = [self.train_prompts[0].text]
        noise = make_noise(self.generator.noise_shape, 0, 0, range(1)).to(self.device)
        with torch.no_grad():
            with self.accelerator.autocast():
                latents = self.generator.reference(prompts, noise).float()
            try:
                keys = list(self.featurise(latents, prompts, noise))
            except _Failure as failure:
                raise ComponentError(f"features {self.cfg.features.name!r} on a probe sample: {failure}") from None
        if not keys:
            raise ComponentError(f"features {self.cfg.features.name!r} gave no feature keys on a probe sample: "
                                 "check its options")
        unmatched = [prefix for prefix in self.cfg.drift.key_weights if not any(k.startswith(prefix) for k in keys)]
        if unmatched:
            origin = self.resolved.origins.get("drift.key_weights") or self.resolved.origins.get(
                f"drift.key_weights.{unmatched[0]}", "default")
            where = "drift.key_weights" if origin == "default" else f"{origin}: drift.key_weights"
            raise ConfigError(f"{where}: {', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} "
                              f"no feature key of {self.cfg.features.name!r} (its keys: {_key_summary(keys)})")

    def _lr_factor(self, step: int) -> float:
        train = self.cfg.train
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "cosine":
            progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    def plan(self) -> list[str]:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.generator.trainable_parameters())
        rankers = ", ".join(f"{name} (weight {w:g})" for name, _, w in self.rankers)
        return [
            f"generator  {cfg.generator.name}: {type(self.generator).__name__}, {n_params:,} trainable parameters",
            f"rankers    {rankers}",
            f"features   {cfg.features.name}: {type(self.features).__name__} (input: {self.features.input})",
            f"kernel     {cfg.kernel.name}, radii {cfg.drift.radii}, lambda {cfg.drift.ref_lambda}",
            f"source     {cfg.source.kind}, K={self.k}, M+={cfg.selection.positives}, M-={cfg.selection.negatives}"
            + (f", memory {cfg.selection.positive_memory}" if cfg.selection.positive_memory else ""),
            f"prompts    {len(self.train_prompts)} train, {len(self.eval_prompts)} held out" + self._subset_note(),
            f"train      {cfg.train.steps} steps x {cfg.train.prompts_per_step} prompts x {cfg.train.grad_accum} "
            f"accumulation, lr {cfg.train.lr:g}, device {self.device}, precision {cfg.train.mixed_precision}"
            + (", single pass" if cfg.train.single_pass else ""),
            f"output     {self.run_dir}",
        ]

    _eval_file_size: int | None = None  # distinct prompts of prompts.eval_path

    def _subset_note(self) -> str:
        held_out = len({r.text for r in self.eval_prompts})
        if self._eval_file_size is None or held_out == self._eval_file_size:
            return ""
        return f" (a subset of the {self._eval_file_size} of eval_path; prompts.eval_count=all for every one)"

    # -- one micro-batch ---------------------------------------------------------------------

    def featurise(self, latents: torch.Tensor, prompts: Sequence[str],
                  noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Features of latents (decoding first when the feature space takes images); ``prompts`` and
        ``noise`` (None where unknown) are the rows' own."""
        with self.accelerator.autocast():
            x = self.generator.decode(latents) if self.features.input == "images" else latents
            features = self.features.features(x, FeatureContext(prompts, noise, self.generator))
        for key, value in features.items():
            if not torch.isfinite(value).all():
                raise _Failure(f"features {key!r} are not finite")
        return {key: value.float() for key, value in features.items()}

    def score(self, latents: torch.Tensor, records: Sequence[PromptRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined scores (B, K) of K candidates per record, and which prompts scored cleanly."""
        k = latents.shape[0] // len(records)
        prompts = [r.text for r in records for _ in range(k)]
        metadata = [r.metadata for r in records for _ in range(k)]
        with torch.no_grad():
            images = self.generator.decode(latents).float().clamp(0, 1)
        per_ranker = []
        unexplained = torch.ones(len(records), dtype=torch.bool)  # prompts not yet counted as failed
        for name, ranker, _ in self.rankers:
            try:
                with torch.no_grad():  # a ranker is a black box, never part of the graph
                    raw = ranker.score(images, prompts, metadata)
                scores = check_scores(raw, len(prompts), name).reshape(len(records), k)
            except InvalidScores as error:  # None, text, ...: this batch went wrong, as when it raises
                raise _Failure(str(error)) from None
            except (ComponentError, DrpoError):  # a wrong count, a lost worker: stop
                raise
            except Exception as error:
                raise _Failure(f"ranker {name!r} raised {type(error).__name__}: {first_line(error)}") from error
            failed = ~scores.isfinite().all(dim=1) & unexplained  # each failed prompt counted once
            if failed.any():
                self._last_failure = f"ranker {name!r} returned non-finite scores"
                self._failures[self._last_failure] += int(failed.sum())
                unexplained &= ~failed
            per_ranker.append(scores)
        shuffle = self._shuffle_rng if self.cfg.selection.shuffle_scores else None
        return rank_candidates(per_ranker, [w for _, _, w in self.rankers], method=self.cfg.selection.combine,
                               binary=self.binary, shuffle=shuffle)

    def micro_step(self, step: int, batch: list[tuple[int, PromptRecord]], scale: float) -> dict[str, Any]:
        """Anchors, targets and backward for one micro-batch; returns its metrics."""
        indices, records = [i for i, _ in batch], [r for _, r in batch]
        k, gen, timer = self.k, self.generator, self.timer
        self._failures = Counter()  # reason -> prompts, noted by score()
        prompts = [r.text for r in records for _ in range(k)]
        noise = torch.cat([make_noise(gen.noise_shape, self.cfg.seed, i, range(k)) for i in indices]).to(self.device)
        # single pass: keep the graph from here to the loss instead of sampling again with grad (step 5)
        live = self.cfg.train.single_pass
        with timer("sample"), torch.set_grad_enabled(live), self.accelerator.autocast():
            sampled = gen.sample(prompts, noise).float()
        with timer("features"), torch.set_grad_enabled(live):
            live_features = self.featurise(sampled, prompts, noise)
        latents, features = sampled.detach(), {key: v.detach() for key, v in live_features.items()}
        candidates = _Batch(self, records, indices, noise, latents, features, step)
        with timer("rank"):
            anchors = self.source.anchors(candidates, k)
        keep = anchors.keep
        out: dict[str, Any] = {**summarise_skips(anchors.skips), **anchors.stats, "prompts": len(records)}
        if self._failures:
            out.update(failure=self._last_failure, failures=dict(self._failures))
        if not keep.any():
            self._zero_backward()
            return out
        kept_prompts = [r.text for r, kept in zip(records, keep.tolist(), strict=True) if kept]
        kept_noise = noise.reshape(len(records), k, *noise.shape[1:])[keep]
        ref_features = self._reference_features(kept_prompts, kept_noise) if self.estimator.ref_lambda > 0 else None
        with timer("drift"):
            targets = self.estimator.targets(
                {key: v.reshape(len(records), -1, v.shape[-1])[keep] for key, v in features.items()},
                {key: v[keep] for key, v in anchors.positives.items()},
                {key: v[keep] for key, v in anchors.negatives.items()},
                None if ref_features is None else
                {key: v.reshape(len(kept_prompts), -1, v.shape[-1]) for key, v in ref_features.items()},
            )
        out.update(targets.stats)
        per_candidate = {key: v.shape[1] for key, v in features.items()}
        chunk = k if live else self.cfg.train.candidate_chunk or k
        losses = {"pref": 0.0, "ref": 0.0}
        for start in range(0, k, chunk):
            stop = min(k, start + chunk)
            with timer("backward"):  # the generator again with grad (unless single pass), the backward pass
                with self.accelerator.autocast():
                    if live:
                        feats = {key: v.reshape(len(records), -1, v.shape[-1])[keep]
                                 for key, v in live_features.items()}
                    else:
                        chunk_prompts = [p for p in kept_prompts for _ in range(stop - start)]
                        chunk_noise = kept_noise[:, start:stop].reshape(-1, *noise.shape[1:])
                        x = gen.sample(chunk_prompts, chunk_noise)
                        x = gen.decode(x) if self.features.input == "images" else x
                        context = FeatureContext(chunk_prompts, chunk_noise, gen)
                        feats = {key: v.float().reshape(len(kept_prompts), -1, v.shape[-1])
                                 for key, v in self.features.features(x, context).items()}
                    loss = self.estimator.loss(feats, targets, start, stop, per_candidate)
                # the mean over kept prompts, and over micro-batches through ``scale``
                self.accelerator.backward(loss["total"].sum() / len(records) * scale)
            losses["pref"] += float(loss["pref"].detach().sum() / len(kept_prompts))
            if loss["ref"] is not None:
                losses["ref"] += float(loss["ref"].detach().sum() / len(kept_prompts))
        out.update(loss_pref=losses["pref"], loss_ref=losses["ref"])
        return out

    def _reference_features(self, prompts: list[str], noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of the frozen base's samples on the kept prompts' noise (B, K, ...): after the ranking,
        so that prompts the source skipped cost no reference pass."""
        rows = [p for p in prompts for _ in range(noise.shape[1])]
        with self.timer("reference"), torch.no_grad(), self.accelerator.autocast():
            reference = self.generator.reference(rows, noise.flatten(0, 1)).float()
        with self.timer("features"), torch.no_grad():
            return self.featurise(reference, rows, noise.flatten(0, 1))

    def _zero_backward(self) -> None:
        """Nothing to train in this micro-batch: a zero backward keeps DDP ranks in step."""
        zero = sum(p.sum() * 0.0 for p in self.generator.trainable_parameters())
        self.accelerator.backward(zero)

    # -- the run -----------------------------------------------------------------------------

    def train(self, resume: str | None = None) -> dict[str, Any]:
        """Run (or with ``resume``, continue) the training. A new run that fails before it finishes a step
        removes the files it wrote, so the same ``--output-dir`` takes the next try; what was there stays."""
        if resume:
            return self._train(resume)
        check_new_run_dir(self.run_dir)
        before = set(self.run_dir.iterdir()) if self.run_dir.is_dir() else None
        try:
            return self._train(None)
        except BaseException:
            self._remove_unfinished_start(before)
            raise

    def _remove_unfinished_start(self, before: set[Path] | None) -> None:
        """Remove what a new run wrote (``before``: what its folder held, None: no folder), unless it finished a
        step: then its metrics.jsonl says what happened (why prompts failed) and a checkpoint may resume it."""
        if not self.accelerator.is_main_process or not self.run_dir.is_dir():
            return
        if (self.run_dir / ckpt.CHECKPOINTS_DIR).exists() or finished_a_step(self.run_dir):
            return
        written = sorted(set(self.run_dir.iterdir()) - (before or set()))
        for path in written:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if before is None and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()
        if written:
            self.console.print(f"removed the files this run wrote in {self.run_dir} (it failed before finishing a "
                               "step)", highlight=False)

    def _train(self, resume: str | None) -> dict[str, Any]:
        cfg = self.cfg
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DrpoError(f"cannot create output directory {self.run_dir}: {error.strerror or error}") from None
        start_step = self._resume(resume) if resume else 0
        # before the run's files: a tracker that cannot start (wandb without a login) leaves no run behind
        self.trackers = Trackers(cfg.log.trackers, self.run_dir, start_step=start_step, resumed=bool(resume),
                                 config=self.resolved.to_dict(), enabled=self.accelerator.is_main_process)
        self._write_run_info(resumed=bool(resume))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_lines=self._metrics_lines)
        self.skips = _Skips()
        for earlier in read_metrics(self.metrics.path) if resume else []:  # the run's skips before the resume
            self.skips.add(earlier)
        self.timer = StepTimer()
        self.evaluator = Evaluator(self.generator, self.featurise, [(n, r) for n, r, _ in self.rankers],
                                   self._build_eval_rankers, self.eval_prompts, cfg.eval, self.run_dir,
                                   self.console, self.accelerator.autocast)
        failures: deque[int] = deque(maxlen=cfg.train.failure_window)
        step = self._step = start_step
        # the first SIGINT/SIGTERM stops after the step (and checkpoints), the second at once (interrupts.py)
        try:  # the trackers flush what they hold, whatever ends the run (wandb marks its run finished)
            with StopSignals(self._abort_message) as signals:
                if start_step == 0:
                    self._evaluate(0)
                with self._progress() as progress:
                    task = progress.add_task("drpo", total=cfg.train.steps, completed=step, metrics="")
                    while step < cfg.train.steps and signals.requested is None:
                        start = self._step_start()
                        try:
                            record = self._train_step(step, failures)
                        except WorkerLost as error:  # a ranker passed its deadline: keep what was complete
                            path = self.save(step, start)
                            raise ComponentError(f"{error}; {self._saved(path, step)}") from None
                        step = self._step = step + 1
                        record["step"] = step
                        self.metrics.write(record)
                        self.trackers.log(record, "train")
                        self.skips.add(record)
                        progress.update(task, completed=step, metrics=_progress_text(record, self.skips))
                        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                            if self._evaluate(step) == "stop":
                                break
                        if step % cfg.checkpoint.every == 0:
                            self.save(step)
                path = self.save(step)
            if self.skips.total:
                self.console.print(self.skips.summary())
            if signals.requested is not None:
                self.console.print(f"stopped by {signals.requested} at step {step}; resume with "
                                   f"`drpo train --resume latest --output-dir {self.run_dir}`")
                self._finish_run_info(step, {})
                return {"step": step, "stopped": signals.requested}
            try:
                summary = self._evaluate(step, final=True)
            except Exception as error:  # the weights are saved: one line, and how to redo it
                self._finish_run_info(step, {})
                reason = str(error) if isinstance(error, DrpoError) else f"{type(error).__name__}: {first_line(error)}"
                raise DrpoError(f"the final evaluation failed: {reason}; the trained weights are saved "
                                f"({self._checkpoint_name(path)}): redo the evaluation with "
                                f"`drpo train --resume latest --output-dir {self.run_dir}`") from error
            self.accelerator.end_training()
            self._finish_run_info(step, summary or {})
            return {"step": step, **(summary or {})}
        finally:
            self.trackers.close()

    def _evaluate(self, step: int, final: bool = False) -> Any:
        """One evaluation (with the EMA weights). A ranker that fails it: before training, one line
        (nothing trained yet); in between, a warning and training goes on; a lost worker (a ranker past
        its deadline) stops the run with a checkpoint. The final one raises (``train`` reports it)."""
        try:
            with self.ema_weights():
                return self.evaluator.run(step, self._log_eval, final=final)
        except WorkerLost as error:
            if final or step == 0:
                raise
            raise ComponentError(f"{error}; {self._saved(self.save(step), step)}") from None
        except EvaluationError as error:
            if final:
                raise
            if step == 0:
                raise DrpoError(f"the evaluation before training failed: {error}; nothing was trained "
                                "(prompts.eval_count: 0 turns evaluation off)") from None
            self.console.print(f"the evaluation at step {step} failed: {error}; training goes on")
            return None

    def _train_step(self, step: int, failures: deque[int]) -> dict[str, Any]:
        cfg = self.cfg
        self.timer.start_step(sync=step % cfg.log.sync_timing_every == 0)
        record: dict[str, Any] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.train.grad_accum):
            batch = self.stream.next_batch(cfg.train.prompts_per_step)
            try:
                out = self.micro_step(step, batch, 1.0 / cfg.train.grad_accum)
            except _Failure as failure:
                self._zero_backward()
                self._last_failure = str(failure)
                out = {"skip_failure": len(batch), "prompts": len(batch), "failure": str(failure),
                       "failures": {str(failure): len(batch)}}
            _accumulate(record, out, cfg.train.grad_accum)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 loss scaling (CUDA)
        with self.timer("optimizer"):
            params = self.generator.trainable_parameters()
            grad_norm = float(self.accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm))
            problem = _update_problem(grad_norm, [group["lr"] for group in self.optimizer.param_groups],
                                      scaled=scaler is not None)
        if math.isfinite(grad_norm):
            record["grad_norm"] = grad_norm
        if problem is not None:  # the step is not applied: the prompts it would have trained on count as failed
            lost = max(0, record.get("prompts", 0) - sum(v for k, v in record.items() if k.startswith("skip_")))
            _accumulate(record, {"skip_failure": lost, "failure": problem, "failures": {problem: lost},
                                 "update": "skipped"}, 1)
            self._last_failure = problem
        failures.append(int(record.get("skip_failure", 0)))
        if sum(failures) > cfg.train.max_failures:
            raise ComponentError(
                f"{sum(failures)} prompts failed in the last {len(failures)} steps "
                f"(limit train.max_failures={cfg.train.max_failures}); last: {self._last_failure}; "
                f"{self._checkpoint_name(None)}"
            )
        record["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        with self.timer("optimizer"):
            if problem is None:
                self._apply_update(params, step, grad_norm)
                if getattr(self.optimizer, "step_was_skipped", False):  # the GradScaler found inf/NaN gradients
                    self._check_overflows(record, scaler, step)
                else:
                    self._overflows = 0
                    self._update_ema()
            self.scheduler.step()  # the schedule follows the step count, applied or not
        record["time"] = self.timer.split()
        return record

    _overflows = 0  # consecutive steps the fp16 GradScaler skipped

    def _check_overflows(self, record: dict[str, Any], scaler: Any, step: int) -> None:
        """fp16: overflowing gradients are how the GradScaler finds its scale; it skips such a step and lowers
        the scale, so they are not failed prompts. A whole ``train.failure_window`` of them is: stop."""
        self._overflows += 1
        scale = float(scaler.get_scale()) if scaler is not None else float("nan")
        record["update"] = f"skipped by the fp16 GradScaler (gradients not finite; loss scale now {scale:g})"
        if self._overflows >= self.cfg.train.failure_window:
            raise ComponentError(f"the gradients were not finite in the last {self._overflows} steps (train."
                                 f"failure_window) although the fp16 loss scale came down to {scale:g}; last "
                                 f"failure: {self._last_failure or 'none'}; {self._checkpoint_name(None)}")

    def _apply_update(self, params: Sequence[torch.Tensor], step: int, grad_norm: float) -> None:
        """The optimizer step, then the one case the checks before it do not cover (``_update_problem``): an
        overflow. One fused reduction over the weights, no copy: their total L2 norm is finite unless a weight
        is not (or the squares overflow, beyond ~1e19: then a per-tensor check decides). Weights that are lost
        cannot be restored without a snapshot, so the run stops here and they are never saved. (PyTorch's
        per-tensor AdamW raises instead when lr / (1 - beta1) itself overflows: the same stop.)"""
        def stop() -> str:
            return (f"step {step + 1} made the weights non-finite (an overflow: lr {self.optimizer.param_groups[0]['lr']:g}, "
                    f"gradient norm {grad_norm:.3g}); they were not saved: {self._checkpoint_name(None)}")

        try:
            self.optimizer.step()
        except RuntimeError as error:
            if "overflow" not in str(error):
                raise
            raise ComponentError(f"{stop()} ({first_line(error)})") from None
        with torch.no_grad():  # (the max-abs norm would be exact, but is 40x slower on CPUs)
            norm = float(torch.nn.utils.get_total_norm(params, norm_type=2.0, foreach=True))
            if not math.isfinite(norm) and not all(bool(torch.isfinite(p).all()) for p in params):
                raise ComponentError(stop())

    def _update_ema(self) -> None:
        decay = self.cfg.train.ema_decay
        if self.ema is None or decay is None:
            return
        with torch.no_grad():
            for shadow, param in zip(self.ema, self.generator.trainable_parameters(), strict=True):
                shadow.lerp_(param.detach(), 1 - decay)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones while inside, for evaluation (a no-op without EMA)."""
        if self.ema is None:
            yield
            return
        params = self.generator.trainable_parameters()
        trained = [p.detach().clone() for p in params]
        assign_parameters(params, self.ema)
        try:
            yield
        finally:
            assign_parameters(params, trained)

    def _step_start(self) -> _StepStart:
        """What a checkpoint of the completed steps needs that a step changes before it can fail: the prompt
        stream, the RNGs and the source's state (references; a source replaces its tensors, never edits them)."""
        return _StepStart(self.stream.state_dict(), ckpt.capture_rng_state(), self.source.checkpoint_state())

    def _checkpoint_name(self, path: Path | None) -> str:
        """``path`` (or the run's latest checkpoint) as the user reads it."""
        if path is None:
            try:
                path = ckpt.resolve_checkpoint(self.run_dir)
            except DrpoError:
                return "no checkpoint was written yet"
        return f"the last checkpoint is {path}"

    def _saved(self, path: Path | None, step: int) -> str:
        return (f"{self._checkpoint_name(path)} ({step} completed steps): resume with "
                f"`drpo train --resume latest --output-dir {self.run_dir}`")

    def _abort_message(self, name: str) -> str:
        """The one line of a second SIGINT/SIGTERM (``RunAborted``; the watchdog prints it too)."""
        return (f"aborted by a second {name} after {self._step} completed steps: the unfinished step was not "
                f"written; {self._checkpoint_name(None)}")

    def _progress(self) -> Progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"), console=self.console,
                        disable=not (self.cfg.log.progress and self.accelerator.is_local_main_process))

    def _log_eval(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "eval.jsonl").open("a") as handle:
            handle.write(strict_line(record))
        self.trackers.log(record, "eval")

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, step: int, start: _StepStart | None = None) -> Path | None:
        """Checkpoint ``step`` completed steps; ``start``: the state taken at the start of the next step, which
        failed part way (its prompts were drawn, its RNGs advanced; weights and optimizer are untouched)."""
        if not self.accelerator.is_main_process:  # one writer; every process holds the same weights
            return None
        trainable = dict(self.generator.trainable_state_dict())
        if self.ema is not None:
            trainable.update({f"ema.{i}": t for i, t in enumerate(self.ema)})
        source_tensors, source_values = self.source.checkpoint_state() if start is None else start.source
        trainable.update(source_tensors)
        prompts = self.stream.state_dict() if start is None else start.prompts
        state = {"step": step, "prompts": prompts, "metrics_lines": self.metrics.line_count, **source_values}
        return ckpt.save_checkpoint(
            self.run_dir, step, trainable=trainable, optimizer_state=self.optimizer.state_dict(),
            scheduler_state=self.scheduler.state_dict(), state=state, config_text=self.resolved.to_yaml(),
            keep_last=self.cfg.checkpoint.keep_last, rng_state=None if start is None else start.rng,
        )

    _metrics_lines: int | None = None

    def _resume(self, which: str) -> int:
        path = ckpt.resolve_checkpoint(self.run_dir if which == "latest" else which)
        loaded = ckpt.load_checkpoint(path)
        missing = [key for key in ("prompts", "metrics_lines") if key not in loaded.state]
        if missing:
            raise DrpoError(f"{path / 'state.json'}: missing {', '.join(map(repr, missing))} (a damaged checkpoint, "
                            "or not one `drpo train` wrote)")
        weights, ema, memory = split_trainable(loaded.trainable)
        if self.ema is not None:
            if len(ema) != len(self.ema):
                raise DrpoError(f"{path} holds {len(ema)} EMA tensors, this run keeps {len(self.ema)}: "
                                "resume with the train.ema_decay the run was started with")
            resized = [i for i, (saved, own) in enumerate(zip(ema, self.ema, strict=True)) if saved.shape != own.shape]
            if resized:
                i = resized[0]
                raise DrpoError(f"{path / 'trainable.safetensors'}: EMA tensor ema.{i} has shape "
                                f"{tuple(ema[i].shape)}, the parameter it averages {tuple(self.ema[i].shape)}")
            self.ema = [saved.to(own.device, own.dtype) for saved, own in zip(ema, self.ema, strict=True)]
        self.source.load_checkpoint_state({f"memory.{n}": t for n, t in enumerate(memory)}, loaded.state)
        try:
            self.generator.load_trainable_state_dict(weights)
        except DrpoError as error:
            raise DrpoError(f"{path / 'trainable.safetensors'}: {error}") from None
        for name, target, state in (("optimizer.pt", self.optimizer, loaded.optimizer_state),
                                    ("scheduler.pt", self.scheduler, loaded.scheduler_state)):
            try:
                target.load_state_dict(state)
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
                raise DrpoError(f"{path / name} does not fit this run's {name.split('.')[0]} ({reason(error)})"
                                ) from None
        self.stream.load_state_dict(loaded.state["prompts"])
        try:
            ckpt.restore_rng_state(loaded.rng)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
            raise DrpoError(f"{path / 'rng.pt'}: not a random-number state drpo wrote ({reason(error)})") from None
        self._metrics_lines = loaded.state["metrics_lines"]
        self.console.print(f"resumed from {path} at step {loaded.step}")
        return loaded.step

    def _write_run_info(self, resumed: bool) -> None:
        if self.accelerator.is_main_process:  # one writer
            write_run_info(self.run_dir, self.resolved, self.registry, self.command_line, str(self.device), resumed)

    def _finish_run_info(self, step: int, summary: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            finish_run_info(self.run_dir, step, summary)


class _Failure(Exception):
    """A prompt could not be used (non-finite scores or features, a ranker error)."""


@dataclass
class _StepStart:
    """The state a step changes before it can fail (``Trainer._step_start``)."""

    prompts: dict[str, Any]
    rng: dict[str, Any]
    source: tuple[dict[str, torch.Tensor], dict[str, Any]]


# The non-finite guard. Weights must never become NaN or infinite, and the guard must not copy them
# (full fine-tuning of an SDXL UNet holds 2.6e9 of them), so it checks what goes into the update
# rather than keeping a snapshot to roll back to:
# * before the update, for free: the total gradient norm that clip_grad_norm_ computes anyway (and
#   that the loop already reads back) is finite, and so is every learning rate. Then the step is
#   applied; otherwise it is skipped (the optimizer and the EMA untouched, the schedule advancing),
#   its prompts count as failed against train.max_failures, and metrics.jsonl says why.
# * with finite, clipped gradients and a finite lr, AdamW's update is finite except for an overflow:
#   |m / (sqrt(v) + eps)| <= max_grad_norm / eps, so only lr * max_grad_norm / eps near 3e38 (or
#   weights near it) overflows. That case cannot be undone without a snapshot, so after the update
#   one fused norm of the weights (one read of each, no copy; AdamW itself makes seven passes)
#   detects it and the run stops at once, never saving those weights.
# * fp16 loss scaling: the GradScaler skips overflowing steps itself and lowers its scale (only a step
#   through it does), so non-finite gradients go to it; a failure_window of such steps stops the run.
# * checkpoint.save_checkpoint refuses non-finite tensors in any case.
def _update_problem(grad_norm: float, lrs: Sequence[float], scaled: bool = False) -> str | None:
    """Why the update must not be applied (non-finite gradients or learning rate), or None. ``scaled``:
    fp16 loss scaling, whose GradScaler skips steps with non-finite gradients itself (and lowers its scale,
    which only a step through it does), so they go to the optimizer (``Trainer._check_overflows``)."""
    if not math.isfinite(grad_norm) and not scaled:
        return f"gradients are not finite (norm {grad_norm}): the update was skipped"
    if not all(math.isfinite(lr) for lr in lrs):
        return f"the learning rate is not finite ({lrs[0]}): the update was skipped"
    return None


class _Skips:
    """The run's skipped prompts by reason, and the failures by their text, from the step records."""

    def __init__(self) -> None:
        self.prompts = 0
        self.reasons: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def add(self, record: dict[str, Any]) -> None:
        self.prompts += int(record.get("prompts", 0))
        for key, value in record.items():
            if key.startswith("skip_") and value:
                self.reasons[key.removeprefix("skip_")] += int(value)
        self.failures.update(record.get("failures") or {})

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        """``skipped 12 of 80 prompts: 9 tied, 3 failure (ranker 'x' returned non-finite scores)``."""
        parts = []
        for kind, count in self.reasons.most_common():
            if kind == "failure" and self.failures:
                texts = self.failures.most_common()
                why = texts[0][0] if len(texts) == 1 else ", ".join(f"{n} {text}" for text, n in texts)
                parts.append(f"{count} failure ({why})")
            else:
                parts.append(f"{count} {kind}")
        return f"skipped {self.total} of {self.prompts} prompts: {', '.join(parts)}"


def _accumulate(record: dict[str, Any], out: dict[str, Any], n: int) -> None:
    for key, value in out.items():
        if key.startswith("skip_") or key == "prompts":
            record[key] = record.get(key, 0) + value
        elif key == "failures":  # reason -> failed prompts, over the micro-batches
            merged = Counter(record.get(key, {}))
            merged.update(value)
            record[key] = dict(merged)
        elif isinstance(value, float):
            record[key] = record.get(key, 0.0) + value / n
        else:
            record[key] = value


def _key_summary(keys: Sequence[str], limit: int = 16) -> str:
    """Feature keys for a message: a family of located keys (``patch8@0,0``, ...) as one ``patch8@*``."""
    names = list(dict.fromkeys(key.split("@")[0] + "@*" if "@" in key else key for key in keys))
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _progress_text(record: dict[str, Any], skips: _Skips | None = None) -> str:
    parts = [f"{key} {record[key]:.3g}" for key in ("loss_pref", "loss_ref", "score_mean", "accuracy")
             if isinstance(record.get(key), float)]
    if skips is not None and skips.total:
        parts.append(f"skipped {skips.total} ({', '.join(f'{n} {r}' for r, n in skips.reasons.most_common())})")
    return "  ".join(parts)
