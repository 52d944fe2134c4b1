"""The geneval ranker on tiny random Mask2Former, OWLv2 and CLIP models (saved and loaded with
``from_pretrained``), its recommendations, its prompts, and the headline command end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo_cli.main import app
from drpo_core.config import resolve_config
from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, ConfigError, PluginError
from drpo_core.metrics import read_metrics
from drpo_geneval.colors import ColorClassifier, load_color_classifier, object_crop
from drpo_geneval.detectors import boxes_of_masks, instances
from drpo_geneval.options import GenevalOptions
from drpo_geneval.ranker import build_ranker
from drpo_geneval.rules import Detection
from drpo_geneval.testing import build_tiny_detectors, coco_labels, make_tiny_mask2former
from drpo_geneval.training_prompts import (
    PACKAGE_COUNT,
    content,
    package_files,
    read_rows,
    training_rows,
)
from drpo_geneval.vocabulary import COLOR_TEMPLATES, COLORS, OBJECT_NAMES, TAGS, map_labels

ROOT = Path(__file__).resolve().parents[1]
EVAL_FILE = ROOT / "data" / "geneval" / "evaluation_metadata.jsonl"
PACKAGE_DATA = ROOT / "plugins" / "drpo_geneval" / "data"
COUNT_TWO = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_detectors(tmp_path_factory.getbasetemp() / "drpo_geneval_tiny")


def options(tiny, **extra):
    return GenevalOptions(detector_model=str(tiny[extra.get("detector", "mask2former")]), clip_model=str(tiny["clip"]),
                          **extra)


# ------------------------------------------------------------------------------------ vocabulary


def test_names_are_genevals_and_coco_labels_map_onto_them():
    assert OBJECT_NAMES == tuple((ROOT / "data" / "geneval" / "object_names.txt").read_text().split("\n")[:80])
    mapping = map_labels({**coco_labels(), 80: "wall-other", 81: "sky"})  # a panoptic model's stuff is left out
    assert [mapping[i] for i in range(80)] == list(OBJECT_NAMES) and 80 not in mapping
    assert map_labels({i: n.replace(" ", "_") for i, n in coco_labels().items()})[10] == "fire hydrant"
    with pytest.raises(ValueError, match=r"no label for 2 of GenEval's 80 objects \(cat, dog\)"):
        map_labels({i: n for i, n in coco_labels().items() if n not in ("cat", "dog")})
    with pytest.raises(ValueError, match=r"several labels for tv \(tv, tvmonitor\)"):
        map_labels({**coco_labels(), 80: "tvmonitor"})


def test_a_detector_without_genevals_objects_is_one_clear_error(tmp_path, tiny):
    ade = make_tiny_mask2former(tmp_path / "ade", labels={i: f"thing{i}" for i in range(80)})
    with pytest.raises(PluginError, match=r"^ranker 'geneval': detector_model .* does not detect GenEval's objects: "
                                          r"no label for 80 of GenEval's 80 objects") as error:
        build_ranker(GenevalOptions(detector_model=str(ade), clip_model=str(tiny["clip"])), BuildContext())
    assert "\n" not in str(error.value)


# -------------------------------------------------------------------------------------- detectors


def test_boxes_come_from_masks():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 5, 7] = True
    assert boxes_of_masks(masks).tolist() == [[2, 1, 5, 3], [7, 5, 8, 6], [0, 0, 0, 0]]


def test_instances_match_transformers_post_processing_where_it_is_exact(tiny):
    """At 384 px (the size transformers' post-processing resamples to) with its defaults relaxed, the
    instances are transformers': same labels, scores and masks."""
    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    model = Mask2FormerForUniversalSegmentation.from_pretrained(tiny["mask2former"]).eval()
    processor = Mask2FormerImageProcessorPil.from_pretrained(tiny["mask2former"])
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0)))
    theirs = processor.post_process_instance_segmentation(outputs, threshold=0.0, return_binary_maps=True,
                                                          target_sizes=[(384, 384)])[0]
    ours = instances(outputs.class_queries_logits[0], outputs.masks_queries_logits[0], coco_labels(), (384, 384),
                     (384, 384), (384, 384), min_score=0.0, max_per_image=model.config.num_queries)
    names = {i: OBJECT_NAMES[i] for i in range(80)}
    expected = sorted((names[s["label_id"]], round(s["score"], 5), theirs["segmentation"][k].bool().sum().item())
                      for k, s in enumerate(theirs["segments_info"]))
    got = sorted((cls, round(x.score, 5), int(x.mask.sum())) for cls, xs in ours.items() for x in xs)
    assert len(got) == len(expected) > 0
    assert got == expected
    # its default threshold (0.5) keeps none of these random instances; GenEval counts from 0.3
    assert processor.post_process_instance_segmentation(outputs)[0]["segments_info"] == []


