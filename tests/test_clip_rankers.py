"""The CLIP-family rankers (drpo_clip_rankers): each model's own processor, HPSv2's conversion against the real
open_clip (tests/data/hpsv2/make_golden.py), conversion bugs caught, the differentiable path, checks and
one-line errors. Tiny models only, offline.

Tolerances: the ranking path equals the model card's processor + model computation to 1e-6 (the same
arithmetic, batched differently); the converted HPSv2 model equals open_clip's embeddings to 1e-5 and its
scores end to end, from the PNG files, to 1e-5 (measured: 7.5e-8 for both; the preprocessed pixels are
identical).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

import drpo_clip_rankers
import drpo_image_rankers
from drpo_clip_rankers.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    OpenClipImages,
    Preprocessing,
    ProcessorImages,
    pooled,
)
from drpo_clip_rankers.convert import (
    OpenClipArchitecture,
    _strip,
    clip_config,
    convert_state_dict,
    to_transformers,
)
from drpo_clip_rankers.testing import build_tiny_rankers, tiny_clip_config
from drpo_core.context import BuildContext
from drpo_core.errors import AssetError, ComponentError, ConfigError, PluginError
from tests.conftest import make_registry

DATA = Path(__file__).parent / "data" / "hpsv2"
GOLDEN = json.loads((DATA / "golden.json").read_text())
TENSORS = load_file(str(DATA / "golden_tensors.safetensors"))
OPEN_CLIP_STATE = load_file(str(DATA / "open_clip_tiny.safetensors"))
#: the tiny golden model's head widths (ViT-H-14's are 80 and 64)
TINY_HEADS = {"vision_head_width": 20, "text_head_width": 16}
PROMPTS = ["a photo of the cat", "the red square", "a dog", "a photo of the cat"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_rankers(tmp_path_factory.mktemp("clip-rankers"))


@pytest.fixture(scope="module")
def registry():
    return make_registry(drpo_clip_rankers, drpo_image_rankers)


def options_for(name, tiny, **extra):
    if name in ("hpsv2", "hpsv2.1"):
        return {"checkpoint": str(DATA / "open_clip_tiny.safetensors"), "tokenizer": str(tiny["tokenizer"]),
                **TINY_HEADS, **extra}
    found = {"model": str(tiny["clip"])}
    if name == "pickscore":
        found["processor"] = str(tiny["clip"])
    if name == "aesthetic":
        found["head"] = str(tiny["head"])
    return {**found, **extra}


@pytest.fixture(scope="module")
def rankers(tiny, registry):
    return {name: registry.build("ranker", name, options_for(name, tiny), BuildContext())
            for name in ("pickscore", "clip", "aesthetic", "hpsv2")}


def smooth_images(n, height, width, seed=0, cells=8):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)


def pictures(images):
    """Float images as the PIL pictures a user saves (diffusers' ``numpy_to_pil``)."""
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def model_card_cosine(directory, images, prompts):
    """PickScore's model card (and CLIP score) with the model's own processor, as transformers picks it."""
    processor = CLIPProcessor.from_pretrained(directory)
    model = CLIPModel.from_pretrained(directory).eval()
    with torch.no_grad():
        image_inputs = processor(images=pictures(images), return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = model.get_image_features(**image_inputs)
        text = model.get_text_features(**text_inputs)
    image = image.pooler_output if hasattr(image, "pooler_output") else image
    text = text.pooler_output if hasattr(text, "pooler_output") else text
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


def golden_images():
    arrays = [np.array(Image.open(DATA / name).convert("RGB")) for name in GOLDEN["images"]]
    return [torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255 for a in arrays]


# -- registration and options -------------------------------------------------------------------------------


def test_the_plugin_registers_the_rankers_and_the_hps_assets(registry):
    assert {"pickscore", "clip", "aesthetic", "hpsv2", "hpsv2.1"} <= set(registry.names("ranker"))
    assert registry.get("ranker", "hps").name == "hpsv2"
    assert {(a.name, a.url) for a in registry.assets()} >= {
        ("hpsv2", "hf://xswu/HPSv2/HPS_v2_compressed.pt"), ("hpsv2.1", "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"),
        ("laion-aesthetic-mlp", drpo_image_rankers.LAION_AESTHETIC_MLP["url"])}


def test_options_are_checked_when_read(registry):
    with pytest.raises(ConfigError, match=r"rankers.0.batch_sise: unknown key \(did you mean batch_size\?\)"):
        registry.validate_options("ranker", "pickscore", {"batch_sise": 4}, "rankers.0")
    with pytest.raises(ConfigError, match="rankers.0.device: 'gpu0' is not a torch device"):
        registry.validate_options("ranker", "clip", {"device": "gpu0"}, "rankers.0")
    with pytest.raises(ConfigError, match="rankers.0.dtype"):
        registry.validate_options("ranker", "aesthetic", {"dtype": "fp8"}, "rankers.0")
    defaults = registry.validate_options("ranker", "pickscore", {}, "rankers.0")
    assert (defaults.model, defaults.processor) == ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert registry.validate_options("ranker", "clip", {}, "r").model == "openai/clip-vit-large-patch14"
    hps = registry.validate_options("ranker", "hpsv2.1", {"device": "cuda:1"}, "r")
    assert (hps.vision_head_width, hps.text_head_width, hps.quick_gelu, hps.device) == (80, 64, False, "cuda:1")


# -- the ranking path is the model's own processor ----------------------------------------------------------


@pytest.mark.parametrize("name", ["pickscore", "clip"])
def test_similarity_equals_the_model_card_with_its_processor(name, rankers, tiny):
    images = smooth_images(4, 64, 64)
    scores = rankers[name].score(images, PROMPTS, [None] * 4)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    torch.testing.assert_close(scores, model_card_cosine(tiny["clip"], images, PROMPTS), rtol=0, atol=1e-6)


def test_non_square_images_are_cropped_as_the_processor_does(rankers, tiny):
    images = smooth_images(3, 40, 56, seed=2)
    expected = model_card_cosine(tiny["clip"], images, PROMPTS[:3])
    torch.testing.assert_close(rankers["clip"].score(images, PROMPTS[:3], [None] * 3), expected, rtol=0, atol=1e-6)


def test_aesthetic_equals_the_laion_predictor_on_the_processor(rankers, tiny):
    # improved-aesthetic-predictor: its MLP (dropouts and all), on the L2-normalised CLIP image embedding
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))  # its MLP's self.layers
    state = torch.load(tiny["head"], weights_only=True)
    mlp.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    images = smooth_images(3, 64, 64, seed=3)
    processor = CLIPProcessor.from_pretrained(tiny["clip"])
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    with torch.no_grad():
        embeds = pooled(model.get_image_features(**processor(images=pictures(images), return_tensors="pt")))
        expected = mlp.eval()(F.normalize(embeds, dim=-1)).squeeze(-1)
    scores = rankers["aesthetic"].score(images, ["ignored"] * 3, [None] * 3)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)


