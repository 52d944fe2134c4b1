"""Using a finished (or running) run: rebuild its generator with the trained weights, sample, score."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from drpo_core.checkpoint import (
    CHECKPOINTS_DIR,
    assign_parameters,
    load_checkpoint,
    resolve_checkpoint,
    split_trainable,
)
from drpo_core.config import ResolvedConfig, parse_assignment, read_yaml, resolve_config, set_dotted
from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError, DrpoError
from drpo_core.hub import check_models_offline
from drpo_core.jsonl import read_jsonl
from drpo_core.noise import protocol_noise
from drpo_core.prompts import PromptRecord
from drpo_core.registry import get_registry
from drpo_core.report import (
    DEFAULT_PROMPTS,
    PAPER_RANKERS,
    PAPER_SEEDS,
    Progress,
    Render,
    build_rankers,
    build_report,
    check_batch_size,
    check_rankers,
    checked_scores,
    eval_seeds,
    evaluate_generators,
    render,
    select_prompts,
    split_assignments,
)
from drpo_core.sources import load_image


def load_generator(run_dir: str | Path, checkpoint: str = "latest", device: str = "cpu") -> tuple[ResolvedConfig, Any]:
    """A run's config and its generator with the trained weights of ``checkpoint``.

    A run that kept an EMA (``train.ema_decay``) gives the EMA weights, the ones its evaluation used.
    """
    path = resolve_checkpoint(Path(run_dir), checkpoint)
    config = checkpoint_config(path)
    cfg = config.config
    context = BuildContext(device=device, mixed_precision=cfg.train.mixed_precision, seed=cfg.seed,
                           config_dir=config.config_dir)
    generator = get_registry().build("generator", cfg.generator.name, config.options["generator"], context,
                                     "generator")
    weights, ema, _ = split_trainable(load_checkpoint(path).trainable)
    generator.load_trainable_state_dict(weights)
    if ema:
        assign_parameters(generator.trainable_parameters(), ema)
    return config, generator


def checkpoint_config(path: Path) -> ResolvedConfig:
    """The resolved config a checkpoint directory was saved with."""
    saved = read_yaml(path / "config.yaml")
    if isinstance(saved.get("log"), dict):  # loading weights logs nothing: no tracker package needed here
        saved["log"]["trackers"] = []
    return resolve_config(base=saved, base_origin=str(path / "config.yaml"))


def base_generator(reference: str, assignments: list[str], device: str = "cpu") -> Any:
    """A generator built from its name and ``--set generator.KEY=VALUE`` options, untrained; on CUDA in fp16
    (the paper's sampling precision) unless ``--set generator.dtype=...`` says otherwise."""
    precision = "fp16" if device.startswith("cuda") else "no"
    return get_registry().build("generator", reference, generator_options(reference, assignments),
                                BuildContext(device=device, mixed_precision=precision), "generator")


def generator_options(reference: str, assignments: Sequence[str]) -> Any:
    """A base generator's options from ``--set generator.KEY=VALUE`` lines, validated by its plugin."""
    options: dict[str, Any] = {}
    for line in assignments:
        key, value = parse_assignment(line)
        if not key.startswith("generator."):
            raise ConfigError(f"--set {key}: without a run, only generator.* options apply")
        set_dotted(options, key.removeprefix("generator."), value)
    return get_registry().validate_options("generator", reference, options, "generator")


def evaluate_target(target: Path | None, *, generator: str | None, rankers: Sequence[str],
                    assignments: Sequence[str], prompts: str | None, limit: int | None, seeds: str | None,
                    device: str, batch_size: int, checkpoint: str = "latest", json_path: Path | None = None,
                    progress: Callable[[int], Progress] | None = None) -> dict[str, Any]:
    """``drpo eval``: the report (:func:`drpo_core.report.build_report`) of a run directory (its ``checkpoint``
    against its base), a base ``generator`` alone, or the images of a manifest (``target`` ending in ``.jsonl``).

    ``device`` is one this machine has (:func:`drpo_core.preflight.resolve_device` checks it). Every other input
    is checked before anything loads: the rankers (names and ``--set rankers.NAME.KEY=VALUE`` options; the
    paper's four when none is named), the prompts and seeds, the run's weights, where ``json_path`` goes.
    ``progress(total)`` returns a callback told how many (prompt, seed) pairs each batch finished."""
    check_batch_size(batch_size)
    names = list(rankers) or list(PAPER_RANKERS)
    generator_lines, ranker_lines = split_assignments(assignments, names)
    ranker_options = check_rankers(names, ranker_lines)
    if json_path is not None:
        check_out_dir(json_path.parent, "--json")
        if json_path.is_dir():
            raise DrpoError(f"--json {json_path} is a folder")
    context = BuildContext(device=device)
    # their options, for the offline check: every missing model named in one line, before any loads
    components = {f"rankers.{name}": (checked.options, name) for name, checked in zip(names, ranker_options,
                                                                                       strict=True)}
    if target is not None and target.suffix == ".jsonl":
        given = [flag for flag, value in (("--generator", generator or generator_lines), ("--prompts", prompts),
                                          ("--limit", limit), ("--seeds", seeds)) if value]
        if given:
            raise DrpoError(f"{target}: a manifest's images are made already; {', '.join(given)} do not apply")
        read_manifest(target)
        check_models_offline(components, Path.cwd())
        return evaluate_manifest(target, build_rankers(names, ranker_options, context), batch_size=batch_size,
                                 device=device)
    selection, seed_list = select_prompts(prompts or DEFAULT_PROMPTS, limit), eval_seeds(seeds or PAPER_SEEDS)
    if target is not None:
        check_run_alone(target, generator, generator_lines, "evaluate")
        check_run_weights(target, checkpoint)
        run_config = checkpoint_config(resolve_checkpoint(target, checkpoint))
        generator_entry = (run_config.options["generator"], run_config.config.generator.name)
    elif generator is not None:
        generator_entry = (generator_options(generator, generator_lines), generator)
    else:
        raise DrpoError("drpo eval: give a run directory, a manifest.jsonl or --generator NAME")
    check_models_offline({"generator": generator_entry, **components}, Path.cwd())
    model, sides = eval_sides(target, generator, generator_lines, checkpoint, device)
    model.check_prompts(list(dict.fromkeys(r.text for r in selection.records)))
    built = build_rankers(names, ranker_options, context)
    advance = progress(len(selection.records) * len(seed_list)) if progress is not None else None
    return evaluate_generators(sides, model, selection, seed_list, built, batch_size=batch_size, progress=advance)


def eval_sides(run_dir: Path | None, generator: str | None, generator_lines: list[str], checkpoint: str,
               device: str) -> tuple[Any, dict[str, tuple[str, Render]]]:
    """What ``drpo eval`` compares: a run's base and fine-tuned generator (one model: its frozen ``reference``
    and its trained ``sample``, on the same noise), or a base generator alone. Returns the model and
    ``{side: (label, render)}``. :func:`evaluate_target` has checked the inputs."""
    if run_dir is not None:
        resolved, model = load_generator(run_dir, checkpoint, device)
        step = resolve_checkpoint(run_dir, checkpoint).name
        return model, {"base": (_generator_label(resolved.config.generator.name, model), render(model, base=True)),
                       "finetuned": (f"{run_dir} ({step})", render(model, base=False))}
    assert generator is not None
    model = base_generator(generator, generator_lines, device)
    return model, {"base": (_generator_label(generator, model), render(model, base=True))}


def check_run_alone(run_dir: Path, generator: str | None, generator_lines: Sequence[str], verb: str) -> None:
    """A run rebuilds its own generator: ``--generator`` or ``--set generator.*`` beside it is refused in one line
    (``verb``: what the command does with another base model, "evaluate", "sample")."""
    if generator:
        raise DrpoError(f"{run_dir}: give a run directory or --generator, not both (the run names its generator)")
    if generator_lines:
        raise ConfigError(f"--set generator.*: a run's generator is rebuilt as it was trained; {verb} another "
                          "base model with --generator NAME --set generator.KEY=VALUE")


def _generator_label(name: str, model: Any) -> str:
    """``sd-turbo (stabilityai/sd-turbo)``: the generator and, when it says, the base model it loaded."""
    base = getattr(model, "base_model", "")
    return f"{name} ({base})" if base else name


def check_run_weights(run_dir: Path, checkpoint: str = "latest",
                      hint: str = "give a run directory, a manifest.jsonl or --generator") -> None:
    """``run_dir`` is a run with trained weights to load (``checkpoint`` of them): else one line saying what
    it lacks (``hint``: what the command accepts instead). Cheap: nothing is loaded."""
    if not run_dir.is_dir():
        raise DrpoError(f"{run_dir}: not a directory ({hint})")
    if not (run_dir / "config.yaml").is_file():
        raise DrpoError(f"{run_dir} holds no config.yaml: it is not a drpo run directory")
    steps = run_dir / CHECKPOINTS_DIR
    if not (run_dir / "state.json").is_file() and not (steps.is_dir() and any(steps.glob("step-*"))):
        raise DrpoError(f"{run_dir} holds no trained weights yet (no checkpoint in {steps})")
    resolve_checkpoint(run_dir, checkpoint)  # a step that is not there, an incomplete checkpoint: its own line


def sample_images(generator: Any, records: Sequence[PromptRecord], seeds: Sequence[int], out_dir: Path,
                  batch_size: int = 8, prompt_ids: Sequence[int] | None = None, force: bool = False) -> Path:
    """PNG files and a ``manifest.jsonl`` of ``{"prompt", "prompt_id", "seed", "file", "metadata"}`` rows.

    The noise of (prompt, seed) is :func:`drpo_core.noise.protocol_noise` of the prompt's position in its file,
    ``prompt_ids[i]`` (default: ``i``): the images ``drpo eval`` scores for the same prompt set and seeds.
    A folder that holds a sample already is refused unless ``force``: then that sample (the images its manifest
    lists, its ``scores.jsonl``) is removed first, so no stale image or score is left beside the new one.
    """
    ids = list(range(len(records))) if prompt_ids is None else list(prompt_ids)
    if len(ids) != len(records):
        raise ValueError(f"{len(ids)} prompt ids for {len(records)} prompts")
    generator.check_prompts(list(dict.fromkeys(record.text for record in records)))
    check_sample_out(out_dir, force)
    remove_sample(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, record, seed) for i, record in zip(ids, records, strict=True) for seed in seeds]
    rows = []
    generator.train(False)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        noise = torch.stack([protocol_noise(generator.noise_shape, i, s) for i, _, s in chunk]).to(generator.device)
        with torch.no_grad():
            images = generator.decode(generator.sample([r.text for _, r, _ in chunk], noise)).float().clamp(0, 1)
        for (i, record, seed), image in zip(chunk, images.cpu(), strict=True):
            name = f"p{i:05d}-s{seed}.png"
            pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(out_dir / name)
            rows.append({"prompt": record.text, "prompt_id": i, "seed": seed, "file": name,
                         "metadata": record.metadata})
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def score_manifest(manifest: Path, rankers: Sequence[tuple[str, Any]], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Each ranker's score of every image a manifest lists, in its order (float64, checked: one finite score
    per image); also written to ``scores.jsonl`` beside it. The images are read ``batch_size`` at a time."""
    rows = read_manifest(manifest)
    scores: dict[str, list[np.ndarray]] = {name: [] for name, _ in rankers}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = torch.stack([load_image(manifest.parent / row["file"]) for row in chunk])
        prompts, metadata = [r["prompt"] for r in chunk], [r.get("metadata") for r in chunk]
        for name, ranker in rankers:
            where = [f"{manifest.name}:{start + i + 1}" for i in range(len(chunk))]
            scores[name].append(checked_scores(name, ranker, images, prompts, metadata, where))
    found = {name: np.concatenate(values) if values else np.zeros(0) for name, values in scores.items()}
    with (manifest.parent / "scores.jsonl").open("w") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps({"file": row["file"], **{n: float(s[i]) for n, s in found.items()}}) + "\n")
    return found


def evaluate_manifest(manifest: Path, rankers: Sequence[Any], batch_size: int = 16, device: str = "cpu") -> dict[str, Any]:
    """The report of :func:`drpo_core.report.build_report` for the images a manifest lists (one side,
    ``images``): each ranker's mean and std in its units, per group too."""
    start = datetime.now(UTC)
    rows = read_manifest(manifest)
    scores = score_manifest(manifest, [(r.name, r.ranker) for r in rankers], batch_size)
    records = [PromptRecord(row["prompt"], row.get("metadata")) for row in rows]
    seeds = sorted({row["seed"] for row in rows if isinstance(row.get("seed"), int)})
    distinct = len(dict.fromkeys(r.text for r in records))  # prompts, as for a prompt set (images: rows)
    prompts = {"set": str(manifest), "path": str(manifest), "count": distinct, "total": distinct, "limit": None,
               "subset_seed": None}
    return build_report(prompts=prompts, seeds=seeds, sides={"images": str(manifest.parent)}, device=device,
                        records=records, rankers=rankers,
                        scores={"images": {name: values[:, None] for name, values in scores.items()}},
                        seconds=(datetime.now(UTC) - start).total_seconds())