def test_instances_map_masks_back_through_padding_and_resizing():
    # one query, one class: its mask covers the left half of the valid (unpadded) 32x48 region of a 64x64 input
    class_logits = torch.tensor([[5.0, -5.0]])
    mask_logits = torch.full((1, 64, 64), -10.0)
    mask_logits[0, :32, :24] = 10.0
    found = instances(class_logits, mask_logits, {0: "dog"}, (64, 64), (32, 48), (64, 96), min_score=0.3)
    (dog,) = found["dog"]
    assert dog.box == (0.0, 0.0, 48.0, 64.0)  # half the width of the 64x96 picture, all its height
    assert dog.mask.shape == (64, 96) and dog.score == pytest.approx(float(torch.tensor([5.0, -5.0]).softmax(0)[0]), abs=1e-3)


def test_mask2former_ranker_end_to_end_on_a_tiny_model(tiny):
    ranker = build_ranker(options(tiny, threshold=0.0, counting_threshold=0.0), BuildContext(variant="counting"))
    assert ranker._colors is None  # no colour task: CLIP waits until a colour clause needs it
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    pictures = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    found = ranker.detector.detect(pictures, 0.0)
    assert len(found) == 2 and found[0]
    for cls, detections in found[0].items():
        assert cls in OBJECT_NAMES
        for x in detections:
            assert 0 < x.score <= 1 and x.mask.shape == (48, 40) and x.mask.any()
            rows, cols = np.nonzero(x.mask)
            assert x.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    images[1, 0, 0, 0] = float("nan")
    scores = ranker.score(images, ["a", "b"], [COUNT_TWO, COUNT_TWO])
    assert scores[0].item() in (0.0, 1.0) and scores[1].isnan()
    with pytest.raises(ComponentError, match="prompt 'b': no GenEval metadata"):
        ranker.score(images, ["a", "b"], [COUNT_TWO, None])


def test_owlv2_ranker_end_to_end_on_a_tiny_model(tiny):
    ranker = build_ranker(options(tiny, detector="owlv2", threshold=0.0), BuildContext(variant="colors"))
    assert ranker._colors is not None
    pictures = [Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))]
    (found,) = ranker.detector.detect(pictures, 0.0)
    assert found and set(found) <= set(OBJECT_NAMES)
    for x in (x for xs in found.values() for x in xs):
        assert 0 < x.score <= 1 and x.mask is None
        assert 0 <= x.box[0] <= x.box[2] <= 56 and 0 <= x.box[1] <= x.box[3] <= 40
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert ranker.score(torch.rand(1, 3, 40, 56), ["a red car"], [meta]).item() in (0.0, 1.0)


# ------------------------------------------------------------------------------------------ colour