def test_aesthetic_also_loads_a_vision_only_checkpoint(rankers, tiny, registry, tmp_path):
    full = CLIPModel.from_pretrained(tiny["clip"])
    vision = CLIPVisionModelWithProjection(full.config.vision_config)
    vision.config.projection_dim = full.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision.config)
    vision.vision_model.load_state_dict(full.vision_model.state_dict())
    vision.visual_projection.load_state_dict(full.visual_projection.state_dict())
    vision.save_pretrained(tmp_path / "vision")
    ranker = registry.build("ranker", "aesthetic", {"model": str(tmp_path / "vision"), "processor": str(tiny["clip"]),
                                                     "head": str(tiny["head"])}, BuildContext())
    images = smooth_images(2, 64, 64, seed=4)
    torch.testing.assert_close(ranker.score(images, ["x", "y"], [None] * 2),
                               rankers["aesthetic"].score(images, ["x", "y"], [None] * 2), rtol=0, atol=1e-6)


def test_installed_transformers_returns_the_projection_as_pooler_output(tiny):
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
        full = model(pixel_values=pixels, input_ids=torch.tensor([[514, 66, 515]] * 2))
    if not isinstance(out, torch.Tensor):  # transformers 5: BaseModelOutputWithPooling
        assert out.pooler_output.shape == (2, 16)
    torch.testing.assert_close(F.normalize(pooled(out), dim=-1), full.image_embeds)


# -- HPSv2: the conversion against the real open_clip ---------------------------------------------------------