def read_manifest(manifest: Path) -> list[dict[str, Any]]:
    """The rows of a sample manifest, each with a ``prompt`` and the ``file`` of an image that is there:
    else one line naming ``manifest:line``."""
    numbered = read_jsonl(manifest, required=("prompt", "file"), what="manifest")
    if not numbered:
        raise DrpoError(f"{manifest}: no images listed")
    for number, row in numbered:
        if not isinstance(row["file"], str) or not row["file"]:
            raise DrpoError(f'{manifest}:{number}: "file" must be a string naming an image, got {row["file"]!r}')
        if not (manifest.parent / row["file"]).is_file():
            raise DrpoError(f"{manifest}:{number}: image not found: {manifest.parent / row['file']}")
    return [row for _, row in numbered]


def check_out_dir(out_dir: Path, flag: str = "--out") -> None:
    """A folder for outputs: refused in one line when it (or a folder above it) is a file."""
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise DrpoError(f"{flag} {out_dir} is a file" if existing == out_dir else f"{flag} {out_dir}: {existing} is a file")


def check_sample_out(out_dir: Path, force: bool = False) -> None:
    """``drpo sample --out``: a folder (or one to create) that holds no sample yet, unless ``force``."""
    check_out_dir(out_dir)
    if not force and (out_dir / "manifest.jsonl").exists():
        raise DrpoError(f"--out {out_dir} already holds a sample (manifest.jsonl): choose another --out, or add "
                        "--force to replace it (its images and scores.jsonl)")


