"""`drpo eval` and `drpo sample` (issue 19, evaluation): the paired interval against hand arithmetic, the paper's
units, a run and a base generator end to end on a tiny SD-Turbo pipeline with the tiny CLIP-family rankers,
sample and eval drawing the same noise, one-line errors for bad input, and the model card's base model."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import drpo_clip_rankers
import drpo_diffusers
import drpo_image_rankers
from drpo_cli.main import app
from drpo_clip_rankers.testing import build_tiny_rankers
from drpo_core import hookimpl
from drpo_core import registry as registry_module
from drpo_core.context import BuildContext
from drpo_core.interfaces import Units
from drpo_core.noise import protocol_noise
from drpo_core.preflight import best_device, resolve_device
from drpo_core.prompts import PromptRecord
from drpo_core.report import EvalRanker, build_report, paired_difference, select_prompts
from drpo_core.runs import load_generator
from drpo_core.testing import BrightnessRanker
from drpo_diffusers.testing import make_tiny_run
from tests.conftest import make_registry

HPS_DATA = Path(__file__).parent / "data" / "hpsv2"
PROMPTS = ["a red apple", "a red car", "a blue car"]
SEEDS = (42, 43)


class GroupedBrightness(BrightnessRanker):
    """Mean pixel value, grouped by the prompt's second word (its colour)."""

    def groups(self, record):
        return [record.text.split()[1]]


class _GroupedPlugin:
    @hookimpl
    def drpo_register_rankers(self, register):
        # units declared at registration, as ImageReward's x10 will be
        register("tiny-grouped", lambda o, c: GroupedBrightness(), units=Units(10), summary="brightness by colour")


# -- the interval, by hand -----------------------------------------------------------------------------

#: Student t, 97.5th percentile, 2 degrees of freedom, from a printed t table (4.303 to three decimals)
T_975_2 = 4.302652729911275
BASE = np.array([[1.0, 3.0], [2.0, 2.0], [4.0, 0.0]])  # 3 prompts x 2 seeds
FINETUNED = np.array([[2.0, 4.0], [2.0, 4.0], [5.0, 3.0]])


def test_the_interval_is_a_t_interval_over_prompts_of_the_per_prompt_mean_difference():
    # differences per (prompt, seed): [1, 1], [0, 2], [1, 3]; per prompt: d = 1, 1, 2
    # diff = (1 + 1 + 2) / 3 = 4/3 (also the mean of the six pair differences: 8/6)
    # sd(d, ddof=1): deviations -1/3, -1/3, 2/3; squares 1/9 + 1/9 + 4/9 = 6/9; / (3 - 1) = 1/3; sd = sqrt(1/3)
    # standard error sd / sqrt(3) = sqrt(1/9) = 1/3; half width = t(0.975, 2) / 3 = 1.4342175766...
    found = paired_difference(BASE, FINETUNED)
    assert found.diff == pytest.approx(4 / 3, abs=1e-12)
    assert found.ci_low == pytest.approx(4 / 3 - T_975_2 / 3, abs=1e-9)  # -0.10088424...
    assert found.ci_high == pytest.approx(4 / 3 + T_975_2 / 3, abs=1e-9)  # 2.76755091...
    assert (found.prompts, found.confidence) == (3, 0.95)
    # treating the six pairs as independent would be narrower: sd of [1, 1, 0, 2, 1, 3] / sqrt(6) with 5 dof
    assert found.ci_high - found.diff > 2.571 * np.std([1, 1, 0, 2, 1, 3], ddof=1) / math.sqrt(6)
    one = paired_difference(BASE[:1], FINETUNED[:1])
    assert one.diff == 1.0 and one.ci_low is None and one.ci_high is None