def converted_scores(model, pixel_values=None):
    """Embeddings and cosines of the golden inputs through a converted model (ids padded with the EOT)."""
    ids = GOLDEN["input_ids"]
    length = max(map(len, ids))
    input_ids = torch.full((len(ids), length), 515)
    attention = torch.zeros(len(ids), length, dtype=torch.long)
    for row, tokens in enumerate(ids):
        input_ids[row, :len(tokens)], attention[row, :len(tokens)] = torch.tensor(tokens), 1
    with torch.no_grad():
        image = F.normalize(pooled(model.get_image_features(
            pixel_values=TENSORS["pixel_values"] if pixel_values is None else pixel_values)), dim=-1)
        text = F.normalize(pooled(model.get_text_features(input_ids=input_ids, attention_mask=attention)), dim=-1)
    return image, text, image @ text.T


def test_the_converted_model_matches_open_clip():
    image, text, scores = converted_scores(to_transformers(OPEN_CLIP_STATE, OpenClipArchitecture(20, 16)))
    torch.testing.assert_close(image, TENSORS["image_embeds"], rtol=0, atol=1e-5)
    torch.testing.assert_close(text, TENSORS["text_embeds"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, torch.tensor(GOLDEN["scores"]), rtol=0, atol=1e-5)


def test_the_hps_ranker_matches_open_clip_from_the_image_files(rankers, tiny):
    ranker = rankers["hpsv2"]
    prompts = GOLDEN["prompts"]
    assert [ranker.text.tokenizer(p, truncation=True, max_length=77)["input_ids"] for p in prompts] == GOLDEN["input_ids"]
    for row, image in enumerate(golden_images()):
        pixels = OpenClipImages(ranker.preprocessing)(image)
        torch.testing.assert_close(pixels, TENSORS["pixel_values"][row:row + 1], rtol=0, atol=1e-6)
        scores = ranker.score(image.expand(len(prompts), -1, -1, -1), prompts, [None] * len(prompts))
        torch.testing.assert_close(scores, torch.tensor(GOLDEN["scores"][row]), rtol=0, atol=1e-5)


def test_prompts_are_cleaned_as_open_clip_cleans_them():
    # what open_clip's basic_clean + whitespace_clean (ftfy 6.3.1) give; HF tokens of these then equal
    # open_clip's on its own vocabulary (checked by hand in the throwaway environment, 12 of 12 prompts)
    from drpo_clip_rankers.hpsv2 import open_clip_clean

    assert open_clip_clean("salt &amp;amp; pepper") == "salt & pepper"
    assert open_clip_clean("rock’n’roll “quotes”") == 'rock\'n\'roll "quotes"'
    assert open_clip_clean("Ångström ﬁ ligature") == "Ångström fi ligature"
    assert open_clip_clean("\uff26\uff35\uff2c\uff2c\u3000\uff57\uff49\uff44\uff54\uff48") == "FULL width"
    assert open_clip_clean("e\u0301  combining\n\tspaces ") == "\u00e9 combining spaces"


def test_open_clip_crops_with_torchvision_rounding_which_transformers_does_not():
    # 43x32: the crop's offset is round(5.5) = 6 in torchvision, 11 // 2 = 5 in transformers
    index = next(i for i, name in enumerate(GOLDEN["images"]) if name.endswith("43x32.png"))
    image = golden_images()[index]
    ours = Preprocessing(32, (32, 32), OPENAI_MEAN, OPENAI_STD, crop_offset="half-even")
    floor = Preprocessing(32, (32, 32), ours.mean, ours.std)
    torch.testing.assert_close(OpenClipImages(ours)(image), TENSORS["pixel_values"][index:index + 1], rtol=0, atol=1e-6)
    assert (OpenClipImages(floor)(image) - TENSORS["pixel_values"][index]).abs().max() > 0.1


def _sabotaged(bug):
    """A converted model with one conversion bug: what the golden comparison must catch."""
    state = _strip(OPEN_CLIP_STATE)
    config = clip_config(state, OpenClipArchitecture(20, 16, quick_gelu=bug == "quick_gelu"))
    weights = convert_state_dict(state)
    layer = "vision_model.encoder.layers.0.self_attn."
    if bug == "qkv_order":  # in_proj split as k, q, v
        for kind in ("weight", "bias"):
            weights[f"{layer}q_proj.{kind}"], weights[f"{layer}k_proj.{kind}"] = (
                weights[f"{layer}k_proj.{kind}"], weights[f"{layer}q_proj.{kind}"])
    elif bug == "text_projection_not_transposed":  # square in ViT-H-14 (1024 x 1024), so no shape error
        weights["text_projection.weight"] = weights["text_projection.weight"].t()
    elif bug == "eot_pooling":  # pools at the start token instead of the first end-of-text
        config.text_config.eos_token_id = 514
    elif bug == "ln_pre_ln_post_swapped":
        for kind in ("weight", "bias"):
            weights[f"vision_model.pre_layrnorm.{kind}"], weights[f"vision_model.post_layernorm.{kind}"] = (
                weights[f"vision_model.post_layernorm.{kind}"], weights[f"vision_model.pre_layrnorm.{kind}"])
    elif bug == "class_and_positions_of_text":
        weights["text_model.embeddings.position_embedding.weight"] = torch.roll(
            weights["text_model.embeddings.position_embedding.weight"], 1, dims=0)
    model = CLIPModel(config).eval()
    model.load_state_dict(weights)
    return model


@pytest.mark.parametrize("bug", ["quick_gelu", "qkv_order", "text_projection_not_transposed", "eot_pooling",
                                 "ln_pre_ln_post_swapped", "class_and_positions_of_text"])
def test_each_conversion_bug_fails_the_golden_comparison(bug):
    # the comparison's tolerance is 1e-5; the smallest of these errors (QuickGELU) is 3e-3
    _, _, scores = converted_scores(_sabotaged(bug))
    assert (scores - torch.tensor(GOLDEN["scores"])).abs().max() > 100 * 1e-5


def test_the_full_size_vit_h_14_layout_converts_to_its_config():
    """Every tensor of open_clip's real ViT-H-14 (shapes only, on the meta device) finds its place."""
    layout = json.loads((DATA / "vit_h_14_shapes.json").read_text())
    state = {key: torch.empty(shape, device="meta") for key, shape in layout["shapes"].items()}
    config = clip_config(state, OpenClipArchitecture())
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (1280, 32, 16, 5120, 224, 14)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size,
            text.vocab_size, text.max_position_embeddings, text.eos_token_id) == (1024, 24, 16, 4096, 49408, 77, 49407)
    assert config.projection_dim == 1024 and vision.hidden_act == text.hidden_act == "gelu"
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(convert_state_dict(state), strict=True, assign=True)


