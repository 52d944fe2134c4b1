"""``drpo doctor``: the photographs load offline, the checks on stub rankers that rank right, rank wrong,
leave their range, depend on the batch, return NaN or a wrong count, and tiny real CLIP rankers through the
real loader (random weights: the line must report what the scores say, whatever that is)."""

import re
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

import drpo_clip_rankers
import drpo_image_rankers
from drpo_cli.main import app
from drpo_core import hookimpl
from drpo_core.context import BuildContext, LocalPath
from drpo_core.doctor import (
    PHOTOS,
    default_rankers,
    doctor_batch,
    examine,
    exit_code,
    load_photos,
    mismatching_caption,
    requests,
    run_doctor,
)
from drpo_core.errors import ConfigError, PluginError
from drpo_core.interfaces import Ranker

SMALL = 48  # the stubs' checks need no more pixels than this


@pytest.fixture(scope="module")
def photos():
    return load_photos(SMALL)


class StubOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str = "right"
    model: LocalPath = "unused"  # a weights option, so the doctor picks the stub by default


class CaptionStub(Ranker):
    """Knows the photos by their mean colour: 0.3 for an image's own caption, 0.1 otherwise; ``mode`` breaks it."""

    score_range = (-1.0, 1.0)

    def __init__(self, mode: str):
        self.mode = mode
        self.uses_prompt = mode != "claims-prompt-free"
        self.means = load_photos(SMALL).mean(dim=(2, 3))

    def score(self, images, prompts, metadata):
        if self.mode == "raises":
            raise RuntimeError("CUDA out of memory")
        which = torch.cdist(images.mean(dim=(2, 3)), self.means).argmin(dim=1).tolist()
        right = torch.tensor([prompt == PHOTOS[i].caption for prompt, i in zip(prompts, which, strict=True)])
        scores = torch.where(right, 0.3, 0.1)
        if self.mode == "wrong":
            scores = torch.where(right, 0.1, 0.3)
        elif self.mode == "out-of-range":
            scores = scores * 10
        elif self.mode == "batch-dependent":
            scores = scores + 0.05 * len(images)
        elif self.mode == "nan":
            scores[0] = float("nan")
        elif self.mode == "short":
            scores = scores[:-1]
        return scores


BUILT_WITH: list[BuildContext] = []  # the context of each stub built, newest last


def _build_stub(options, context):
    BUILT_WITH.append(context)
    if options.mode == "cannot-load":
        raise PluginError("ranker 'stub-caption': model 'unused' not found")
    return CaptionStub(options.mode)


class _StubPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        register("stub-caption", _build_stub, options=StubOptions)


class _BinaryPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        from drpo_shapes.rankers import ShapesCountingRanker

        register("stub-binary", lambda o, c: ShapesCountingRanker(), provides=("binary",))
        # graded, but scored against GenEval clauses (as geneval-soft): a photograph has none; never built
        register("stub-clauses", _never_built, requires=("geneval-prompts",))


def _never_built(options, context):
    raise AssertionError("doctor built a ranker it cannot check")


@pytest.fixture
def stubs(isolated_registry):
    isolated_registry.register_module(_StubPlugin())
    isolated_registry.register_module(_BinaryPlugin())
    return isolated_registry


def test_the_four_photos_load_from_the_installed_wheel():
    images = load_photos()  # files inside the skimage wheel: no pooch, no network (tests run offline)
    assert images.shape == (4, 3, 512, 512) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    # four different photographs, not one image four times
    means = images.mean(dim=(2, 3))
    assert float(torch.cdist(means, means).add(torch.eye(4)).min()) > 0.01
    assert [p.name for p in PHOTOS] == ["astronaut", "coffee", "rocket", "chelsea"]


def test_each_caption_is_right_once_and_wrong_once(photos):
    images, prompts = doctor_batch(photos)
    assert images.shape[0] == len(prompts) == 8
    assert prompts[0::2] == [p.caption for p in PHOTOS]
    assert sorted(prompts[1::2]) == sorted(prompts[0::2])
    assert all(mismatching_caption(i) != p.caption for i, p in enumerate(PHOTOS))


def test_a_ranker_that_ranks_right_passes(photos):
    verdict = examine("stub", CaptionStub("right"), photos)
    assert verdict.passed and verdict.ranks_right and not verdict.problems
    assert verdict.line == ("stub: PASS (matching caption higher on 4/4 photos, smallest margin 0.2; scores 0.1..0.3 "
                            "within [-1, 1]; batch = one-by-one within 0 (tolerance 0.002))")
    assert verdict.scores == pytest.approx([0.3, 0.1] * 4)


