"""``drpo eval``: a generator (and a run's fine-tune of it) on a prompt set x seeds, in the paper's units.

The protocol is the paper's (method.md §10): every prompt with seeds 42-46, the noise of (prompt, seed) keyed
by ``seed * 10**6 + prompt_id`` (:func:`drpo_core.noise.protocol_noise`), the base and the fine-tuned
generator on the same noise, each image scored by each ranker, and per side the mean and the population
standard deviation over all (prompt, seed) images. Each ranker's scores are reported in its registered
:class:`~drpo_core.interfaces.Units` (PickScore, CLIP and HPSv2 x100, aesthetic raw, as in the tables).

**The paired difference** (finetuned - base) pairs the two images of one (prompt, seed): the same prompt,
the same noise. Its estimate is the mean of the differences over all pairs. The five images of a prompt
are not independent draws (they share the prompt, which moves every score), so the confidence interval
treats the *prompt* as the unit: each prompt's difference is averaged over its seeds, ``d_p``, and the
interval is Student's t over the P prompts::

    diff = mean_p d_p            (= mean over all pairs: every prompt has the same seeds)
    half = t_{(1 + confidence) / 2, P - 1} * sd(d_p, ddof=1) / sqrt(P)
    [ci_low, ci_high] = [diff - half, diff + half]

(``scipy.stats.t``; one prompt gives no interval). Treating the P x 5 pairs as independent would give an
interval too narrow by up to sqrt(5).

**Groups**: a ranker that puts prompts in groups (``Ranker.groups(record)``, GenEval's tags) gets the same
summary, difference and interval per group, over that group's prompts. Units with ``mean_of_groups`` add the
mean of the group means, each group weighing the same (GenEval's Overall), beside the mean over images.

**Streaming**: images are generated ``batch_size`` (prompt, seed) pairs at a time, both sides on the same
noise, scored by every ranker and dropped; only one float per image and ranker is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from drpo_core.config import parse_assignment, parse_seeds, resolve_path, set_dotted
from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, ConfigError, DrpoError, reason
from drpo_core.interfaces import Generator, Ranker, Units
from drpo_core.noise import PROTOCOL_STRIDE, protocol_noise
from drpo_core.prompts import PromptRecord, load_prompts, subset_prompts
from drpo_core.registry import Registry, get_registry
from drpo_core.sources import check_scores

#: the rankers of the paper's tables (method.md §11), the default of ``drpo eval``
PAPER_RANKERS = ("pickscore", "clip", "aesthetic", "hpsv2")
#: the paper's seeds per prompt (method.md §10)
PAPER_SEEDS = "42-46"
#: the paper's Pick-a-Pic v2 test prompts (the released code's default test file)
DEFAULT_PROMPTS = "pickscore-test"
CONFIDENCE = 0.95
CI_METHOD = "paired by (prompt, seed); Student t over prompts of each prompt's mean difference across its seeds"
#: the prompt sets shipped in the source tree's ``data/`` folder (data/README.md: provenance and licences)
PROMPT_SETS = {
    "pickscore-test": "pickscore/test.txt",
    "parti": "parti/PartiPrompts.tsv",
    "geneval": "geneval/evaluation_metadata.jsonl",
}
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
#: ``--limit N`` keeps N prompts chosen by this seed's text hash (:func:`drpo_core.prompts.subset_prompts`)
SUBSET_SEED = 0
#: ``seed * 10**6 + prompt_id`` must fit torch's 64-bit generator seed
MAX_SEED = 10**12

#: ``render(prompts, noise) -> images (B, 3, H, W) in [0, 1]``
Render = Callable[[list[str], torch.Tensor], torch.Tensor]
Progress = Callable[[int], object]


# -- prompts and seeds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSelection:
    """The prompts evaluated: ``records[i]`` is line ``ids[i]`` (0-based) of ``path``, which holds ``total``."""

    label: str
    path: Path
    records: list[PromptRecord]
    ids: list[int]
    total: int
    limit: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"set": self.label, "path": str(self.path), "count": len(self.records), "total": self.total,
                "limit": self.limit, "subset_seed": SUBSET_SEED if self.limit is not None else None}


def prompt_set_path(spec: str) -> tuple[str, Path]:
    """``(label, file)`` for ``--prompts``: a shipped set's name or a prompt file."""
    if spec in PROMPT_SETS:
        path = DATA_DIR / PROMPT_SETS[spec]
        if not path.is_file():
            raise DrpoError(f"--prompts {spec}: the set ships in drpo's source tree ({PROMPT_SETS[spec]} under "
                            f"data/), not found at {path}: give the file itself")
        return spec, path
    path = resolve_path(spec, Path.cwd()) if spec.startswith("pkg://") else Path(spec).expanduser()
    if not path.exists():
        raise DrpoError(f"--prompts {spec}: neither a prompt set ({', '.join(PROMPT_SETS)}) nor a file")
    return str(path), path