def test_a_transposed_image_projection_cannot_load():
    state = _strip(OPEN_CLIP_STATE)
    state["visual.proj"] = state["visual.proj"].t().contiguous()
    with pytest.raises(PluginError, match="do not fit CLIPModel"):
        to_transformers(state, OpenClipArchitecture(20, 16))


def test_unknown_open_clip_parts_are_refused_not_dropped():
    state = dict(OPEN_CLIP_STATE, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(40)})
    with pytest.raises(PluginError, match=r"does not know .*ls_1.gamma"):
        to_transformers(state, OpenClipArchitecture(20, 16))
    missing = {k: v for k, v in OPEN_CLIP_STATE.items() if k != "visual.ln_pre.weight"}
    with pytest.raises(PluginError, match="missing visual.ln_pre.weight"):
        to_transformers(missing, OpenClipArchitecture(20, 16))
    with pytest.raises(PluginError, match="is 32 wide, not a multiple of head width 64"):
        to_transformers(OPEN_CLIP_STATE)


def test_an_hps_torch_checkpoint_with_state_dict_and_ddp_prefix_loads(tiny, registry, tmp_path, rankers):
    torch.save({"state_dict": {f"module.{k}": v.half() for k, v in OPEN_CLIP_STATE.items()}, "epoch": 3},
               tmp_path / "HPS_v2_compressed.pt")
    ranker = registry.build("ranker", "hpsv2.1", options_for("hpsv2.1", tiny, checkpoint="HPS_v2_compressed.pt"),
                            BuildContext(config_dir=tmp_path))
    image = golden_images()[0]
    scores = ranker.score(image.expand(2, -1, -1, -1), GOLDEN["prompts"][:2], [None] * 2)
    torch.testing.assert_close(scores, torch.tensor(GOLDEN["scores"][0][:2]), rtol=0, atol=2e-3)  # fp16 weights: measured 3e-4


