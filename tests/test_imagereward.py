"""The ``imagereward`` ranker (drpo_imagereward) against the original image-reward package's model classes.

tests/data/imagereward/make_golden.py built the upstream ``ImageReward`` (``BLIP_Pretrain``'s ViT and med BERT,
the MLP head) at a tiny size from the package's own source files, with random weights, and recorded its
scores: ``ImageReward.score`` one image at a time, ``inference_rank``, and ``score_gard`` on a padded batch of
mixed-length prompts (one longer than 35 tokens). The port loads that ``ImageReward.pt`` + ``med_config.json``
through the hub layout and must give the same scores to 1e-4 (measured: 0.0, the arithmetic is the same).
The differentiable path (tensor resizing instead of PIL on 8-bit pictures) is within 0.02 (measured 7e-3 on
these small, downscaled images). Offline, tiny models only.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import drpo_imagereward
from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, ConfigError, PluginError
from drpo_imagereward import model as imagereward
from tests.conftest import make_registry

DATA = Path(__file__).parent / "data" / "imagereward"
GOLDEN = json.loads((DATA / "golden.json").read_text())
TENSORS = load_file(str(DATA / "golden_tensors.safetensors"))
#: the tiny golden ViT is 48 wide with 2 heads (ImageReward's ViT-L: 64-wide heads, the default)
TINY = {"vocabulary": str(DATA / "vocab.txt"), "vision_head_width": 24}
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def registry():
    return make_registry(drpo_imagereward)


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """The hub layout of THUDM/ImageReward, as a user downloads it: ImageReward.pt and med_config.json."""
    folder = tmp_path_factory.mktemp("ImageReward")
    for name in ("ImageReward.pt", "med_config.json"):
        shutil.copy(DATA / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def ranker(registry, hub_folder):
    return registry.build("ranker", "imagereward", {"model": str(hub_folder), **TINY}, BuildContext())


def images(names):
    arrays = [np.array(Image.open(DATA / name).convert("RGB")) for name in names]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])


def max_error(scores, expected):
    return float((torch.as_tensor(scores, dtype=torch.float64) - torch.tensor(expected, dtype=torch.float64)).abs().max())


# -- registration and options -------------------------------------------------------------------------------


def test_the_plugin_registers_the_ranker_with_its_paper_units(registry):
    assert registry.get("ranker", "imagereward").name == "imagereward"
    assert registry.get("ranker", "image_reward").name == "imagereward"
    assert registry.get("ranker", "imagereward").units.scale == 10.0  # the paper's "ImageReward x 10"
    options = registry.validate_options("ranker", "imagereward", {"device": "cuda:1", "dtype": "bf16",
                                                                 "batch_size": 4}, "r")
    assert (options.device, options.dtype, options.batch_size, options.model) == ("cuda:1", "bf16", 4,
                                                                                 "THUDM/ImageReward")
    with pytest.raises(ConfigError, match="device"):
        registry.validate_options("ranker", "imagereward", {"device": "gpu1"}, "r")


# -- parity with the upstream classes ---------------------------------------------------------------------------


def test_a_padded_batch_of_mixed_length_prompts_scores_as_upstream(ranker):
    batch = GOLDEN["batch"]
    scores = ranker.score(images(batch["images"]), batch["prompts"], [None] * 4)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert max_error(scores, batch["scores"]) < TOLERANCE
    assert max_error(scores, batch["scores_one_by_one"]) < TOLERANCE
    # the golden scores really depend on image and prompt, so matching them means something
    assert float(torch.tensor(batch["scores"]).std()) > 0.1


def test_images_one_by_one_score_as_upstream_score(ranker):
    batch, single = GOLDEN["batch"], GOLDEN["single"]
    names, prompts = batch["images"] + single["images"], batch["prompts"] + single["prompts"]
    expected = batch["scores_one_by_one"] + single["scores"]
    scores = [float(ranker.score(images([n]), [p], [None])[0]) for n, p in zip(names, prompts, strict=True)]
    assert max_error(scores, expected) < TOLERANCE


def test_one_prompt_over_several_images_ranks_as_inference_rank(ranker):
    rank = GOLDEN["inference_rank"]
    scores = ranker.score(images(rank["images"]), [rank["prompt"]] * len(rank["images"]), [None] * 4)
    assert max_error(scores, rank["rewards"]) < TOLERANCE
    order = (-scores).argsort().argsort() + 1  # inference_rank's 1-based rank of each image
    assert order.tolist() == rank["ranking"]
    assert float(scores.max() - scores.min()) > 0.1


@pytest.mark.parametrize("batch_size", [1, 3])
def test_chunked_batches_give_the_same_scores(registry, hub_folder, batch_size):
    batch = GOLDEN["batch"]
    small = registry.build("ranker", "imagereward", {"model": str(hub_folder), "batch_size": batch_size, **TINY},
                           BuildContext())
    assert max_error(small.score(images(batch["images"]), batch["prompts"], [None] * 4), batch["scores"]) < TOLERANCE


def test_preprocessing_and_text_features_match_upstream(ranker):
    batch = GOLDEN["batch"]
    pixels = ranker.images(images(batch["images"]))
    assert torch.allclose(pixels, TENSORS["batch_pixel_values"], atol=1e-6)
    singles = torch.cat([ranker.images(images([n])) for n in GOLDEN["single"]["images"]])
    assert torch.allclose(singles, TENSORS["single_pixel_values"], atol=1e-6)
    tokens = ranker.tokenizer(batch["prompts"], padding="max_length", truncation=True, max_length=35,
                              return_tensors="pt")
    assert tokens["input_ids"].tolist() == batch["input_ids"]
    assert tokens["attention_mask"].tolist() == batch["attention_mask"]
    with torch.no_grad():
        image = ranker.model.vision_model(pixel_values=pixels).last_hidden_state
        text = ranker.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                         encoder_hidden_states=image, is_decoder=False).last_hidden_state[:, 0]
    assert torch.allclose(text, TENSORS["batch_text_features"], atol=1e-5)


def test_the_differentiable_path_is_close_and_reaches_the_images(ranker):
    batch = GOLDEN["batch"]
    pixels = images(batch["images"]).requires_grad_(True)
    scores = ranker.score_differentiable(pixels, batch["prompts"])
    assert max_error(scores.detach(), batch["scores"]) < 0.02
    scores.sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0


# -- the tokenizer and the real checkpoint's layout --------------------------------------------------------------


def test_the_shipped_vocabulary_is_bert_base_uncased_and_tokenises_as_upstream():
    digest = hashlib.sha256(imagereward.BERT_VOCAB.read_bytes()).hexdigest()
    assert digest == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    real = GOLDEN["bert_base_uncased"]
    tokenizer = imagereward.tokenizer()
    assert len(tokenizer) == real["vocab_size"] == 30524
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [real["bos_token_id"], real["enc_token_id"]]
    ids = tokenizer(real["prompts"], padding="max_length", truncation=True, max_length=35)["input_ids"]
    assert ids == real["input_ids"]
    assert ids[0][:7] == [101, 1037, 6302, 1997, 1037, 4937, 102]  # [CLS] a photo of a cat [SEP]
    assert all(len(row) == 35 and row[-1] in (0, 102) for row in ids)


def test_the_full_size_checkpoint_layout_converts_to_vit_l_and_bert_base():
    layout = json.loads((DATA / "imagereward_v1_shapes.json").read_text())
    state = {key: torch.empty(shape, device="meta") for key, shape in layout["shapes"].items()}
    model = imagereward.build_model(state, layout["med_config"], vision_head_width=64)
    vision, text = model.vision_model.config, model.text_encoder.config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
            vision.patch_size, vision.intermediate_size) == (1024, 24, 16, 224, 16, 4096)
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.encoder_hidden_size) == (30524, 768, 12,
                                                                                                     1024)
    assert [m.out_features for m in model.mlp.layers if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]
    used = sum(p.numel() for p in model.parameters())
    unused = sum(torch.Size(s).numel() for k, s in layout["shapes"].items() if imagereward.UNUSED.search(k))
    assert used + unused == sum(torch.Size(s).numel() for s in layout["shapes"].values())


# -- the hub layout, loading errors, precision and checks -------------------------------------------------------


def test_the_default_hub_id_loads_from_the_hugging_face_cache(registry, monkeypatch, tmp_path):
    """What a user who ran ``hf download THUDM/ImageReward`` gets: the hub id resolved offline from the cache."""
    from huggingface_hub import constants

    snapshot = tmp_path / "models--THUDM--ImageReward" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("ImageReward.pt", "med_config.json"):
        shutil.copy(DATA / name, snapshot / name)
    (tmp_path / "models--THUDM--ImageReward" / "refs").mkdir()
    (tmp_path / "models--THUDM--ImageReward" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    ranker = registry.build("ranker", "imagereward", TINY, BuildContext())
    batch = GOLDEN["batch"]
    assert max_error(ranker.score(images(batch["images"]), batch["prompts"], [None] * 4), batch["scores"]) < TOLERANCE


def test_a_hub_id_missing_offline_is_one_line(registry, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PluginError, match="not in the local Hugging Face cache.*hf download THUDM/ImageReward"):
        registry.build("ranker", "imagereward", TINY, BuildContext())


def test_loading_errors_are_one_line(registry, hub_folder, tmp_path):
    def build(**options):
        return registry.build("ranker", "imagereward", {"model": str(hub_folder), **TINY, **options}, BuildContext())

    with pytest.raises(PluginError, match="has no med_config.json"):
        shutil.copy(DATA / "ImageReward.pt", tmp_path / "ImageReward.pt")
        build(model=str(tmp_path))
    with pytest.raises(PluginError, match="does not exist"):
        build(model=str(tmp_path / "nowhere"))
    with pytest.raises(PluginError, match="30524 tokens .* 123 embeddings"):
        build(vocabulary=None)
    with pytest.raises(PluginError, match="not a multiple of vision_head_width 20"):
        build(vision_head_width=20)
    with pytest.raises(PluginError, match="revision .* is for hub ids"):
        build(revision="main")


def test_a_safetensors_copy_of_the_checkpoint_loads_too(registry, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(DATA / "ImageReward.pt", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ImageReward.safetensors"))
    shutil.copy(DATA / "med_config.json", tmp_path / "med_config.json")
    ranker = registry.build("ranker", "imagereward", {"model": str(tmp_path), "checkpoint": "ImageReward.safetensors",
                                                      **TINY}, BuildContext())
    batch = GOLDEN["batch"]
    assert max_error(ranker.score(images(batch["images"]), batch["prompts"], [None] * 4), batch["scores"]) < TOLERANCE
    torch.save({"model": state}, tmp_path / "nested.pt")
    with pytest.raises(PluginError, match="does not hold a state dict of tensors"):
        registry.build("ranker", "imagereward", {"model": str(tmp_path), "checkpoint": "nested.pt", **TINY},
                       BuildContext())


def test_a_checkpoint_of_another_model_or_config_is_refused(tmp_path):
    state = torch.load(DATA / "ImageReward.pt", weights_only=True)
    with pytest.raises(PluginError, match="unexpected entries visual.proj"):
        imagereward.convert_state_dict({**state, "visual.proj": torch.zeros(1)})
    med = json.loads((DATA / "med_config.json").read_text())
    with pytest.raises(PluginError, match="does not fit med_config.json"):
        imagereward.build_model(state, {**med, "hidden_size": 64, "num_attention_heads": 2}, 24)
    (tmp_path / "med_config.json").write_text(json.dumps({**med, "add_cross_attention": False}))
    with pytest.raises(PluginError, match="no cross-attention"):
        imagereward.read_med_config(tmp_path / "med_config.json")
    (tmp_path / "med_config.json").write_text(json.dumps({**med, "num_hidden_layers": "2"}))
    with pytest.raises(PluginError, match="positive integers num_hidden_layers"):
        imagereward.read_med_config(tmp_path / "med_config.json")


def test_a_bf16_backbone_keeps_a_float32_head_and_scores(registry, hub_folder):
    ranker = registry.build("ranker", "imagereward", {"model": str(hub_folder), "dtype": "bf16", **TINY},
                            BuildContext())
    assert ranker.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert ranker.model.text_encoder.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    checkpoint = torch.load(DATA / "ImageReward.pt", weights_only=True)
    for index in imagereward.HEAD_LINEARS:  # float32 and never rounded through bf16
        assert torch.equal(ranker.model.mlp.layers[index].weight, checkpoint[f"mlp.layers.{index}.weight"].float())
    batch = GOLDEN["batch"]
    scores = ranker.score(images(batch["images"]), batch["prompts"], [None] * 4)
    assert scores.dtype == torch.float32
    assert max_error(scores, batch["scores"]) < 0.06  # measured 0.024: bf16 keeps 8 bits of mantissa
    assert scores.argsort().tolist() == torch.tensor(batch["scores"]).argsort().tolist()


def test_non_finite_images_and_wrong_counts(ranker):
    batch = GOLDEN["batch"]
    pixels = images(batch["images"])
    pixels[1, 0, 0, 0] = float("nan")
    scores = ranker.score(pixels, batch["prompts"], [None] * 4)
    assert scores[1].isnan() and max_error(scores[[0, 2, 3]], [batch["scores"][i] for i in (0, 2, 3)]) < TOLERANCE
    with pytest.raises(ComponentError, match="4 images but 3 prompts"):
        ranker.score(pixels, batch["prompts"][:3], [None] * 4)


def test_drpo_eval_without_the_weights_offline_is_one_line_exit_2(monkeypatch, tmp_path):
    """``drpo eval --ranker imagereward`` on a machine that never downloaded THUDM/ImageReward."""
    from huggingface_hub import constants
    from typer.testing import CliRunner

    import drpo_cli.main as cli_main
    from drpo_core import registry as registry_module

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(registry_module, "_default", registry_module.Registry().load_entry_points())
    shutil.copy(DATA / GOLDEN["single"]["images"][0], tmp_path / "0.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "a cat", "file": "0.png"}) + "\n")
    result = CliRunner().invoke(cli_main.app, ["eval", str(tmp_path / "m.jsonl"), "--ranker", "imagereward"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rankers.imagereward.model THUDM/ImageReward" in lines[0]  # named before loading
    assert "hf download THUDM/ImageReward" in lines[0]
    assert not (tmp_path / "scores.jsonl").exists()