#: the names :func:`sample_images` gives its images; only these are removed when a sample is replaced
_SAMPLE_IMAGE = re.compile(r"p\d{5,}-s-?\d+\.png")


def remove_sample(out_dir: Path) -> None:
    """Remove the sample ``out_dir`` holds: the images its manifest lists (those named as ``drpo sample``
    names them, directly in the folder), ``scores.jsonl`` and the manifest. Anything else stays."""
    manifest = out_dir / "manifest.jsonl"
    if not manifest.is_file():
        return
    for line in manifest.read_text(errors="replace").splitlines():
        try:
            name = json.loads(line).get("file")
        except (ValueError, AttributeError):
            continue
        if isinstance(name, str) and _SAMPLE_IMAGE.fullmatch(name):
            (out_dir / name).unlink(missing_ok=True)
    (out_dir / "scores.jsonl").unlink(missing_ok=True)
    manifest.unlink()


#: settings ``--resume`` may change: a finished run continues for more steps
RESUME_EXTENSIONS = ("train.steps",)


def run_in(run_dir: Path) -> str | None:
    """What of a run ``run_dir`` already holds ("3 checkpoints, metrics.jsonl"), or None for a fresh folder."""
    found = [name for name in ("config.yaml", "run.json", "metrics.jsonl", "checkpoints") if (run_dir / name).exists()]
    return ", ".join(found) or None