def select_prompts(spec: str, limit: int | None = None) -> PromptSelection:
    """The prompts ``--prompts`` names, all of them or (``--limit N``) N distinct ones chosen by a seeded hash of
    their text, kept in file order with their positions in the file (their noise keys)."""
    if limit is not None and limit < 1:
        raise DrpoError(f"--limit must be at least 1, got {limit}")
    label, path = prompt_set_path(spec)
    records = load_prompts(path)
    chosen = {id(record) for record in subset_prompts(records, limit, seed=SUBSET_SEED)}
    if len(records) > PROTOCOL_STRIDE:
        raise DrpoError(f"{path}: {len(records)} prompts; the noise key seed*10^6+prompt_id allows at most "
                        f"{PROTOCOL_STRIDE}")
    ids = [i for i, record in enumerate(records) if id(record) in chosen]
    return PromptSelection(label, path, [records[i] for i in ids], ids, len(records), limit)


def eval_seeds(text: str) -> list[int]:
    """``--seeds`` (``42-46`` or ``1,5,9``): distinct, each below ``MAX_SEED``; else one line."""
    try:
        seeds = parse_seeds(text)
    except ValueError as error:
        raise DrpoError(f"--seeds: {error}") from None
    if not seeds:
        raise DrpoError(f"--seeds: no seeds in {text!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise DrpoError(f"--seeds: seed {repeated[0]} is given twice ({text!r})")
    if max(seeds) >= MAX_SEED:
        raise DrpoError(f"--seeds: {max(seeds)} is too large (the noise key seed*10^6+prompt_id needs seeds "
                        f"below {MAX_SEED:.0e})")
    return list(seeds)


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DrpoError(f"--batch-size must be at least 1, got {batch_size}")


def seeds_text(seeds: Sequence[int]) -> str:
    """``[42, 43, 44, 46]`` -> ``42-44,46``."""
    parts, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            first, last = seeds[start], seeds[i - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = i
    return ",".join(parts)


# -- rankers -------------------------------------------------------------------------------------------


@dataclass
class EvalRanker:
    """A built ranker, the name it was asked for by, and the units it is reported in."""

    name: str
    ranker: Ranker
    units: Units = field(default_factory=Units)


def split_assignments(assignments: Sequence[str], rankers: Sequence[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """``--set`` lines of ``drpo eval``: ``generator.KEY=VALUE`` lines (returned as they are) and
    ``rankers.NAME.KEY=VALUE`` (NAME: a ``--ranker`` as given, or its index, as ``drpo train``'s
    ``rankers.0.KEY``), returned as one options mapping per ranker."""
    generator_lines: list[str] = []
    options: list[dict[str, Any]] = [{} for _ in rankers]
    for line in assignments:
        key, value = parse_assignment(line)
        if key.startswith("generator."):
            generator_lines.append(line)
            continue
        rest = key.removeprefix("rankers.")
        names = [(label, i) for i, ref in enumerate(rankers) for label in (ref, str(i))
                 if key.startswith("rankers.") and rest.startswith(label + ".")]
        if not names:
            given = ", ".join(rankers)
            raise ConfigError(f"--set {key}: drpo eval takes generator.KEY=VALUE and rankers.NAME.KEY=VALUE, NAME a "
                              f"--ranker ({given}) or its index")
        label, index = max(names, key=lambda found: len(found[0]))  # hpsv2.1.x is hpsv2.1's, not hpsv2's
        set_dotted(options[index], rest.removeprefix(label + "."), value)
    return generator_lines, options


@dataclass(frozen=True)
class CheckedRanker:
    """A ``--ranker``'s options validated by its plugin, and its section ``timeout`` (None: no limit)."""

    options: Any
    #: ``--set rankers.NAME.timeout=SECONDS``: the ranker then runs in a worker process, as in training
    timeout: float | None = None


def check_rankers(references: Sequence[str], options: Sequence[Mapping[str, Any]],
                  registry: Registry | None = None) -> list[CheckedRanker]:
    """Each ranker's options validated by its plugin (``rankers.NAME.KEY: ...`` on error), its ``device``
    checked against this machine and its ``timeout`` (a section key, as in a recipe) against what the ranker
    needs, before any loads. Returns a :class:`CheckedRanker` per ranker, for :func:`build_rankers`."""
    from drpo_core.config import ranker_timeout
    from drpo_core.devices import check_component_devices

    registry = registry or get_registry()
    if not references:
        raise DrpoError("--ranker: name at least one ranker")
    repeated = sorted({r for r in references if list(references).count(r) > 1})
    if repeated:
        raise DrpoError(f"--ranker {repeated[0]} is given twice")
    checked = []
    for index, (ref, given) in enumerate(zip(references, options, strict=True)):
        where, rest = f"rankers.{ref}", dict(given)
        timeout = ranker_timeout(rest.pop("timeout", None), where)
        validated = registry.validate_options("ranker", ref, rest, where)
        check_component_devices({where: validated})
        spec = registry.get("ranker", ref)
        if "timeout" in spec.requires and timeout is None:
            raise ConfigError(f"{where}.timeout: ranker {spec.name!r} needs a timeout (seconds one score call may "
                              f"take, retries included), e.g. --set rankers.{index}.timeout=120")
        checked.append(CheckedRanker(validated, timeout))
    return checked


def build_rankers(references: Sequence[str], options: Sequence[Any], context: BuildContext,
                  registry: Registry | None = None) -> list[EvalRanker]:
    """The rankers, built with their options as :func:`check_rankers` returned them (a :class:`CheckedRanker`
    each), with their registered units; one with a ``timeout`` runs in a worker process whose calls are ended
    when they pass it (as ``drpo train`` runs it)."""
    from drpo_core.worker import build_ranker

    registry = registry or get_registry()
    built = []
    for ref, checked in zip(references, options, strict=True):
        if not isinstance(checked, CheckedRanker):
            checked = CheckedRanker(checked)
        ranker = build_ranker(registry, ref, checked.options, context, where=f"rankers.{ref}",
                              timeout=checked.timeout)
        built.append(EvalRanker(ref, ranker, registry.get("ranker", ref).units or Units()))
    return built


def checked_scores(name: str, ranker: Any, images: torch.Tensor, prompts: Sequence[str],
                   metadata: Sequence[Any], where: Sequence[str]) -> np.ndarray:
    """One finite float64 score per image (``where[i]`` names image i in the error), or one line naming the
    ranker: what it raised, a wrong count, output that is not numbers, a non-finite score."""
    try:
        with torch.no_grad():
            raw = ranker.score(images, list(prompts), list(metadata))
        values = check_scores(raw, len(images), name).numpy()
    except DrpoError:
        raise
    except Exception as error:
        raise ComponentError(f"ranker {name!r} raised {reason(error)}") from error
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        more = f" (and {bad.size - 1} more in this batch)" if bad.size > 1 else ""
        raise ComponentError(f"ranker {name!r} returned a non-finite score ({values[bad[0]]}) for "
                             f"{where[bad[0]]}{more}")
    return values


# -- generating and scoring ----------------------------------------------------------------------------


def render(generator: Generator, *, base: bool) -> Render:
    """Images of ``generator``: its frozen base (``reference``) or its trained self (``sample``)."""
    latents_of = generator.reference if base else generator.sample

    def images(prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        return generator.decode(latents_of(prompts, noise).float()).float().clamp(0, 1)

    return images


def score_generated(sides: Mapping[str, Render], noise_shape: Sequence[int], device: torch.device | str,
                    selection: PromptSelection, seeds: Sequence[int], rankers: Sequence[EvalRanker],
                    batch_size: int = 8, progress: Progress | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{side: {ranker: scores (prompts, seeds)}}``: each side's images of every (prompt, seed) on the same
    noise, ``batch_size`` pairs at a time, scored and dropped."""
    n_prompts, n_seeds = len(selection.records), len(seeds)
    scores = {side: {r.name: np.empty((n_prompts, n_seeds)) for r in rankers} for side in sides}
    jobs = [(p, s) for p in range(n_prompts) for s in range(n_seeds)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        rows, cols = np.array([p for p, _ in chunk]), np.array([s for _, s in chunk])
        texts = [selection.records[p].text for p, _ in chunk]
        metadata = [selection.records[p].metadata for p, _ in chunk]
        where = [f"prompt {selection.ids[p]} ({selection.records[p].text[:40]!r}) seed {seeds[s]}" for p, s in chunk]
        noise = torch.stack([protocol_noise(noise_shape, selection.ids[p], seeds[s]) for p, s in chunk]).to(device)
        for side, images_of in sides.items():
            with torch.no_grad():
                images = images_of(texts, noise)
            for r in rankers:
                scores[side][r.name][rows, cols] = checked_scores(r.name, r.ranker, images, texts, metadata,
                                                                  [f"the {side} image of {w}" for w in where])
            del images
        if progress is not None:
            progress(len(chunk))
    return scores


def evaluate_generators(sides: Mapping[str, tuple[str, Render]], generator: Generator, selection: PromptSelection,
                        seeds: Sequence[int], rankers: Sequence[EvalRanker], *, batch_size: int = 8,
                        confidence: float = CONFIDENCE, progress: Progress | None = None) -> dict[str, Any]:
    """The full report (what ``--json`` writes) of ``sides`` (``{"base": (label, render), "finetuned": ...}``,
    images of ``generator``'s noise shape) on ``selection`` x ``seeds``."""
    start = time.perf_counter()
    generator.train(False)
    renders = {side: images_of for side, (_, images_of) in sides.items()}
    scores = score_generated(renders, generator.noise_shape, generator.device, selection, seeds, rankers,
                             batch_size, progress)
    return build_report(prompts=selection.describe(), seeds=seeds, sides={s: label for s, (label, _) in sides.items()},
                        device=str(generator.device), records=selection.records, rankers=rankers, scores=scores,
                        confidence=confidence, seconds=time.perf_counter() - start)


# -- statistics ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Mean and population standard deviation (ddof 0, the paper's) over ``n`` images."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class PairedDifference:
    """finetuned - base over (prompt, seed) pairs, with its interval (None for a single prompt)."""

    diff: float
    ci_low: float | None
    ci_high: float | None
    prompts: int
    confidence: float
    method: str = CI_METHOD

    def as_dict(self) -> dict[str, Any]:
        return {"diff": self.diff, "ci_low": self.ci_low, "ci_high": self.ci_high, "confidence": self.confidence,
                "prompts": self.prompts, "method": self.method}


def summarise(values: np.ndarray) -> Summary:
    flat = np.asarray(values, dtype=np.float64).ravel()
    return Summary(float(flat.mean()), float(flat.std()), int(flat.size))


def paired_difference(base: np.ndarray, finetuned: np.ndarray, confidence: float = CONFIDENCE) -> PairedDifference:
    """The mean of ``finetuned - base`` over (prompt, seed) pairs (arrays ``(prompts, seeds)``, same noise per
    cell) and a Student-t interval over prompts of the per-prompt mean difference (module docstring)."""
    from scipy import stats

    if base.shape != finetuned.shape or base.ndim != 2 or base.size == 0:
        raise ValueError(f"paired scores must be two (prompts, seeds) arrays of one shape, got {base.shape} and "
                         f"{finetuned.shape}")
    per_prompt = (np.asarray(finetuned, np.float64) - np.asarray(base, np.float64)).mean(axis=1)
    n, diff = len(per_prompt), float(per_prompt.mean())
    if n < 2:
        return PairedDifference(diff, None, None, n, confidence)
    quantile = float(stats.t.ppf((1 + confidence) / 2, df=n - 1))
    half = quantile * float(per_prompt.std(ddof=1)) / math.sqrt(n)
    return PairedDifference(diff, diff - half, diff + half, n, confidence)


def build_report(*, prompts: Mapping[str, Any], seeds: Sequence[int], sides: Mapping[str, str], device: str,
                 records: Sequence[PromptRecord], rankers: Sequence[EvalRanker],
                 scores: Mapping[str, Mapping[str, np.ndarray]], confidence: float = CONFIDENCE,
                 seconds: float | None = None) -> dict[str, Any]:
    """The report as JSON-ready data: per ranker, in its units, each side's summary, the paired difference
    when there are a ``base`` and a ``finetuned`` side, and the same per group. ``scores[side][ranker]`` is
    ``(len(records), seeds)``."""
    paired = "base" in sides and "finetuned" in sides
    images = max((values.size for found in scores.values() for values in found.values()), default=0)
    report: dict[str, Any] = {
        "prompts": dict(prompts), "seeds": list(seeds), "images_per_side": images,
        "sides": dict(sides), "device": device, "confidence": confidence if paired else None,
        "ci_method": CI_METHOD if paired else None, "rankers": {},
    }
    for r in rankers:
        scaled = {side: r.units.scale * np.asarray(found[r.name], np.float64) for side, found in scores.items()}
        entry: dict[str, Any] = {"units": str(r.units), "scale": r.units.scale, **_compare(scaled, confidence)}
        groups = _groups(r, records)
        if groups:
            entry["groups"] = {name: _compare({side: v[rows] for side, v in scaled.items()}, confidence)
                               for name, rows in groups.items()}
            if r.units.mean_of_groups:
                entry["mean_of_groups"] = _mean_of_groups(entry["groups"], list(scaled))
        report["rankers"][r.name] = entry
    if seconds is not None:
        report["seconds"] = seconds
    return report


def _compare(values: Mapping[str, np.ndarray], confidence: float) -> dict[str, Any]:
    entry: dict[str, Any] = {side: summarise(v).as_dict() for side, v in values.items()}
    if "base" in values and "finetuned" in values:
        entry.update(paired_difference(values["base"], values["finetuned"], confidence).as_dict())
    return entry


def _mean_of_groups(groups: Mapping[str, Mapping[str, Any]], sides: Sequence[str]) -> dict[str, Any]:
    """Each side's mean of its group means (every group weighs the same), and their difference."""
    entry: dict[str, Any] = {side: float(np.mean([g[side]["mean"] for g in groups.values()])) for side in sides}
    if "base" in entry and "finetuned" in entry:
        entry["diff"] = entry["finetuned"] - entry["base"]
    return entry


def _groups(ranker: EvalRanker, records: Sequence[PromptRecord]) -> dict[str, np.ndarray]:
    """``{group: indices of its prompts}`` by group name; {} when the ranker groups nothing."""
    members: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        try:
            names = ranker.ranker.groups(record)
        except Exception as error:
            raise ComponentError(f"ranker {ranker.name!r}: groups() raised {reason(error)}") from error
        for name in names:
            members.setdefault(str(name), []).append(i)
    return {name: np.array(members[name]) for name in sorted(members)}


# -- output --------------------------------------------------------------------------------------------


def print_report(report: Mapping[str, Any], console: Console) -> None:
    """A header (prompts, seeds, sides, units, interval method) and one table row per ranker and group."""
    prompts, seeds = report["prompts"], report["seeds"]
    sides = list(report["sides"])
    paired = report["ci_method"] is not None
    subset = f"{prompts['count']} of {prompts['total']} (--limit)" if prompts.get("limit") else f"{prompts['count']}"
    lines = [f"prompts   {prompts['set']}: {subset} prompts x seeds {seeds_text(seeds)} = "
             f"{report['images_per_side']} images per side, on {report['device']}"]
    lines += [f"{side:<10}{label}" for side, label in report["sides"].items()]
    units = ", ".join(f"{name} {entry['units']}" for name, entry in report["rankers"].items())
    lines.append(f"units     {units}")
    if paired:
        confidence = f"{100 * report['confidence']:g}%"
        lines.append(f"change    finetuned - base, mean over (prompt, seed) pairs; {confidence} interval: "
                     f"Student t over prompts of each prompt's mean difference across its seeds")
    for line in lines:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    columns = ["ranker", "units", *(f"{side} mean ± std" for side in sides)]
    if paired:
        columns += ["finetuned - base", f"{100 * report['confidence']:g}% CI"]
    table = Table(*columns)
    for name, entry in report["rankers"].items():
        table.add_row(name, entry["units"], *_cells(entry, sides, paired))
        if "mean_of_groups" in entry:
            overall = entry["mean_of_groups"]
            cells = [f"{overall[side]:.4g}" for side in sides] + ([f"{overall['diff']:+.3g}", ""] if paired else [])
            table.add_row("  mean of groups", "", *cells)
        for group, values in entry.get("groups", {}).items():
            table.add_row(f"  {group}", "", *_cells(values, sides, paired))
    if not console.is_terminal:  # a log file or a pipe gets whole rows, whatever width a terminal would have
        console = Console(file=console.file, width=max(console.width, _natural_width(console, table)))
    console.print(table)
    if "seconds" in report:
        console.print(f"{report['seconds']:.1f} s", highlight=False)


def _natural_width(console: Console, table: Table) -> int:
    from rich.measure import Measurement

    return Measurement.get(console, console.options.update(width=10_000), table).maximum


def _cells(entry: Mapping[str, Any], sides: Sequence[str], paired: bool) -> list[str]:
    cells = [f"{entry[side]['mean']:.4g} ± {entry[side]['std']:.3g}" for side in sides]
    if paired:
        low, high = entry["ci_low"], entry["ci_high"]
        interval = "n/a (one prompt)" if low is None else f"[{low:+.3g}, {high:+.3g}]"
        cells += [f"{entry['diff']:+.3g}", interval]
    return cells