def test_the_report_is_in_the_rankers_units_with_population_std_and_groups():
    records = [PromptRecord("a red apple"), PromptRecord("a red car"), PromptRecord("a blue car")]
    ranker = EvalRanker("tiny-grouped", GroupedBrightness(), Units(100))
    report = build_report(prompts={"set": "x"}, seeds=[42, 43], sides={"base": "b", "finetuned": "f"}, device="cpu",
                          records=records, rankers=[ranker], scores={"base": {"tiny-grouped": BASE},
                                                                     "finetuned": {"tiny-grouped": FINETUNED}})
    entry = report["rankers"]["tiny-grouped"]
    assert (entry["units"], entry["scale"], report["images_per_side"]) == ("x100", 100, 6)
    # base: mean (1+3+2+2+4+0)/6 = 2; squared deviations 1+1+0+0+4+4 = 10; population std sqrt(10/6)
    assert entry["base"] == pytest.approx({"mean": 200.0, "std": 100 * math.sqrt(10 / 6), "n": 6})
    # finetuned: mean 20/6; squared deviations (16 + 4 + 16 + 4 + 25 + 1)/9 = 66/9; / 6 -> 11/9
    assert entry["finetuned"] == pytest.approx({"mean": 100 * 20 / 6, "std": 100 * math.sqrt(11 / 9), "n": 6})
    assert entry["diff"] == pytest.approx(400 / 3)
    assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((400 / 3 - 100 * T_975_2 / 3,
                                                                 400 / 3 + 100 * T_975_2 / 3))
    # groups: "red" = prompts 0 and 1 (d = 1, 1: no spread, a zero-width interval), "blue" = prompt 2 alone
    red, blue = entry["groups"]["red"], entry["groups"]["blue"]
    assert red["base"] == pytest.approx({"mean": 200.0, "std": 100 * math.sqrt(2 / 4), "n": 4})
    assert (red["diff"], red["ci_low"], red["ci_high"]) == pytest.approx((100.0, 100.0, 100.0))
    assert blue["diff"] == pytest.approx(200.0) and blue["ci_low"] is None
    assert report["ci_method"].startswith("paired by (prompt, seed); Student t over prompts")
    assert "mean_of_groups" not in entry
    # GenEval's Overall: every group weighs the same. red: base (1+3+2+2)/4 = 2, finetuned (2+4+2+4)/4 = 3;
    # blue: base (4+0)/2 = 2, finetuned (5+3)/2 = 4. Mean of groups: base 2, finetuned 3.5 (images: 20/6)
    tasks = EvalRanker("tiny-grouped", GroupedBrightness(), Units(100, mean_of_groups=True))
    overall = build_report(prompts={"set": "x"}, seeds=[42, 43], sides={"base": "b", "finetuned": "f"}, device="cpu",
                           records=records, rankers=[tasks], scores={"base": {"tiny-grouped": BASE},
                                                                     "finetuned": {"tiny-grouped": FINETUNED}})
    assert overall["rankers"]["tiny-grouped"]["mean_of_groups"] == pytest.approx(
        {"base": 200.0, "finetuned": 350.0, "diff": 150.0})


# -- prompts, seeds and the device ---------------------------------------------------------------------


def test_shipped_prompt_sets_and_a_seeded_limit_keep_each_prompts_position():
    full = select_prompts("pickscore-test")
    assert full.total == 2048 and full.ids == list(range(2048))
    assert select_prompts("parti").total == 1632 and select_prompts("geneval").total == 553
    few = select_prompts("pickscore-test", limit=16)
    assert len(few.records) == 16 and few.ids == sorted(few.ids)
    assert [full.records[i].text for i in few.ids] == [r.text for r in few.records]
    assert set(select_prompts("pickscore-test", limit=8).ids) <= set(few.ids)  # a larger limit keeps the smaller
    counting = select_prompts("pkg://drpo_geneval/data/eval_counting.jsonl")  # as recipes name packaged files
    assert counting.total == 80 and all(r.metadata["tag"] == "counting" for r in counting.records)


def test_protocol_noise_is_keyed_by_seed_times_a_million_plus_prompt_id():
    expected = torch.randn(3, 4, generator=torch.Generator().manual_seed(43 * 10**6 + 7))
    assert torch.equal(protocol_noise((3, 4), 7, 43), expected)
    assert not torch.equal(protocol_noise((3, 4), 8, 43), expected)