# -- the differentiable path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pickscore", "clip", "aesthetic", "hpsv2"])
def test_gradients_reach_the_images_and_scores_agree_with_the_ranking_path(name, rankers):
    ranker = rankers[name]
    assert type(ranker).differentiable
    images = smooth_images(4, 64, 64, seed=5)
    x = images.clone().requires_grad_(True)
    scores = ranker.score_differentiable(x, PROMPTS)
    scores.sum().backward()
    assert scores.dtype == torch.float32 and x.grad is not None and x.grad.isfinite().all()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in ranker.model.parameters())
    # 8-bit rounding and PIL's fixed-point resampling are all that differ (measured: below 1e-3 here)
    ranked = ranker.score(images, PROMPTS, [None] * 4)
    torch.testing.assert_close(scores.detach(), ranked, rtol=0, atol=2e-3)


def test_a_legacy_processor_config_gives_the_same_numbers(tmp_path):
    # openai/clip-vit-large-patch14 and laion's ViT-H/14 publish sizes as plain ints
    legacy = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN),
              "image_std": list(OPENAI_STD), "size": 224}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    processor = CLIPImageProcessorPil.from_pretrained(tmp_path)
    assert Preprocessing.of_processor(processor, "test") == Preprocessing(224, (224, 224), OPENAI_MEAN, OPENAI_STD)


def test_rankers_that_do_not_declare_it_are_not_differentiable():
    from drpo_image_rankers.rankers import StatisticRanker

    assert not StatisticRanker.differentiable
    with pytest.raises(NotImplementedError, match="StatisticRanker is not differentiable"):
        StatisticRanker("brightness").score_differentiable(torch.rand(1, 3, 8, 8), ["a"])


def test_the_tensor_path_is_within_a_grey_level_of_the_processor_at_real_size():
    """CLIP's 224 processor against the tensor path, in [0, 1] pixel units, on smooth 512 px images (and
    a non-square one): measured max 1.4/255, mean 0.29/255 (the mean is PIL's rounding to 8 bits)."""
    processor = CLIPImageProcessorPil()
    preprocessing = Preprocessing.of_processor(processor, "test")
    std = torch.tensor(OPENAI_STD)[:, None, None]
    for height, width in ((512, 512), (384, 640)):
        images = smooth_images(2, height, width, seed=6, cells=16)
        difference = ((ProcessorImages(processor)(images) - preprocessing.tensor(images)) * std).abs()
        assert difference.max() < 2.5 / 255 and difference.mean() < 0.4 / 255


# -- batching, precision, checks --------------------------------------------------------------------------------


def test_batch_size_and_repeated_prompts_change_nothing(tiny, registry, rankers):
    one_by_one = registry.build("ranker", "clip", options_for("clip", tiny, batch_size=1), BuildContext())
    images = smooth_images(4, 64, 64, seed=7)
    torch.testing.assert_close(one_by_one.score(images, PROMPTS, [None] * 4),
                               rankers["clip"].score(images, PROMPTS, [None] * 4), rtol=0, atol=1e-6)


def test_the_text_cache_is_bounded_and_stays_right(rankers, monkeypatch):
    import drpo_clip_rankers.common as common

    ranker = rankers["pickscore"]
    images = smooth_images(4, 64, 64, seed=8)
    expected = ranker.score(images, PROMPTS, [None] * 4)
    monkeypatch.setattr(common, "TEXT_CACHE_SIZE", 2)
    ranker.score(images, ["w", "x", "y", "z"], [None] * 4)
    assert len(ranker.text._cache) == 2
    torch.testing.assert_close(ranker.score(images, PROMPTS, [None] * 4), expected, rtol=0, atol=1e-6)


def test_a_bf16_backbone_gives_float32_scores_and_autocast_is_ignored(tiny, registry, rankers):
    ranker = registry.build("ranker", "aesthetic", options_for("aesthetic", tiny, dtype="bf16"), BuildContext())
    assert next(ranker.model.parameters()).dtype == torch.bfloat16
    assert next(ranker.head.parameters()).dtype == torch.float32
    images = smooth_images(3, 64, 64, seed=9)
    scores = ranker.score(images, ["x"] * 3, [None] * 3)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, rankers["aesthetic"].score(images, ["x"] * 3, [None] * 3), rtol=0, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = rankers["clip"].score(images, PROMPTS[:3], [None] * 3)
    torch.testing.assert_close(under_autocast, rankers["clip"].score(images, PROMPTS[:3], [None] * 3), rtol=0, atol=0)


