"""``drpo doctor``: the user's first integration test of a ranker with real weights.

We never see real weights; the user is the first to. The doctor builds each ranker with the user's options and
scores four public-domain photographs that ship inside scikit-image's wheel (``skimage.data``: no download),
each with a caption that describes it and one that does not, then checks:

* **count and finiteness**: one finite score per image;
* **range**: every score inside the range the ranker declares (``Ranker.score_range``, its authors' scale);
* **ranking**: for a ranker that reads the prompt, the matching caption scores higher on every photo. Each
  photo's mismatching caption is the next photo's matching one, so every caption is the right one once and
  the wrong one once: a ranker that prefers some captions whatever the image cannot pass. A ranker that
  declares it ignores the prompt (``uses_prompt = False``, an aesthetic predictor) must give both captions
  of a photo the same score instead;
* **batching**: the eight scores of one call equal those of eight one-image calls within
  ``BATCH_TOLERANCE`` of the spread of the scores (the differences a ranking is made of).

Rankers that score against a task's metadata (GenEval's clauses: binary 0/1 correctness or the share of clauses
met) are reported as not checkable: a photograph has no task metadata to be correct against, and four photos
say little about a detector.

One :class:`Verdict` per ranker; the CLI prints one line each and exits 0 when every checked ranker passes,
1 when one fails (or cannot be built), 2 for bad input (an unknown ranker, invalid options) before anything
loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from drpo_core.config import (
    PROMPT_REQUIREMENTS,
    is_local_path,
    parse_assignment,
    ranker_timeout,
    resolve_config,
)
from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError, DrpoError, first_line, reason
from drpo_core.registry import ComponentSpec, Registry, get_registry

if TYPE_CHECKING:
    import torch

#: side of the square the photos are centre-cropped and resized to (what SD-Turbo and SDXL-Turbo generate)
PHOTO_SIZE = 512
#: batch and one-by-one scores may differ by this fraction of the spread (max - min) of the eight scores
BATCH_TOLERANCE = 0.01
#: a ranker that ignores the prompt may give a photo's two captions scores this far apart (float noise)
PROMPT_FREE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Photo:
    """A ``skimage.data`` photograph (the function that loads it) and a caption that describes it."""

    name: str
    caption: str


#: photographs shipped in scikit-image's wheel, free of copyright as their docstrings state (astronaut: NASA,
#: public domain; chelsea, coffee: CC0 by their photographers; rocket: SpaceX, released into the public domain)
PHOTOS = (
    Photo("astronaut", "a smiling astronaut in an orange spacesuit, an American flag and a model of the space "
                       "shuttle behind her"),
    Photo("coffee", "a cup of espresso on a red saucer with a spoon, on a wooden table"),
    Photo("rocket", "a rocket on its launch pad at night, between tall lightning towers and floodlights"),
    Photo("chelsea", "a close-up photo of the face of a tabby cat with green eyes"),
)


def mismatching_caption(index: int) -> str:
    """The caption of the next photo: wrong for this one, right for another. The order keeps the two space
    photographs apart (the astronaut's caption names a space shuttle), so no wrong caption is half right."""
    return PHOTOS[(index + 1) % len(PHOTOS)].caption


def load_photos(size: int = PHOTO_SIZE) -> torch.Tensor:
    """The photos as ``(4, 3, size, size)`` float images in [0, 1]: centre square, bicubic resize."""
    import numpy as np
    import skimage.data
    import torch
    from PIL import Image

    images = []
    for photo in PHOTOS:
        array = getattr(skimage.data, photo.name)()
        height, width = array.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = Image.fromarray(array[top:top + side, left:left + side])
        resized = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        images.append(torch.from_numpy(resized).permute(2, 0, 1))
    return torch.stack(images)


def doctor_batch(photos: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Each photo twice, with its matching then its mismatching caption: 8 images and their prompts."""
    prompts = [text for i, photo in enumerate(PHOTOS) for text in (photo.caption, mismatching_caption(i))]
    return photos.repeat_interleave(2, dim=0), prompts


@dataclass
class Verdict:
    """What the doctor found for one ranker: ``passed`` is None when it could not be checked."""

    ranker: str
    passed: bool | None
    problems: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    #: the ranking check's outcome: True/False, None when not made (a prompt-free ranker, or it never scored)
    ranks_right: bool | None = None

    @property
    def line(self) -> str:
        if self.passed is None:
            return f"{self.ranker}: {'; '.join(self.findings)}"
        head = "PASS" if self.passed else "FAIL: " + "; ".join(self.problems)
        return f"{self.ranker}: {head}" + (f" ({'; '.join(self.findings)})" if self.findings else "")


@dataclass(frozen=True)
class DoctorRequest:
    """A ranker to check: its name (``name[:variant]``), options, and the folder its relative paths start in."""

    name: str
    options: Mapping[str, Any]
    config_dir: Path
    #: the recipe's ``train.mixed_precision``: a ranker's ``dtype: auto`` follows it on CUDA, as in training
    mixed_precision: str = "no"
    #: the section's ``timeout`` (a recipe's, or ``--set rankers.NAME.timeout``): the ranker then runs in a worker
    #: process whose calls are ended when they pass it, as in training; None: in this process
    timeout: float | None = None


def default_rankers(registry: Registry) -> list[str]:
    """Every registered ranker that loads model weights (an option annotated ``LocalPath``: a hub id or a file):
    the ones real weights can break. Programmatic rankers (brightness, ...) and the test fakes have none."""
    return [spec.name for spec in registry.specs("ranker") if _loads_weights(spec)]


def _loads_weights(spec: ComponentSpec) -> bool:
    return any(is_local_path(info) for info in getattr(spec.options, "model_fields", {}).values())


def requests(names: Sequence[str], assignments: Sequence[str] = (), recipe: Path | None = None,
             registry: Registry | None = None) -> list[DoctorRequest]:
    """The rankers to check and their options, validated (bad input raises before anything loads).

    Options come from a recipe's ``rankers`` and ``eval.rankers`` sections (``recipe``), then from
    ``--set rankers.NAME.KEY=VALUE`` lines; ``timeout`` is the section's, as in a recipe. Without ``names``: the
    recipe's rankers, else :func:`default_rankers`. A ranker's ``device`` must be one this machine has."""
    from drpo_core.devices import check_component_devices

    registry = registry or get_registry()
    options: dict[str, dict[str, Any]] = {}
    timeouts: dict[str, float | None] = {}
    config_dir, precision = Path.cwd(), "no"
    if recipe is not None:  # the whole recipe is checked, as `drpo train` would
        resolved = resolve_config(recipe, registry=registry)
        config_dir, precision = resolved.config_dir, resolved.config.train.mixed_precision
        for section in [*resolved.config.rankers, *resolved.config.eval.rankers]:
            options.setdefault(section.name, {}).update(section.options)
            if section.timeout is not None:
                timeouts[section.name] = section.timeout
    set_names: list[str] = []
    for line in assignments:
        key, value = parse_assignment(line)
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "rankers":
            raise ConfigError(f"--set {key}: doctor takes ranker options as rankers.NAME.KEY=VALUE "
                              "(e.g. rankers.pickscore.model=/models/PickScore_v1)")
        name, option = ".".join(parts[1:-1]), parts[-1]  # ranker names may hold dots (hpsv2.1)
        if option == "timeout":  # the section's key, not the ranker's own option
            timeouts[name] = ranker_timeout(value, f"rankers.{name}")
            options.setdefault(name, {})
        else:
            options.setdefault(name, {})[option] = value
        set_names.append(name)
    chosen = list(names) or list(options) or default_rankers(registry)
    unused = [name for name in set_names if name not in chosen]
    if unused:
        raise ConfigError(f"--set rankers.{unused[0]}...: ranker {unused[0]!r} is not among those checked "
                          f"({', '.join(chosen)})")
    out = []
    for name in dict.fromkeys(chosen):
        validated = registry.validate_options("ranker", name, options.get(name, {}), f"rankers.{name}")
        check_component_devices({f"rankers.{name}": validated})
        timeout = timeouts.get(name)
        spec = registry.get("ranker", name)
        if "timeout" in spec.requires and timeout is None:
            raise ConfigError(f"rankers.{name}.timeout: ranker {spec.name!r} needs a timeout (seconds one score call "
                              f"may take, retries included), e.g. --set rankers.{name}.timeout=120")
        out.append(DoctorRequest(name, options.get(name, {}), config_dir, precision, timeout))
    return out


def examine(name: str, ranker: Any, photos: torch.Tensor | None = None) -> Verdict:
    """Check one built ranker on the doctor's photographs (see the module docstring)."""
    import torch

    images, prompts = doctor_batch(load_photos() if photos is None else photos)
    verdict = Verdict(name, passed=True)
    batch = _scores(ranker, images, prompts, verdict, "scoring the batch of 8")
    if batch is None:
        verdict.passed = False
        return verdict
    verdict.scores = batch.tolist()
    _check_ranking(ranker, batch, verdict)
    _check_range(ranker, batch, verdict)
    singles = [_scores(ranker, images[i:i + 1], prompts[i:i + 1], verdict, f"scoring image {i} alone")
               for i in range(len(images))]
    if all(s is not None for s in singles):
        one_by_one = torch.cat([s for s in singles if s is not None])
        _check_batching(batch, one_by_one, verdict)
    verdict.passed = not verdict.problems
    return verdict


def _scores(ranker: Any, images: torch.Tensor, prompts: list[str], verdict: Verdict, what: str
            ) -> torch.Tensor | None:
    """The ranker's scores as float64, or None with the problem recorded (an exception, a wrong count, NaN)."""
    import torch

    try:
        with torch.no_grad():
            out = ranker.score(images, prompts, [None] * len(prompts))
    except Exception as error:  # the doctor reports any failure of the user's model as a line, not a traceback
        verdict.problems.append(f"{what} raised {reason(error)}")
        return None
    if not isinstance(out, torch.Tensor):
        verdict.problems.append(f"{what} returned {type(out).__name__}, not a tensor of scores")
        return None
    scores = out.detach().flatten().to("cpu", torch.float64)
    if scores.numel() != len(images):
        verdict.problems.append(f"{what} returned {scores.numel()} scores for {len(images)} images")
        return None
    bad = int((~scores.isfinite()).sum())
    if bad:
        verdict.problems.append(f"{what} gave {bad} non-finite score{'s' if bad > 1 else ''} of {len(images)}")
        return None
    return scores


def _check_range(ranker: Any, scores: torch.Tensor, verdict: Verdict) -> None:
    low, high = float(scores.min()), float(scores.max())
    declared = getattr(ranker, "score_range", None)
    if declared is None:
        verdict.findings.append(f"scores {low:.4g}..{high:.4g}, no documented range declared")
        return
    lowest, highest = declared
    if low < lowest or high > highest:
        verdict.problems.append(f"scores {low:.4g}..{high:.4g} leave the documented range [{lowest:g}, {highest:g}]")
    else:
        verdict.findings.append(f"scores {low:.4g}..{high:.4g} within [{lowest:g}, {highest:g}]")


def _check_ranking(ranker: Any, scores: torch.Tensor, verdict: Verdict) -> None:
    matching, mismatching = scores[0::2], scores[1::2]
    margins = matching - mismatching
    if not getattr(ranker, "uses_prompt", True):
        moved = float(margins.abs().max())
        if moved > PROMPT_FREE_TOLERANCE:
            verdict.problems.append(f"declares it ignores the prompt, but the caption moved a score by {moved:.3g}")
        else:
            verdict.findings.append("prompt ignored as declared: the caption check does not apply")
        return
    wrong = [PHOTOS[i].name for i, margin in enumerate(margins.tolist()) if margin <= 0]
    verdict.ranks_right = not wrong
    if wrong:
        verdict.problems.append(f"the mismatching caption scored at least as high on {', '.join(wrong)} "
                                f"({len(wrong)} of {len(PHOTOS)} photos)")
    else:
        verdict.findings.append(f"matching caption higher on {len(PHOTOS)}/{len(PHOTOS)} photos, "
                                f"smallest margin {float(margins.min()):.4g}")


def _check_batching(batch: torch.Tensor, one_by_one: torch.Tensor, verdict: Verdict) -> None:
    gap = float((batch - one_by_one).abs().max())
    tolerance = BATCH_TOLERANCE * float(batch.max() - batch.min())
    if gap > tolerance:
        verdict.problems.append(f"batch and one-by-one scores differ by up to {gap:.3g} (tolerance {tolerance:.3g}: "
                                f"{BATCH_TOLERANCE:.0%} of the scores' spread)")
    else:
        verdict.findings.append(f"batch = one-by-one within {gap:.2g} (tolerance {tolerance:.2g})")


def run_doctor(checks: Sequence[DoctorRequest], device: str = "cpu", registry: Registry | None = None
               ) -> list[Verdict]:
    """Build and examine each ranker in turn (one at a time: a ViT-H ranker is large); a ranker that cannot be
    built fails its check with the reason."""
    import gc

    from drpo_core.worker import build_ranker

    registry = registry or get_registry()
    photos = load_photos()
    verdicts = []
    for check in checks:
        spec = registry.get("ranker", check.name)
        if "binary" in spec.provides or any(need in PROMPT_REQUIREMENTS for need in spec.requires):
            verdicts.append(Verdict(check.name, None, findings=[
                "not checkable by doctor: its scores need a task's metadata (GenEval clauses, 0/1 correctness) to "
                "be correct against; check it with `drpo eval` on its own prompts"]))
            continue
        context = BuildContext(device=device, mixed_precision=check.mixed_precision, config_dir=check.config_dir)
        try:
            ranker = build_ranker(registry, check.name, dict(check.options), context,
                                  where=f"rankers.{check.name}", timeout=check.timeout)
        except Exception as error:  # missing weights, out of memory: this ranker fails, others go on
            why = first_line(error) if isinstance(error, DrpoError) else reason(error)
            verdicts.append(Verdict(check.name, False, problems=[f"cannot be built: {why}"]))
            continue
        try:
            verdicts.append(examine(check.name, ranker, photos))
        finally:
            getattr(ranker, "close", lambda: None)()  # a worker process ends with its check
        del ranker
        gc.collect()
    return verdicts


def exit_code(verdicts: Sequence[Verdict]) -> int:
    """0 when no checked ranker failed, 1 otherwise."""
    return 1 if any(v.passed is False for v in verdicts) else 0