def test_auto_is_the_best_device_here(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert best_device() == "cpu" and resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert best_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert best_device() == "cuda"


# -- end to end on tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry():
    previous = registry_module._default
    registry = make_registry(drpo_diffusers, drpo_clip_rankers, drpo_image_rankers, _GroupedPlugin())
    registry_module.set_registry(registry)
    yield registry
    registry_module.set_registry(previous)


@pytest.fixture(scope="module")
def tiny_rankers(tmp_path_factory):
    return build_tiny_rankers(tmp_path_factory.mktemp("eval-rankers"))


def ranker_flags(tiny):
    """The paper's four rankers on tiny weights, their options given as `drpo eval` takes them."""
    options = {
        "pickscore": {"model": tiny["clip"], "processor": tiny["clip"]},
        "clip": {"model": tiny["clip"]},
        "aesthetic": {"model": tiny["clip"], "head": tiny["head"]},
        "hpsv2": {"checkpoint": HPS_DATA / "open_clip_tiny.safetensors", "tokenizer": tiny["tokenizer"],
                  "vision_head_width": 20, "text_head_width": 16},
    }
    flags = [f"--set=rankers.{name}.{key}={value}" for name, found in options.items() for key, value in found.items()]
    return flags, options


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_dirs, registry):
    """A run of the tiny SD-Turbo with random LoRA weights, its recipe naming the pipeline by a relative path."""
    return make_tiny_run(tmp_path_factory.mktemp("eval-run"), tiny_dirs["sd"], PROMPTS)


def expected_scores(run, options, registry):
    """Each side's scores computed here directly: the run's generator on the protocol noise, each ranker built
    from its options; ``{side: {ranker: (prompts, seeds)}}`` in raw units."""
    _, generator = load_generator(run)
    rankers = {name: registry.build("ranker", name, {k: str(v) if isinstance(v, Path) else v for k, v in opts.items()},
                                    BuildContext()) for name, opts in options.items()}
    found = {side: {name: np.zeros((len(PROMPTS), len(SEEDS))) for name in rankers} for side in ("base", "finetuned")}
    for p, prompt in enumerate(PROMPTS):
        for s, seed in enumerate(SEEDS):
            noise = protocol_noise(generator.noise_shape, p, seed)[None]
            with torch.no_grad():
                images = {"base": generator.decode(generator.reference([prompt], noise)).clamp(0, 1),
                          "finetuned": generator.decode(generator.sample([prompt], noise)).clamp(0, 1)}
                for side, image in images.items():
                    for name, ranker in rankers.items():
                        found[side][name][p, s] = float(ranker.score(image, [prompt], [None])[0])
    return found


def test_eval_of_a_run_reports_both_sides_in_paper_units(tiny_run, tiny_rankers, registry, tmp_path):
    flags, options = ranker_flags(tiny_rankers)
    prompts = tiny_run.parent / "prompts.txt"
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_run), "--prompts", str(prompts), "--seeds", "42-43",
                                      "--ranker", "pickscore", "--ranker", "clip", "--ranker", "aesthetic",
                                      "--ranker", "hpsv2", "--ranker", "tiny-grouped", *flags, "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["seeds"] == [42, 43] and report["images_per_side"] == 6 and report["device"] == "cpu"
    assert report["sides"]["finetuned"] == f"{tiny_run} (step-000001)"
    expected = expected_scores(tiny_run, options, registry)
    units = {"pickscore": 100, "clip": 100, "aesthetic": 1, "hpsv2": 100}
    for name, scale in units.items():
        entry = report["rankers"][name]
        assert entry["scale"] == scale and entry["units"] == ("raw" if scale == 1 else "x100")
        base, finetuned = scale * expected["base"][name], scale * expected["finetuned"][name]
        assert entry["base"]["mean"] == pytest.approx(base.mean(), abs=1e-4 * scale)
        assert entry["base"]["std"] == pytest.approx(base.std(), abs=1e-4 * scale)
        assert entry["finetuned"]["mean"] == pytest.approx(finetuned.mean(), abs=1e-4 * scale)
        assert entry["diff"] == pytest.approx((finetuned - base).mean(), abs=1e-4 * scale)
        per_prompt = (finetuned - base).mean(axis=1)
        from scipy import stats

        half = stats.t.ppf(0.975, 2) * per_prompt.std(ddof=1) / math.sqrt(3)
        assert entry["ci_high"] - entry["diff"] == pytest.approx(half, abs=1e-4 * scale)
        assert entry["base"]["n"] == entry["finetuned"]["n"] == 6
    assert any(abs(report["rankers"][n]["diff"]) > 1e-3 for n in units)  # the LoRA changes the images
    grouped = report["rankers"]["tiny-grouped"]
    assert grouped["units"] == "x10" and set(grouped["groups"]) == {"blue", "red"}
    assert grouped["groups"]["red"]["base"]["n"] == 4 and grouped["groups"]["blue"]["ci_low"] is None
    stdout = result.stdout
    assert "units     pickscore x100, clip x100, aesthetic raw, hpsv2 x100, tiny-grouped x10" in stdout
    assert "Student t over prompts" in stdout and "finetuned - base" in stdout
    assert f"{report['rankers']['pickscore']['diff']:+.3g}" in stdout

    # the base alone, from the same pipeline: the run's base column, number for number
    base_out = tmp_path / "base.json"
    configured = yaml.safe_load((tiny_run / "config.yaml").read_text())["generator"]["model"]
    result = CliRunner().invoke(app, ["eval", "--generator", "sd-turbo", f"--set=generator.model={configured}",
                                      "--set", "generator.resolution=32", "--prompts", str(prompts), "--seeds", "42-43",
                                      "--ranker", "pickscore", "--ranker", "tiny-grouped", *flags[:2],
                                      "--json", str(base_out)])
    assert result.exit_code == 0, result.output
    alone = json.loads(base_out.read_text())
    assert list(alone["sides"]) == ["base"] and "diff" not in alone["rankers"]["pickscore"]
    for name in ("pickscore", "tiny-grouped"):
        assert alone["rankers"][name]["base"] == pytest.approx(report["rankers"][name]["base"], abs=1e-9)