def test_colour_weights_average_the_normalised_templates(tiny):
    classifier = load_color_classifier(str(tiny["clip"]), BuildContext(), torch.device("cpu"), torch.float32, 4, "#999")
    texts = [t.format(c=c, cls="car") for c in COLORS for t in COLOR_TEMPLATES]
    tokens = classifier.text.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeds = classifier.model.get_text_features(**tokens)
    embeds = getattr(embeds, "pooler_output", embeds)
    expected = torch.nn.functional.normalize(
        torch.nn.functional.normalize(embeds, dim=-1).reshape(10, 3, -1).mean(1), dim=-1)
    torch.testing.assert_close(classifier.weights("car"), expected, atol=1e-5, rtol=0)
    picture = Image.new("RGB", (20, 20), (255, 0, 0))
    detection = Detection(0.9, (2, 2, 12, 8))
    (colour,) = classifier.classify([(picture, detection, "car")])
    pixels = classifier.image_processor(images=[picture.crop((2, 2, 12, 8))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feature = classifier.model.get_image_features(pixel_values=pixels)
    feature = torch.nn.functional.normalize(getattr(feature, "pooler_output", feature), dim=-1)[0]
    assert colour == COLORS[int((expected @ feature).argmax())]


def test_the_crop_paints_outside_the_mask_grey_and_rounds_the_box():
    picture = Image.new("RGB", (10, 10), (255, 0, 0))
    mask = np.zeros((10, 10), dtype=bool)
    mask[3:6, 3:6] = True
    crop = np.asarray(object_crop(picture, Detection(1.0, (2.6, 1.6, 6.4, 5.2), None, mask), Image.new("RGB", (10, 10), "#999")))
    assert crop.shape == (3, 3, 3)  # x 3..6, y 2..5 after rounding
    assert (crop[0] == 153).all() and (crop[1:] == [255, 0, 0]).all()
    thin = object_crop(picture, Detection(1.0, (4.0, 4.0, 4.2, 4.1)), picture)
    assert thin.size == (1, 1)
    assert isinstance(ColorClassifier, type)


# ------------------------------------------------------------------------------------------- offline


def test_offline_the_ranker_names_every_missing_model_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))  # read when the cache is looked up
    with pytest.raises(PluginError) as error:
        build_ranker(GenevalOptions(), BuildContext(variant="colors"))
    message = str(error.value)
    assert "\n" not in message
    assert ("hf download facebook/mask2former-swin-small-coco-instance && hf download openai/clip-vit-large-patch14"
            in message)
    with pytest.raises(PluginError, match=r"\(hf download facebook/mask2former-swin-small-coco-instance\)"):
        build_ranker(GenevalOptions(), BuildContext(variant="counting"))  # counting prompts need no CLIP
    with pytest.raises(PluginError, match="^ranker 'geneval-soft': models not in the local"):
        build_ranker(GenevalOptions(), BuildContext(variant="counting"), soft=True)


# ------------------------------------------------------------------------------------------- prompts


def test_training_prompts_never_repeat_an_evaluation_prompt():
    evaluation = read_rows(EVAL_FILE)
    assert len(evaluation) == 553
    texts, contents = {r["prompt"] for r in evaluation}, {content(r) for r in evaluation}
    for tag in TAGS:
        rows = training_rows(tag, 10_000 if tag in ("single_object", "counting", "colors") else 500, 0, evaluation)
        assert len({r["prompt"] for r in rows}) == len(rows)
        assert not texts & {r["prompt"] for r in rows}
        if tag != "single_object":
            assert not contents & {content(r) for r in rows}
        assert all(r["tag"] == tag and list(r)[0] == "tag" and list(r)[-1] == "prompt" for r in rows)
    assert len(training_rows("counting", 10_000, 0, evaluation)) == 3 * 80 - 80  # counts 2-4, minus GenEval's 80
    assert len(training_rows("single_object", 10_000, 0, evaluation)) == 4 * 80  # other wordings only


def test_the_same_clauses_in_another_order_are_the_same_content():
    bird, scissors = {"class": "bird", "count": 1}, {"class": "scissors", "count": 1}
    assert content({"include": [bird, scissors]}) == content({"include": [scissors, bird]})  # two objects
    left_of = {**scissors, "position": ["left of", 0]}
    assert content({"include": [bird, left_of]}) != content({"include": [left_of, bird]})  # index 0 is the bird


def test_training_prompts_follow_genevals_grammar_and_seed():
    rows = {tag: training_rows(tag, 40, 3, []) for tag in TAGS}
    assert rows == {tag: training_rows(tag, 40, 3, []) for tag in TAGS}
    assert rows != {tag: training_rows(tag, 40, 4, []) for tag in TAGS}
    for row in rows["counting"]:
        (clause,), (limit,) = row["include"], row["exclude"]
        assert limit == {"class": clause["class"], "count": clause["count"] + 1} and 2 <= clause["count"] <= 4
    for row in rows["position"]:
        target, obj = row["include"]
        assert row["prompt"] == f"a photo of {'an' if obj['class'][0] in 'aeiou' else 'a'} {obj['class']} " \
                                f"{obj['position'][0]} {'an' if target['class'][0] in 'aeiou' else 'a'} {target['class']}"
    for row in rows["color_attr"] + rows["colors"]:
        assert all(c["class"] != "person" and c["color"] in COLORS for c in row["include"])
    assert any(r["prompt"] == "a photo of three buses" for r in training_rows("counting", 500, 0, []))


def test_the_shipped_prompt_files_are_the_generated_ones():
    evaluation = read_rows(EVAL_FILE)
    expected = package_files(evaluation)
    assert sorted(p.name for p in PACKAGE_DATA.glob("*.jsonl")) == sorted(expected)
    for name, rows in expected.items():
        assert read_rows(PACKAGE_DATA / name) == rows, name
    assert sum(len(expected[f"eval_{t}.jsonl"]) for t in TAGS) == 553
    assert len(expected["train_two_object.jsonl"]) == PACKAGE_COUNT