def test_rows_with_non_finite_pixels_get_nan_and_the_others_their_scores(rankers):
    images = smooth_images(4, 64, 64, seed=10)
    clean = rankers["clip"].score(images, PROMPTS, [None] * 4)
    images[1, 0, 3, 3] = float("nan")
    scores = rankers["clip"].score(images, PROMPTS, [None] * 4)
    assert scores[1].isnan() and scores[[0, 2, 3]].isfinite().all()
    torch.testing.assert_close(scores[[0, 2, 3]], clean[[0, 2, 3]], rtol=0, atol=1e-6)


def test_bad_inputs_and_bad_scores_are_errors_naming_the_ranker(rankers, monkeypatch):
    ranker = rankers["clip"]
    with pytest.raises(ComponentError, match="ranker 'clip' got 2 images but 3 prompts"):
        ranker.score(smooth_images(2, 64, 64), ["a", "b", "c"], [None] * 3)
    with pytest.raises(ComponentError, match=r"ranker 'clip' takes images \(B, 3, H, W\), got \(2, 64, 64\)"):
        ranker.score(torch.rand(2, 64, 64), ["a", "b"], [None] * 2)
    monkeypatch.setattr(ranker, "scores_of_pixels", lambda pixels, prompts: torch.full((len(prompts),), float("inf")))
    with pytest.raises(ComponentError, match="ranker 'clip' computed non-finite scores for 2 of 2 images"):
        ranker.score(smooth_images(2, 64, 64), ["a", "b"], [None] * 2)
    monkeypatch.setattr(ranker, "scores_of_pixels", lambda pixels, prompts: torch.zeros(1))
    with pytest.raises(ComponentError, match="ranker 'clip' computed 1 scores for 2 images"):
        ranker.score(smooth_images(2, 64, 64), ["a", "b"], [None] * 2)


# -- loading and one-line errors ------------------------------------------------------------------------------


def test_models_resolve_relative_to_the_recipe(tiny, registry):
    ranker = registry.build("ranker", "clip", {"model": tiny["clip"].name}, BuildContext(config_dir=tiny["clip"].parent))
    assert ranker.score(smooth_images(1, 64, 64), ["a"], [None]).shape == (1,)
    with pytest.raises(PluginError, match="ranker 'clip': model './absent' does not exist"):
        registry.build("ranker", "clip", {"model": "./absent"}, BuildContext(config_dir=tiny["clip"].parent))


def test_offline_without_weights_is_one_line_per_ranker(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(PluginError) as error:
        registry.build("ranker", "pickscore", {"model": "drpo-tests/absent-model"}, BuildContext())
    message = str(error.value)
    assert "\n" not in message and message.startswith("ranker 'pickscore': model 'drpo-tests/absent-model' is not in the")
    assert "HF_HUB_OFFLINE is set: download it first (hf download drpo-tests/absent-model)" in message
    with pytest.raises(AssetError) as error:
        registry.build("ranker", "aesthetic", {}, BuildContext())
    assert "\n" not in str(error.value) and "`drpo assets fetch laion-aesthetic-mlp`" in str(error.value)
    assert str(error.value).endswith("or set the ranker's head to a local copy of the file")
    with pytest.raises(AssetError) as error:
        registry.build("ranker", "hpsv2", {}, BuildContext())
    assert "\n" not in str(error.value) and "hf download xswu/HPSv2 HPS_v2_compressed.pt" in str(error.value)


def test_a_tokenizer_that_does_not_fit_the_text_tower_is_refused(tiny, registry, tmp_path):
    config = tiny_clip_config()
    config.text_config.eos_token_id = 7
    CLIPModel(config).save_pretrained(tmp_path / "other-eos")
    with pytest.raises(PluginError, match="ends prompts with token 515, but the text encoder pools at token 7"):
        registry.build("ranker", "clip", {"model": str(tmp_path / "other-eos"), "processor": str(tiny["clip"])},
                       BuildContext())


def test_aesthetic_heads_that_do_not_fit_are_refused(tiny, registry, tmp_path):
    from drpo_clip_rankers.testing import make_tiny_aesthetic_head

    make_tiny_aesthetic_head(tmp_path / "wide.pth", in_features=24)
    with pytest.raises(PluginError, match="the head takes 24-d embeddings but the CLIP model projects to 16"):
        registry.build("ranker", "aesthetic", options_for("aesthetic", tiny, head=str(tmp_path / "wide.pth")),
                       BuildContext())
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    with pytest.raises(PluginError, match="is not a LAION aesthetic MLP"):
        registry.build("ranker", "aesthetic", options_for("aesthetic", tiny, head=str(tmp_path / "other.pth")),
                       BuildContext())