def test_sample_draws_the_noise_eval_scores(tmp_path, isolated_registry):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\nfour\n")
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--generator", "tiny", "--prompts", str(prompts), "--limit", "2",
                                 "--seeds", "42-44", "--out", str(tmp_path / "images")])
    assert result.exit_code == 0, result.output
    assert "6 images (2 prompts x 3 seeds) on cpu" in result.output
    rows = [json.loads(line) for line in (tmp_path / "images" / "manifest.jsonl").read_text().splitlines()]
    ids = select_prompts(str(prompts), limit=2).ids
    assert [(r["prompt_id"], r["seed"]) for r in rows] == [(i, s) for i in ids for s in (42, 43, 44)]
    for name, flags in (("manifest", [str(tmp_path / "images" / "manifest.jsonl")]),
                        ("generated", ["--generator", "tiny", "--prompts", str(prompts), "--limit", "2",
                                       "--seeds", "42-44"])):
        result = runner.invoke(app, ["eval", *flags, "--ranker", "tiny-brightness", "--json",
                                     str(tmp_path / f"{name}.json")])
        assert result.exit_code == 0, result.output
    from_files = json.loads((tmp_path / "manifest.json").read_text())["rankers"]["tiny-brightness"]["images"]
    generated = json.loads((tmp_path / "generated.json").read_text())["rankers"]["tiny-brightness"]["base"]
    assert from_files["n"] == generated["n"] == 6
    assert abs(from_files["mean"] - generated["mean"]) <= 0.5 / 255  # the same images, up to 8-bit rounding


# -- bad input: one line, exit code 2 -----------------------------------------------------------------