def test_prompts_command_writes_refuses_to_overwrite_and_names_bad_tags(tmp_path):
    out = tmp_path / "train.jsonl"
    result = CliRunner().invoke(app, ["geneval", "prompts", str(out), "--tag", "counting", "--count", "7"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert rows == training_rows("counting", 7, 0, read_rows(EVAL_FILE))
    again = CliRunner().invoke(app, ["geneval", "prompts", str(out)])
    assert again.exit_code == 2 and "exists" in again.output and read_rows(out) == rows
    bad = CliRunner().invoke(app, ["geneval", "prompts", str(tmp_path / "x.jsonl"), "--tag", "count"])
    assert bad.exit_code == 2 and "unknown task 'count'" in bad.output
    absent = CliRunner().invoke(app, ["geneval", "prompts", str(tmp_path / "y.jsonl"), "--avoid", str(tmp_path / "no")])
    assert absent.exit_code == 2 and f"Error: --avoid: prompt file not found: {tmp_path / 'no'}" in absent.output


@pytest.mark.parametrize("ranker, key, assignment", [
    ("geneval:counting", "prompts.path", "prompts.path=prompts.txt"),
    ("geneval-soft", "prompts.path", "prompts.path=prompts.txt"),
    ("geneval:counting", "prompts.eval_path", "prompts.eval_path=prompts.txt"),
])
def test_prompt_files_without_geneval_clauses_are_refused_before_loading(ranker, key, assignment, builtin_registry):
    with pytest.raises(ConfigError) as error:  # told by the file's suffix: nothing is read
        resolve_config(flags={"generator": "sd-turbo", "rankers": ranker}, assignments=[assignment],
                       registry=builtin_registry)
    assert str(error.value).startswith(f"{key}: ranker '{ranker.split(':')[0]}' scores against geneval prompt records")
    assert "is read as text" in str(error.value)


def test_a_geneval_evaluation_ranker_needs_geneval_evaluation_prompts(builtin_registry):
    with pytest.raises(ConfigError, match="prompts.eval_path: ranker 'geneval' scores against geneval prompt"):
        resolve_config(flags={"generator": "sd-turbo", "rankers": "brightness"}, registry=builtin_registry,
                       assignments=["prompts.path=prompts.txt", "prompts.eval_path=prompts.txt",
                                    "eval.rankers=[geneval]"])


# ------------------------------------------------------------------------------------- the headline


def test_the_headline_resolves_to_the_binary_rollout_on_the_tasks_prompts(builtin_registry):
    resolved = resolve_config(flags={"generator": "sdxl-turbo", "rankers": "geneval:counting"}, registry=builtin_registry)
    cfg, origins = resolved.config, resolved.origins
    assert cfg.prompts.path == "pkg://drpo_geneval/data/train_counting.jsonl"
    assert cfg.prompts.eval_path == "pkg://drpo_geneval/data/eval_counting.jsonl" and cfg.prompts.eval_count == "all"
    assert (cfg.selection.rollout_rounds, cfg.selection.positives, cfg.selection.negatives) == (4, 8, 8)
    assert cfg.selection.candidates == 16 and origins["selection.candidates"] == "generator sdxl-turbo"
    assert origins["prompts.path"] == "ranker geneval:counting"
    plain = resolve_config(flags={"generator": "sd-turbo", "rankers": "geneval"}, registry=builtin_registry).config
    assert plain.prompts.path.endswith("/train.jsonl") and plain.selection.candidates == 24


def test_the_graded_ranker_recommends_the_tasks_prompts_and_not_the_binary_rollout(builtin_registry):
    resolved = resolve_config(flags={"generator": "sd-turbo", "rankers": "geneval-soft:counting"},
                              registry=builtin_registry)
    recommended = {key for key, origin in resolved.origins.items() if origin.startswith("ranker ")}
    assert recommended == {"prompts.path", "prompts.eval_path", "prompts.eval_count"}
    assert resolved.config.prompts.path.endswith("train_counting.jsonl")


def tiny_headline_args(tiny_dirs, tiny, run_dir):
    sets = {"generator.model": tiny_dirs["sdxl"], "generator.resolution": 32, "rankers.0.clip_model": tiny["clip"],
            "rankers.0.detector": "drpo_geneval.testing:stub_detector", "selection.candidates": 4,
            "selection.positives": 1, "selection.negatives": 1, "train.steps": 3, "train.grad_accum": 1,
            "train.mixed_precision": "no", "train.lr": 1e-3, "prompts.eval_count": 3, "eval.seeds": "0-1",
            "log.progress": "false"}
    args = ["train", "--generator", "sdxl-turbo", "--ranker", "geneval:counting", "--output-dir", str(run_dir)]
    return args + [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]


def test_the_headline_command_trains_on_tiny_models(tmp_path, tiny_dirs, tiny):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, tiny_headline_args(tiny_dirs, tiny, run_dir))
    assert result.exit_code == 0, result.output
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert len(metrics) == 3
    assert sum(m["prompts"] for m in metrics) > 0  # the stub detector makes some candidates right, some wrong
    assert all(m["prompts"] + m["skip_rollout"] + m["skip_failure"] == 1 for m in metrics)
    weights = load_file(run_dir / "checkpoints" / "step-000003" / "trainable.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # LoRA's B starts at zero: it was trained
    evaluations = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert "score/geneval:counting/counting" in evaluations[-1]  # accuracy per task
    config = (run_dir / "config.yaml").read_text()
    assert "train_counting.jsonl" in config and "rollout_rounds: 4" in config
    # drpo eval on the run: GenEval's prompts, accuracy in percent per task, base and fine-tune side by side
    report = tmp_path / "eval.json"
    evaluated = CliRunner().invoke(app, [
        "eval", str(run_dir), "--ranker", "geneval", "--prompts", "geneval", "--limit", "12", "--seeds", "42-43",
        "--set", "rankers.geneval.detector=drpo_geneval.testing:stub_detector",
        "--set", f"rankers.geneval.clip_model={tiny['clip']}", "--device", "cpu", "--json", str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    entry = json.loads(report.read_text())["rankers"]["geneval"]
    assert entry["units"] == "%" and entry["scale"] == 100
    groups = entry["groups"]
    assert set(groups) <= set(TAGS) and sum(g["finetuned"]["n"] for g in groups.values()) == 12 * 2
    for side in ("base", "finetuned"):  # percent correct: the mean of 0/1 scores x100, per task and overall
        assert 0 <= entry[side]["mean"] <= 100 and all(0 <= g[side]["mean"] <= 100 for g in groups.values())
        overall = sum(g[side]["mean"] * g[side]["n"] for g in groups.values()) / entry[side]["n"]
        assert overall == pytest.approx(entry[side]["mean"])
        # GenEval's Overall: the mean of the tasks' accuracies
        assert entry["mean_of_groups"][side] == pytest.approx(sum(g[side]["mean"] for g in groups.values())
                                                              / len(groups))
    assert "mean of groups" in evaluated.output


def test_the_headline_command_without_weights_fails_in_one_line_naming_them(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "DRPO_CACHE": str(tmp_path / "drpo")}
    env.pop("HF_HUB_CACHE", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "drpo_cli.main", "train", "--generator", "sdxl-turbo", "--ranker",
                             "geneval:counting", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0]
    # every missing model in the one line, before any loads: not the generator now, the detector next time
    assert ("generator.model stabilityai/sdxl-turbo, rankers.0.detector_model facebook/mask2former-swin-small-coco-"
            "instance; download first (hf download stabilityai/sdxl-turbo && hf download facebook/mask2former-swin-"
            "small-coco-instance)") in lines[0]
    assert elapsed < 60 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, binary", [("geneval:counting", True), ("geneval-soft:counting", False)])
def test_both_rankers_build_through_the_registry_with_their_kind(builtin_registry, tiny, name, binary):
    spec_options = GenevalOptions(detector="drpo_geneval.testing:stub_detector", clip_model=str(tiny["clip"]))
    ranker = builtin_registry.build("ranker", name, spec_options, BuildContext(variant="counting"), "rankers.0")
    assert ranker.binary is binary
    images = torch.zeros(2, 3, 16, 16)
    images[1, 0, 0, :2] = 1 / 255  # mean 2/768 of 255: the stub sees 3 objects there, 1 in the black picture
    scores = ranker.score(images, ["two clocks"] * 2, [COUNT_TWO] * 2).tolist()
    assert scores == ([0.0, 0.0] if binary else [0.5, 0.5])
    three = {"tag": "counting", "include": [{"class": "clock", "count": 3}], "exclude": [{"class": "clock", "count": 4}]}
    assert ranker.score(images, ["three clocks"] * 2, [three] * 2).tolist() == [0.0 if binary else 0.5, 1.0]