def test_a_ranker_that_ranks_wrong_fails_naming_the_photos(photos):
    verdict = examine("stub", CaptionStub("wrong"), photos)
    assert verdict.passed is False and verdict.ranks_right is False
    assert verdict.line.startswith("stub: FAIL: the mismatching caption scored at least as high on astronaut, "
                                   "coffee, rocket, chelsea (4 of 4 photos)")


def test_scores_outside_the_documented_range_fail(photos):
    verdict = examine("stub", CaptionStub("out-of-range"), photos)
    assert verdict.problems == ["scores 1..3 leave the documented range [-1, 1]"]
    assert verdict.ranks_right  # the ranking itself is right: only the scale is wrong


def test_scores_that_depend_on_the_batch_fail(photos):
    verdict = examine("stub", CaptionStub("batch-dependent"), photos)
    # a batch of 8 adds 0.4, one image 0.05: 0.35 apart, tolerance 1% of the spread 0.2
    assert verdict.problems == ["batch and one-by-one scores differ by up to 0.35 (tolerance 0.002: 1% of the "
                                "scores' spread)"]


@pytest.mark.parametrize(("mode", "problem"), [
    ("nan", "scoring the batch of 8 gave 1 non-finite score of 8"),
    ("short", "scoring the batch of 8 returned 7 scores for 8 images"),
    ("raises", "scoring the batch of 8 raised RuntimeError: CUDA out of memory"),
    ("claims-prompt-free", "declares it ignores the prompt, but the caption moved a score by 0.2"),
])
def test_broken_outputs_fail_with_one_clear_problem(photos, mode, problem):
    verdict = examine("stub", CaptionStub(mode), photos)
    assert verdict.passed is False
    assert verdict.problems[0] == problem
    assert "\n" not in verdict.line