def finished_a_step(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` logged a step (a line in ``metrics.jsonl``)."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def check_new_run_dir(run_dir: Path) -> None:
    """A fresh run must not write into another run's folder: refuse before writing anything. (A run that
    fails before it finishes a step removes its files: ``Trainer.train``.)"""
    if run_dir.exists() and not run_dir.is_dir():
        raise DrpoError(f"output directory {run_dir} is a file")
    held = run_in(run_dir) if run_dir.is_dir() else None
    if held and "checkpoints" not in held:  # stopped before its first checkpoint: nothing to resume
        raise DrpoError(f"{run_dir} already holds a run that wrote no checkpoint ({held}): there is nothing to "
                        "resume; if it is not running any more, delete those files, or choose another --output-dir")
    if held:
        raise DrpoError(f"{run_dir} already holds a run ({held}): continue it with `drpo train --resume latest "
                        f"--output-dir {run_dir}` (add --set train.steps=N to run longer), or choose another --output-dir")


def resume_config(resume: str, output_dir: str | None, assignments: list[str],
                  changes: dict[str, Any]) -> tuple[ResolvedConfig, str, list[str]]:
    """The saved config of the run ``resume`` names, and the checkpoint to resume from.

    ``resume`` is ``latest`` (with ``output_dir``), a run directory or a checkpoint directory. Flags that
    would change the run (``changes``: flag -> value) are refused; ``--set`` may only extend
    ``RESUME_EXTENSIONS``. Returns (config, checkpoint, notes for the user).
    """
    given = [flag for flag, value in changes.items() if value]
    if given:
        raise ConfigError(f"--resume continues a run as its config.yaml says; {', '.join(given)} would change it: "
                          "start a new run (another --output-dir) instead")
    run_dir, checkpoint = _locate(resume, output_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise DrpoError(f"{run_dir} holds no config.yaml: it is not a drpo run directory")
    base = read_yaml(saved)
    notes = []
    for line in assignments:
        key, value = parse_assignment(line)
        if key not in RESUME_EXTENSIONS:
            raise ConfigError(f"--set {key}: --resume accepts only --set train.steps=N (to run longer); other "
                              "changes belong to a new run")
        notes.append(f"extending the run: {key} {base.get('train', {}).get('steps')} -> {value} (--set)")
    resolved = resolve_config(base=base, base_origin=str(saved), flags={"output_dir": str(run_dir)},
                              assignments=assignments)
    return resolved, checkpoint, notes


def _locate(resume: str, output_dir: str | None) -> tuple[Path, str]:
    """(run directory, checkpoint to resume) for ``--resume``."""
    if resume == "latest":
        if not output_dir:
            raise ConfigError("--resume latest needs the run: add --output-dir RUN")
        return Path(output_dir), "latest"
    path = Path(resume)
    if (path / "state.json").is_file():  # a checkpoint directory: RUN/checkpoints/step-N
        run_dir, checkpoint = path.parent.parent, str(path)
    elif path.is_dir():
        run_dir, checkpoint = path, "latest"
    else:
        raise DrpoError(f"--resume {resume}: not a run or checkpoint directory")
    if output_dir and Path(output_dir).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {resume} belongs to {run_dir}, not to --output-dir {output_dir}")
    return run_dir, checkpoint


# -- the run directory's record of itself ----------------------------------------------------------


def write_run_info(run_dir: Path, resolved: ResolvedConfig, registry: Any, command_line: Sequence[str],
                   device: str, resumed: bool) -> None:
    """``config.yaml`` (a recipe that works from any directory) and ``run.json`` (how and when it ran); a
    resumed run keeps both and records the new session in ``run.json``."""
    info_path = run_dir / "run.json"
    if resumed:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        info.setdefault("resumed", []).append({"time": _now(), "command_line": list(command_line),
                                               "train.steps": resolved.config.train.steps})
        _write_atomic(info_path, json.dumps(info, indent=2))
        return
    _write_atomic(run_dir / "config.yaml", resolved.portable_yaml())
    info = {
        "start_time": _now(),
        "command_line": list(command_line),
        "python": platform.python_version(),
        "packages": _versions(["drpo", "torch", "diffusers", "transformers", "peft", "accelerate"]),
        "plugins": {p.name: {"distribution": p.distribution, "version": p.version, "state": p.state}
                    for p in registry.plugins},
        "git_revision": _git_revision(),
        "device": device,
    }
    _write_atomic(info_path, json.dumps(info, indent=2))


def finish_run_info(run_dir: Path, step: int, summary: dict[str, Any]) -> None:
    """End time, the step reached and the final held-out metrics, in ``run.json``."""
    path = run_dir / "run.json"
    if not path.is_file():
        return
    info = json.loads(path.read_text())
    final = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    info.update(end_time=_now(), steps_done=step, final_metrics=final)
    _write_atomic(path, json.dumps(info, indent=2))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None