BAD = [
    (["--generator", "tiny", "--prompts", "nope-set"], "--prompts nope-set: neither a prompt set (pickscore-test, "
                                                        "parti, geneval) nor a file"),
    (["--generator", "tiny", "--seeds", "4x"], "--seeds: seeds must look like 42-46 or 1,5,9, got '4x'"),
    (["--generator", "tiny", "--seeds", "42,43,42"], "--seeds: seed 42 is given twice"),
    (["--generator", "tiny", "--seeds", "10000000000000"], "--seeds: 10000000000000 is too large"),
    (["--generator", "tiny", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["--generator", "tiny", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["m.jsonl", "--limit", "2"], "m.jsonl: a manifest's images are made already; --prompts, --limit, --seeds do not"),
    (["--generator", "tiny", "--device", "tpu"], "--device: unknown device 'tpu'"),
    (["empty"], "empty holds no config.yaml: it is not a drpo run directory"),
    (["unweighted"], "unweighted holds no trained weights yet (no checkpoint in unweighted/checkpoints)"),
    (["unweighted", "--generator", "tiny"], "give a run directory or --generator, not both"),
    ([], "give a run directory, a manifest.jsonl or --generator NAME"),
    (["--generator", "tiny", "--set", "rankers.nope.mode=nan"], "--set rankers.nope.mode: drpo eval takes"),
    (["--generator", "tiny", "--set", "seed=3"], "--set seed: drpo eval takes generator.KEY=VALUE and rankers.NAME"),
    (["--generator", "tiny", "--set", "rankers.tiny-broken.mode=sideways"], "rankers.tiny-broken.mode: Input should"),
    (["--generator", "tiny", "--ranker", "tiny-brightness", "--ranker", "tiny-brightness"],
     "--ranker tiny-brightness is given twice"),
    (["--generator", "tiny", "--ranker", "brightnes"], "unknown ranker 'brightnes'"),
    (["--generator", "tiny", "--json", "out"], "--json out is a folder"),
    (["--generator", "tiny"], "ranker 'tiny-broken' returned a non-finite score (nan) for the base image of prompt 0 "
                              "('one') seed 42 (and 1 more in this batch)"),
    (["--generator", "tiny", "--set", "rankers.0.mode=wrong-count"], "ranker 'tiny-broken' returned 3 scores for 2"),
    (["--generator", "tiny", "--set", "rankers.tiny-broken.mode=raise"],
     "ranker 'tiny-broken' raised RuntimeError: scorer crashed"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, isolated_registry, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("one\ntwo\n")
    Path("empty").mkdir()
    Path("unweighted").mkdir()
    Path("unweighted/config.yaml").write_text("seed: 0\n")
    Path("out").mkdir()
    defaults = {"--ranker": "tiny-broken", "--seeds": "42", "--prompts": "p.txt"}  # where a case gives none
    extra = [part for flag, value in defaults.items() if flag not in args for part in (flag, value)]
    result = CliRunner().invoke(app, ["eval", *args, *extra])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert re.match(r"^Error: ", lines[0])


# -- the model card names the base model as the run's config does -------------------------------------


def test_the_exported_card_loads_the_base_model_as_written(tiny_run, tmp_path):
    from diffusers import AutoPipelineForText2Image

    configured = yaml.safe_load((tiny_run / "config.yaml").read_text())["generator"]["model"]
    assert Path(configured).is_absolute()  # the recipe's relative path, saved absolute with the run
    result = CliRunner().invoke(app, ["export", str(tiny_run), "--out", str(tmp_path / "lora")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "lora" / "README.md").read_text()
    assert f"base_model: {configured}" in card
    loaded = re.search(r'AutoPipelineForText2Image\.from_pretrained\("([^"]+)"', card).group(1)
    assert loaded == configured  # not the folder's basename: the snippet loads as written
    pipe = AutoPipelineForText2Image.from_pretrained(loaded)
    pipe.load_lora_weights(tmp_path / "lora")
    _, generator = load_generator(tiny_run)
    noise = protocol_noise(generator.noise_shape, 0, 42)[None]
    with torch.no_grad():
        ours = generator.decode(generator.sample(["a red apple"], noise))
        theirs = pipe("a red apple", num_inference_steps=1, guidance_scale=0.0, latents=noise.clone(), height=32,
                      width=32, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_offline_every_missing_model_is_named_at_once(tmp_path, monkeypatch):
    """The generator and the paper's four rankers in one line, before anything loads (not one per attempt)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(app, ["eval", "--generator", "sd-turbo", "--limit", "2", "--device", "cpu"])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: models not in the local Hugging Face cache")
    for where in ("generator.model stabilityai/sd-turbo", "rankers.pickscore.model yuvalkirstain/PickScore_v1",
                  "rankers.pickscore.processor laion/CLIP-ViT-H-14", "rankers.clip.model openai/clip-vit-large",
                  "rankers.aesthetic.model openai/clip-vit-large", "rankers.hpsv2.tokenizer laion/CLIP-ViT-H-14"):
        assert where in line
    assert line.index("generator.model") < line.index("rankers.pickscore")


def test_a_log_file_gets_whole_rows_whatever_its_width():
    import io

    from rich.console import Console

    from drpo_core.report import print_report

    records = [PromptRecord("a red apple"), PromptRecord("a red car"), PromptRecord("a blue car")]
    name = "a-ranker-with-a-rather-long-name:and-its-variant"
    report = build_report(prompts={"set": "x", "count": 3}, seeds=[42, 43], sides={"base": "b", "finetuned": "f"},
                          device="cpu", records=records, rankers=[EvalRanker(name, GroupedBrightness(), Units(100))],
                          scores={"base": {name: BASE}, "finetuned": {name: FINETUNED}})
    log = io.StringIO()
    print_report(report, Console(file=log, width=40))  # not a terminal: a file
    rows = [line for line in log.getvalue().splitlines() if line.startswith("│")]
    assert rows[0].startswith(f"│ {name} │ x100 ") and rows[0].endswith("│ [-10.1, +277]    │")  # whole
    assert len(rows) == 3  # one line per ranker and group: nothing wrapped
