"""The ``hpsv3`` ranker (drpo_hpsv3) against the original hpsv3 package: golden data that
tests/data/hpsv3/make_golden.py computed with upstream's own inference code (hpsv3 1.0.0, transformers
4.45.2) on a tiny Qwen2-VL with seeded random weights; our port loads the same weights (upstream's key
layout) on current transformers and must give the same token ids, pixels and (mu, sigma).

Tolerances: scores 1e-4 (the issue's bar; measured at most 6.7e-6, float32 on the CPU, other attention
kernels); pixel values 1e-5 (measured: identical); bf16 against upstream's bf16 run 0.15 (measured 0.070).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import drpo_hpsv3
from drpo_core.context import BuildContext
from drpo_core.errors import AssetError, ComponentError, ConfigError, PluginError
from drpo_core.model_rankers import to_pictures
from drpo_hpsv3.processing import ImagePatching, smart_resize
from tests.conftest import make_registry

DATA = Path(__file__).parent / "data" / "hpsv3"
GOLDEN = json.loads((DATA / "golden.json").read_text())
TENSORS = load_file(str(DATA / "golden_tensors.safetensors"))
CHECKPOINT = DATA / "hpsv3_tiny.safetensors"
OPTIONS = {"checkpoint": str(CHECKPOINT), "base": str(DATA / "base")}
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def registry():
    return make_registry(drpo_hpsv3)


@pytest.fixture(scope="module")
def ranker(registry):
    return registry.build("ranker", "hpsv3", OPTIONS, BuildContext())


def golden_images():
    """The PNG files as the float images a generator hands a ranker, (1, 3, H, W) each."""
    arrays = [np.array(Image.open(DATA / "images" / name).convert("RGB")) for name in GOLDEN["images"]]
    return [torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255 for a in arrays]


def golden_pictures():
    return [to_pictures(image)[0] for image in golden_images()]


# -- parity with the original package ---------------------------------------------------------------------


def test_token_ids_and_image_grids_are_upstreams(ranker):
    batch = ranker.inputs(golden_pictures(), GOLDEN["prompts"])
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    assert ids == GOLDEN["input_ids"]
    assert batch["input_ids"].shape[1] == GOLDEN["padded_length"]
    assert batch["image_grid_thw"].tolist() == GOLDEN["image_grid_thw"]
    assert ranker.reward_token_id == GOLDEN["reward_token_id"]
    # padded on the right, as upstream's processor (padding_side "right")
    assert GOLDEN["padding_side"] == "right"
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"][:, -1].all()
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == [t * h * w // 4 for t, h, w in GOLDEN["image_grid_thw"]]


def test_pixel_values_are_upstreams(ranker):
    pixels = ranker.inputs(golden_pictures(), GOLDEN["prompts"])["pixel_values"]
    torch.testing.assert_close(pixels.sum(dim=1), TENSORS["pixel_row_sums"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels[::97], TENSORS["pixel_rows"], rtol=0, atol=1e-5)


def test_a_padded_batch_of_mixed_length_prompts_scores_as_upstream(ranker):
    rewards = ranker.rewards(golden_pictures(), GOLDEN["prompts"])
    torch.testing.assert_close(rewards, torch.tensor(GOLDEN["batched"]), rtol=0, atol=SCORE_TOLERANCE)
    assert rewards.dtype == torch.float32
    # the scores are far apart relative to the tolerance: the comparison means something
    assert torch.tensor(GOLDEN["batched"])[:, 0].diff().abs().min() > 0.1


def test_one_by_one_scores_as_upstream_and_as_in_a_batch(ranker):
    single = torch.stack([ranker.score(image, [prompt], [None])
                          for image, prompt in zip(golden_images(), GOLDEN["prompts"], strict=True)]).flatten()
    torch.testing.assert_close(single, torch.tensor(GOLDEN["single"])[:, 0], rtol=0, atol=SCORE_TOLERANCE)
    torch.testing.assert_close(torch.tensor(GOLDEN["single"]), torch.tensor(GOLDEN["batched"]), rtol=0, atol=1e-5)


def test_score_takes_images_batched_with_every_prompt(ranker):
    image = golden_images()[0]
    prompts = GOLDEN["prompts"]
    scores = ranker.score(image.expand(len(prompts), -1, -1, -1), prompts, [None] * len(prompts))
    torch.testing.assert_close(scores, torch.tensor(GOLDEN["same_image_every_prompt"]), rtol=0, atol=SCORE_TOLERANCE)
    # batch_size smaller than the batch: chunks give the same scores
    ranker.batch_size = 3
    try:
        chunked = ranker.score(image.expand(len(prompts), -1, -1, -1), prompts, [None] * len(prompts))
    finally:
        ranker.batch_size = 4
    torch.testing.assert_close(chunked, scores, rtol=0, atol=1e-5)
    every = ranker.rewards(golden_pictures(), [prompts[1]] * len(prompts))[:, 0]
    torch.testing.assert_close(every, torch.tensor(GOLDEN["every_image_one_prompt"]), rtol=0, atol=SCORE_TOLERANCE)


def test_hpsv3_positions_are_one_dimensional(ranker):
    # what current transformers does by default (3-D M-RoPE positions from mm_token_type_ids) is not what
    # HPSv3 was trained with: its scores differ from upstream's, ours do not
    batch = ranker.inputs(golden_pictures()[:1], GOLDEN["prompts"][:1])
    with torch.no_grad():
        hidden = ranker.backbone(**batch, use_cache=False).last_hidden_state
        mrope = ranker.head(hidden[0, ranker.reward_positions(batch["input_ids"])].float())[:, 0]
    assert (mrope - GOLDEN["single"][0][0]).abs().item() > 1e-2


# -- processing by hand ------------------------------------------------------------------------------------


def test_smart_resize_by_hand():
    area = 256 * 28 * 28
    # 512x512 (SD-Turbo): 504x504 rounded is too large; beta = 512/448 exactly, floor gives 448x448
    assert smart_resize(512, 512, 28, area, area) == (448, 448)
    # 1024x768: beta = sqrt(1024*768/200704) = 1.9795; 517.3 -> 504, 387.97 -> 364 (floor to 28)
    assert smart_resize(1024, 768, 28, area, area) == (504, 364)
    # 64x64: too small; beta = 7, ceil(448/28)*28 = 448
    assert smart_resize(64, 64, 28, area, area) == (448, 448)
    # 100x60: beta = sqrt(200704/6000) = 5.7836; ceil(578.4/28)*28 = 588, ceil(347.0/28)*28 = 364 (upstream's
    # grid for image2.png: 42x26 patches)
    assert smart_resize(100, 60, 28, area, area) == (588, 364)
    with pytest.raises(ComponentError, match="aspect ratio up to 200"):
        smart_resize(1, 201, 28, area, area)


def test_patching_matches_transformers_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    patching = ImagePatching()
    processor = Qwen2VLImageProcessorPil.from_pretrained(DATA / "base")
    for picture in golden_pictures()[:3]:
        resized = patching.resized(picture)
        ours, grid = patching.patches(resized)
        theirs = processor(images=[resized], return_tensors="pt")
        assert [list(grid)] == theirs["image_grid_thw"].tolist()
        torch.testing.assert_close(ours, theirs["pixel_values"], rtol=0, atol=1e-6)


def test_patch_layout_by_hand():
    # a 28x28 image of value = 1000*channel + column: one merge window of 2x2 patches; row 1 is the patch at
    # (y 0, x 1), whose first values are channel 0, frame 0, y 0, x 14..27; the two frames are equal
    image = (torch.arange(3)[:, None, None] * 1000 + torch.arange(28)[None, None, :]).float().expand(3, 28, 28)
    rows, grid = ImagePatching().patchify(image)
    assert grid == (1, 2, 2) and rows.shape == (4, 3 * 2 * 14 * 14)
    assert rows[1, :14].tolist() == list(range(14, 28))
    frames = rows.view(4, 3, 2, 14, 14)
    assert torch.equal(frames[:, :, 0], frames[:, :, 1])
    assert frames[2, 2, 0, 0, 0].item() == 2000  # patch (y 1, x 0), channel 2, column 0


# -- the differentiable path --------------------------------------------------------------------------------


def test_the_tensor_path_equals_the_picture_path_without_resizing(ranker):
    # 8-bit images already 448x448: no resize, so the two paths differ only in float rounding
    pictures = [ImagePatching().resized(golden_pictures()[0])] * 2
    images = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pictures])
    prompts = GOLDEN["prompts"][:2]
    pixels, grid = ranker.patching.tensor_pixel_values(images)
    torch.testing.assert_close(pixels, ranker.inputs(pictures, prompts)["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        tensor_scores = ranker.score_differentiable(images, prompts)
    torch.testing.assert_close(tensor_scores, ranker.rewards(pictures, prompts)[:, 0], rtol=0, atol=SCORE_TOLERANCE)


def smooth_images(n, height, width, seed=0):
    coarse = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def test_gradients_reach_the_images(ranker):
    images = smooth_images(2, 512, 512).requires_grad_(True)  # resized to 448x448 on the way
    prompts = GOLDEN["prompts"][:2]
    scores = ranker.score_differentiable(images, prompts)
    scores.sum().backward()
    assert images.grad is not None and images.grad.isfinite().all() and images.grad[1].abs().sum() > 0
    # antialiased bicubic on the float tensor versus PIL's bicubic on the 8-bit picture: close, not equal
    # (measured 0.009 on this random tiny model, whose scores move by ~0.4 between prompts)
    gap = (scores.detach() - ranker.score(images.detach(), prompts, [None, None])).abs().max().item()
    assert 0 < gap < 0.05


# -- checkpoint layouts, options, one-line errors ------------------------------------------------------------


def test_the_checkpoint_in_current_key_layout_loads_too(registry, ranker, tmp_path):
    legacy = load_file(str(CHECKPOINT))
    current = {("model.language_model." + k[6:] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in legacy.items()}
    assert "model.visual.merger.mlp.0.weight" in current and "lm_head.weight" in current
    save_file(current, tmp_path / "current.safetensors")
    other = registry.build("ranker", "hpsv3", {**OPTIONS, "checkpoint": str(tmp_path / "current.safetensors")},
                           BuildContext())
    image = golden_images()[1]
    assert ranker.score(image, ["a"], [None]).item() == other.score(image, ["a"], [None]).item()


def test_dtypes_devices_and_paper_units(registry, ranker):
    assert registry.get("ranker", "hpsv3").units.scale == 1.0  # the paper prints mu as it is
    assert ranker.dtype == torch.float32 and ranker.device == torch.device("cpu")
    bf16 = registry.build("ranker", "hpsv3", {**OPTIONS, "dtype": "bf16", "batch_size": 2}, BuildContext())
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.head.parameters()} == {torch.float32}
    assert bf16.batch_size == 2
    scores = bf16.score(golden_images()[0].expand(4, -1, -1, -1), GOLDEN["prompts"], [None] * 4)
    assert scores.dtype == torch.float32 and scores.isfinite().all()
    options = registry.validate_options("ranker", "hpsv3", {"device": "cuda:1"}, "r")
    assert options.device == "cuda:1" and options.dtype == "auto"
    from drpo_hpsv3.loading import backbone_dtype

    fp32_run = BuildContext(mixed_precision="no")
    assert backbone_dtype("auto", torch.device("cuda:1"), fp32_run) == torch.bfloat16
    assert backbone_dtype("auto", torch.device("cpu"), fp32_run) == torch.float32


def test_bf16_scores_near_upstreams_bf16_model(registry):
    # upstream on GPUs: backbone (rotary buffers included) cast to bf16, head float32. bf16 rounding differs
    # between the two transformers versions (attention kernels and masks; 4.45 also rounded the vision rotary
    # angles to bf16), so the bar is loose: measured 0.070 on this model, as far as upstream's own bf16 run is
    # from its float32 run (0.070); 1-D versus 3-D positions alone move the score by 0.53
    bf16 = registry.build("ranker", "hpsv3", {**OPTIONS, "dtype": "bf16"}, BuildContext())
    with torch.no_grad():
        ours = bf16.rewards(golden_pictures(), GOLDEN["prompts"])
    torch.testing.assert_close(ours, torch.tensor(GOLDEN["bf16_batched"]), rtol=0, atol=0.15)


def test_bad_options_are_refused(registry):
    with pytest.raises(ConfigError, match="not a torch device"):
        registry.validate_options("ranker", "hpsv3", {"device": "gpu9"}, "r")
    with pytest.raises(ConfigError, match="min_pixels 400000 is larger than max_pixels"):
        registry.validate_options("ranker", "hpsv3", {"min_pixels": 400000}, "r")


def test_bad_images_and_nan(ranker):
    with pytest.raises(ComponentError, match=r"takes images \(B, 3, H, W\)"):
        ranker.score(torch.zeros(1, 4, 8, 8), ["a"], [None])
    with pytest.raises(ComponentError, match="got 2 images but 1 prompts"):
        ranker.score(torch.zeros(2, 3, 8, 8), ["a"], [None, None])
    images = golden_images()[0].expand(2, -1, -1, -1).clone()
    images[1, 0, 0, 0] = float("nan")
    scores = ranker.score(images, ["a", "a"], [None, None])
    assert scores[0].isfinite() and scores[1].isnan()


def test_missing_or_foreign_weights_are_one_line(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as error:
        registry.build("ranker", "hpsv3", {"base": str(DATA / "base")}, BuildContext())
    assert "\n" not in str(error.value) and "hf download MizzenAI/HPSv3 HPSv3.safetensors" in str(error.value)
    with pytest.raises(AssetError, match="checkpoint 'absent.safetensors' does not exist"):
        registry.build("ranker", "hpsv3", {**OPTIONS, "checkpoint": "absent.safetensors"}, BuildContext())
    state = load_file(str(CHECKPOINT))
    save_file({**state, "score.weight": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(PluginError, match="key 'score.weight', which is no part of Qwen2-VL or the reward head"):
        registry.build("ranker", "hpsv3", {**OPTIONS, "checkpoint": str(tmp_path / "foreign.safetensors")},
                       BuildContext())
    # one token fewer in the embedding: the tokenizer is not the checkpoint's
    save_file({**state, "model.embed_tokens.weight": state["model.embed_tokens.weight"][:-1].contiguous()},
              tmp_path / "short.safetensors")
    with pytest.raises(PluginError, match="does not match the checkpoint"):
        registry.build("ranker", "hpsv3", {**OPTIONS, "checkpoint": str(tmp_path / "short.safetensors")},
                       BuildContext())
    with pytest.raises(PluginError, match="ranker 'hpsv3': base './absent' does not exist"):
        registry.build("ranker", "hpsv3", {**OPTIONS, "base": "./absent"}, BuildContext())


def test_registered_with_its_asset(registry):
    assert "hpsv3" in registry.names("ranker")
    assert ("hpsv3", "hf://MizzenAI/HPSv3/HPSv3.safetensors", "MIT") in {
        (a.name, a.url, a.licence) for a in registry.assets()}
    defaults = registry.validate_options("ranker", "hpsv3", {}, "r")
    assert (defaults.base, defaults.min_pixels, defaults.max_pixels) == ("Qwen/Qwen2-VL-7B-Instruct", 200704, 200704)