def test_the_command_prints_one_line_per_ranker_and_exits_by_the_worst(stubs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["doctor", "stub-caption", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.splitlines() == [ok.output.strip()] and ok.output.startswith("stub-caption: PASS (")
    bad = runner.invoke(app, ["doctor", "stub-caption", "stub-binary", "--set", "rankers.stub-caption.mode=wrong",
                              "--device", "cpu"])
    assert bad.exit_code == 1
    lines = bad.output.splitlines()
    assert lines[0].startswith("stub-caption: FAIL: the mismatching caption scored at least as high on astronaut")
    assert lines[1].startswith("stub-binary: not checkable by doctor: its scores need a task's metadata")
    only_binary = runner.invoke(app, ["doctor", "stub-binary", "stub-clauses", "--device", "cpu"])
    assert only_binary.exit_code == 0, only_binary.output
    assert only_binary.output.splitlines()[1].startswith("stub-clauses: not checkable by doctor: its scores need")


def test_a_recipe_gives_the_rankers_and_their_options(stubs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("recipe.yaml").write_text("generator: tiny\nfeatures: tiny-pixels\nprompts: {path: prompts.txt}\n"
                                   "rankers: [{name: stub-caption, mode: wrong, weight: 2}]\n"
                                   "train: {mixed_precision: bf16}\neval: {rankers: [stub-binary]}\n")
    result = CliRunner().invoke(app, ["doctor", "--config", "recipe.yaml", "--device", "cpu"])
    assert result.exit_code == 1
    assert [line.split(":")[0] for line in result.output.splitlines()] == ["stub-caption", "stub-binary"]
    assert "FAIL: the mismatching caption" in result.output  # the recipe's mode: wrong
    # built as the run builds it: the recipe's precision (dtype auto follows it on CUDA), its folder
    assert BUILT_WITH[-1].mixed_precision == "bf16" and BUILT_WITH[-1].config_dir == tmp_path
    fixed = CliRunner().invoke(app, ["doctor", "stub-caption", "--config", "recipe.yaml", "--set",
                                     "rankers.stub-caption.mode=right", "--device", "cpu"])
    assert fixed.exit_code == 0 and fixed.output.startswith("stub-caption: PASS")  # --set wins over the recipe


@pytest.mark.parametrize(("args", "message"), [
    (["doctor", "no-such-ranker"], "Error: unknown ranker 'no-such-ranker'"),
    (["doctor", "stub-caption", "--set", "rankers.stub-caption.colour=red"], "Error: rankers.stub-caption.colour"),
    (["doctor", "stub-caption", "--set", "model=x"], "Error: --set model: doctor takes ranker options as "
                                                      "rankers.NAME.KEY=VALUE"),
    (["doctor", "stub-caption", "--set", "rankers.stub-binary.mode=x"], "Error: --set rankers.stub-binary...: "
                                                                        "ranker 'stub-binary' is not among"),
    (["doctor", "stub-caption", "--device", "cuda:7"], "Error: --device: cuda:7"),
])
def test_bad_input_is_one_line_and_exit_code_2(stubs, args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1


def test_a_ranker_that_cannot_be_built_fails_and_the_others_still_run(stubs):
    broken = requests(["stub-caption"], ["rankers.stub-caption.mode=cannot-load"])
    verdicts = run_doctor(broken + requests(["stub-caption"]))
    assert [v.passed for v in verdicts] == [False, True] and exit_code(verdicts) == 1
    assert verdicts[0].line == "stub-caption: FAIL: cannot be built: ranker 'stub-caption': model 'unused' not found"


def test_by_default_every_ranker_that_loads_weights_is_checked(builtin_registry):
    names = default_rankers(builtin_registry)
    assert {"pickscore", "clip", "aesthetic", "hpsv2", "hpsv2.1"} <= set(names)
    assert not {"brightness", "saturation", "contrast", "redness"} & set(names)  # programmatic: no weights


# -- tiny real rankers through the real loader ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from drpo_clip_rankers.testing import build_tiny_rankers

    return build_tiny_rankers(tmp_path_factory.mktemp("doctor-rankers"))


@pytest.fixture
def clip_registry(isolated_registry):
    isolated_registry.register_module(drpo_clip_rankers)
    isolated_registry.register_module(drpo_image_rankers)
    return isolated_registry


def test_tiny_pickscore_and_clip_report_their_ranking_honestly(tiny, clip_registry):
    clip = str(tiny["clip"])
    checks = requests(["pickscore", "clip"], [f"rankers.pickscore.model={clip}", f"rankers.pickscore.processor={clip}",
                                              f"rankers.clip.model={clip}"])
    verdicts = run_doctor(checks)
    # what the line says about the ranking, against the same model's scores computed apart from the doctor
    ranker = clip_registry.build("ranker", "clip", {"model": clip}, BuildContext())
    images, prompts = doctor_batch(load_photos())
    scores = ranker.score(images, prompts, [None] * 8)
    losing = [p.name for p, good, bad in zip(PHOTOS, scores[0::2], scores[1::2], strict=True) if good <= bad]
    for verdict in verdicts:
        assert verdict.ranks_right is (not losing)
        assert verdict.scores == pytest.approx(scores.tolist(), abs=1e-6)
        if losing:
            assert f"scored at least as high on {', '.join(losing)} ({len(losing)} of 4 photos)" in verdict.line
        else:
            assert "matching caption higher on 4/4 photos" in verdict.line
        # a random tiny CLIP still gives cosines inside [-1, 1], and float32 batches agree
        assert re.search(r"scores -?[\d.]+\.\.-?[\d.]+ within \[-1, 1\]", verdict.line), verdict.line
        assert "batch = one-by-one within" in verdict.line


def test_tiny_aesthetic_is_checked_as_a_prompt_free_ranker(tiny, clip_registry):
    checks = requests(["aesthetic"], [f"rankers.aesthetic.model={tiny['clip']}", f"rankers.aesthetic.head={tiny['head']}"])
    (verdict,) = run_doctor(checks)
    assert "prompt ignored as declared" in verdict.line and verdict.ranks_right is None
    low, high = min(verdict.scores), max(verdict.scores)
    assert verdict.passed is (1 <= low and high <= 10)  # a random head: in or out of 1-10, said as it is


def test_a_ranker_whose_weights_are_missing_fails_its_line(clip_registry, tmp_path):
    checks = requests(["clip"], [f"rankers.clip.model={tmp_path / 'absent'}"])
    with pytest.raises(PluginError):  # a local path that does not exist is bad input, caught when building
        clip_registry.build("ranker", "clip", dict(checks[0].options), BuildContext())
    (verdict,) = run_doctor(checks)
    assert verdict.passed is False and verdict.line.startswith("clip: FAIL: cannot be built: ranker 'clip': model")


def test_unknown_ranker_names_fail_before_anything_loads(clip_registry):
    with pytest.raises(PluginError, match="unknown ranker 'pickscor'"):
        requests(["pickscor"])
    with pytest.raises(ConfigError, match="rankers.clip.colour"):
        requests(["clip"], ["rankers.clip.colour=red"])


def test_programmatic_rankers_pass_as_prompt_free_in_this_process_and_in_a_worker(isolated_registry, monkeypatch,
                                                                                 tmp_path):
    """Image statistics ignore the caption (``uses_prompt = False``): the doctor checks that it changes nothing
    rather than failing them on the caption check; a worker process (a section ``timeout``) keeps the declaration."""
    isolated_registry.register_module(drpo_image_rankers)
    monkeypatch.chdir(tmp_path)
    names = ["brightness", "saturation", "contrast", "redness"]
    result = CliRunner().invoke(app, ["doctor", *names, "--set", "rankers.contrast.timeout=60", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines] == names
    for line in lines:
        assert ": PASS (prompt ignored as declared: the caption check does not apply; scores " in line, line
