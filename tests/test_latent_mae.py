"""The latent-MAE feature space: parity with the official extractor, the released checkpoint formats, the
paper's keys and their particle counts, and one-line errors."""

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drpo_mae
from drpo_core.config import resolve_config
from drpo_core.context import BuildContext
from drpo_core.errors import AssetError, ComponentError, ConfigError, PluginError
from drpo_core.registry import Registry
from drpo_mae.encoder import LatentMAEEncoder, gn_groups
from drpo_mae.features import LatentMAEFeatures
from drpo_mae.testing import tiny_state_dict, write_tiny_checkpoint
from tests.conftest import make_registry

DATA = Path(__file__).parent / "data" / "mae"
GOLDEN = load_file(str(DATA / "golden.safetensors"))
MAE_KEYS = sorted(key.removeprefix("mae/") for key in GOLDEN if key.startswith("mae/"))


def features(weights, keys, x):
    return LatentMAEFeatures(LatentMAEEncoder.load(weights), keys).features(x)


# -- parity with the official FrozenMAELatentFeatureExtractor (tests/data/mae/make_golden.py) -------------


def test_every_key_matches_the_official_extractor():
    # 6 maps (conv1, layer1..4, layer3_blk2) x 6 statistics, the tokens of 4 of them, 2 input statistics
    assert len(MAE_KEYS) == 6 * 6 + 4 + 2
    ours = features(DATA / "tiny-mae.pth", MAE_KEYS, GOLDEN["input"])
    for key in MAE_KEYS:
        assert ours[key].shape == GOLDEN[f"mae/{key}"].shape, key
        torch.testing.assert_close(ours[key], GOLDEN[f"mae/{key}"], atol=1e-5, rtol=0, msg=key)


def test_the_fixture_is_the_official_layout():
    raw = torch.load(DATA / "tiny-mae.pth", weights_only=True)
    assert set(raw) == {"state_dict", "metadata"} and raw["metadata"]["model_config"]["layers"] == [2, 2, 3, 1]
    keys = set(raw["state_dict"])
    assert "module._orig_mod.encoder.conv1.kernel" in keys and "module._orig_mod.encoder.gn1.scale" in keys
    assert "module._orig_mod.encoder.stages_1.layers_0.proj_conv.kernel" in keys
    assert "module._orig_mod.encoder.layer4_norm.scale" in keys
    assert raw["state_dict"]["module._orig_mod.encoder.conv1.kernel"].shape == (3, 3, 4, 4)  # flax HWIO
    encoder = LatentMAEEncoder.load(DATA / "tiny-mae.pth")
    assert (encoder.layers, encoder.widths, encoder.in_channels) == ((2, 2, 3, 1), (4, 8, 12, 36), 4)


def test_group_norm_groups_are_the_largest_divisor_up_to_32():
    assert [gn_groups(c) for c in (4, 12, 36, 48, 256, 2048, 7)] == [4, 12, 18, 24, 32, 32, 7]


# -- the paper's keys ---------------------------------------------------------------------------------------


def test_the_paper_keys_give_1_1_16_16_4_4_particles_on_512px_latents(tmp_path):
    """Released depths [3,4,6,3], read from the keys (no metadata); 64x64 latents, layer4 8x8."""
    weights = write_tiny_checkpoint(tmp_path / "mae.pth", (4, 4, 8, 8), (3, 4, 6, 3), metadata=False)
    space = LatentMAEFeatures(LatentMAEEncoder.load(weights), drpo_mae.PAPER_KEYS)
    out = space.features(torch.randn(2, 4, 64, 64))
    assert {key: tuple(value.shape) for key, value in out.items()} == {
        "layer4_mean": (2, 1, 8), "layer4_std": (2, 1, 8), "layer4_mean_2": (2, 16, 8), "layer4_std_2": (2, 16, 8),
        "layer4_mean_4": (2, 4, 8), "layer4_std_4": (2, 4, 8)}
    assert drpo_mae.LatentMAEOptions().keys == list(drpo_mae.PAPER_KEYS)


def test_gradient_reaches_the_latents_and_nothing_else_is_trainable():
    encoder = LatentMAEEncoder.load(DATA / "tiny-mae.pth")
    x = GOLDEN["input"].clone().requires_grad_(True)
    out = LatentMAEFeatures(encoder, drpo_mae.PAPER_KEYS[:4]).features(x)
    sum(value.square().sum() for value in out.values()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(tensor.requires_grad for tensor in encoder.weights.values())
    again = LatentMAEFeatures(encoder, drpo_mae.PAPER_KEYS[:4]).features(x)
    assert all(torch.equal(again[key], out[key]) for key in out)


# -- checkpoint formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["torch-names", "bare", "safetensors", "safetensors-no-metadata"])
def test_every_format_gives_the_same_features(tmp_path, variant):
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    keys = ["layer2_mean_2", "layer4_std", "layer1_blk1_mean"]
    reference = features(write_tiny_checkpoint(tmp_path / "ref.pth", layers=(2, 1, 1, 1)), keys, x)
    if variant == "torch-names":  # PyTorch names: weight OIHW, GroupNorm weight
        path = write_tiny_checkpoint(tmp_path / "t.pt", layers=(2, 1, 1, 1), flax=False, prefix="_orig_mod.")
    elif variant == "bare":  # the state dict alone
        path = tmp_path / "bare.pth"
        torch.save(tiny_state_dict(layers=(2, 1, 1, 1)), path)
    else:
        path = write_tiny_checkpoint(tmp_path / "w.safetensors", layers=(2, 1, 1, 1),
                                     metadata=variant == "safetensors")
    ours = features(path, keys, x)
    for key in keys:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=0)


def test_a_decoder_in_the_checkpoint_is_ignored(tmp_path):
    state = tiny_state_dict() | {"decoder.head.kernel": torch.zeros(3, 3, 16, 4)}
    torch.save({"state_dict": state, "metadata": {"model_config": {"layers": [1, 1, 1, 1]}}}, tmp_path / "full.pth")
    assert LatentMAEEncoder.load(tmp_path / "full.pth").widths == (4, 8, 8, 16)


def test_a_key_mismatch_lists_expected_and_found_keys(tmp_path):
    state = tiny_state_dict()
    del state["encoder.stages_2.layers_0.proj_gn.bias"]
    state["encoder.stages_2.layers_0.extra.kernel"] = torch.zeros(1)
    torch.save({"state_dict": state, "metadata": {"model_config": {"layers": [1, 1, 1, 1]}}}, tmp_path / "bad.pth")
    with pytest.raises(AssetError) as error:
        LatentMAEEncoder.load(tmp_path / "bad.pth")
    message = str(error.value)
    assert "\n" not in message and "does not match the latent-MAE encoder layout (layers [1, 1, 1, 1])" in message
    assert "1 missing (encoder.stages_2.layers_0.proj_gn.bias)" in message
    assert "1 unexpected (encoder.stages_2.layers_0.extra.kernel)" in message
    assert "expected encoder.conv1.kernel" in message and "found 44 keys" in message

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(AssetError, match="missing .*encoder.conv1.kernel.*found 1 keys: fc.weight"):
        LatentMAEEncoder.load(tmp_path / "other.pth")


def test_depths_from_metadata_that_disagree_with_the_keys_are_a_mismatch(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "mae.pth", layers=(2, 1, 1, 1))
    raw = torch.load(path, weights_only=True)
    raw["metadata"]["model_config"]["layers"] = [1, 1, 1, 1]
    torch.save(raw, path)
    with pytest.raises(AssetError, match="6 unexpected"):
        LatentMAEEncoder.load(path)


def test_a_checkpoint_with_python_objects_is_refused_in_one_line(tmp_path):
    torch.save({"state_dict": tiny_state_dict(), "metadata": {"args": argparse.Namespace(layers=[1, 1, 1, 1])}},
               tmp_path / "pickled.pth")
    with pytest.raises(AssetError, match=r"weights_only=True\) refuses it, as it holds argparse.Namespace"):
        LatentMAEEncoder.load(tmp_path / "pickled.pth")


# -- keys --------------------------------------------------------------------------------------------------


def test_unknown_keys_fail_when_the_options_are_read():
    registry = make_registry(drpo_mae)
    with pytest.raises(ConfigError, match="unknown key 'layer4_max'"):
        registry.validate_options("feature", "latent-mae", {"keys": ["layer4_max"]}, "features")
    with pytest.raises(ConfigError, match="P: patch size >= 2"):
        registry.validate_options("feature", "latent-mae", {"keys": ["layer4_mean_1"]}, "features")


def test_keys_the_checkpoint_cannot_give_fail_when_built():
    encoder = LatentMAEEncoder.load(DATA / "tiny-mae.pth")
    with pytest.raises(ConfigError, match="needs stage 5, and the checkpoint .* has 4 stages"):
        LatentMAEFeatures(encoder, ["layer5_mean"], "tiny-mae.pth")
    with pytest.raises(ConfigError, match="stage 3 of .* has 3 blocks"):
        LatentMAEFeatures(encoder, ["layer3_blk3_mean"], "tiny-mae.pth")


def test_a_map_too_small_for_a_patch_is_one_line():
    space = LatentMAEFeatures(LatentMAEEncoder.load(DATA / "tiny-mae.pth"), ["layer4_mean_4"])
    with pytest.raises(ComponentError, match="layer4's 2x2 map \\(from latents 16x16\\) does not split into 4x4"):
        space.features(torch.randn(1, 4, 16, 16))
    with pytest.raises(ComponentError, match="takes latents \\(B, 4, H, W\\)"):
        space.features(torch.randn(1, 3, 16, 16))


# -- building it as a run does -----------------------------------------------------------------------------


def test_built_from_the_registry_with_weights_relative_to_the_recipe(tmp_path):
    write_tiny_checkpoint(tmp_path / "tiny.pth")
    registry = make_registry(drpo_mae)
    space = registry.build("feature", "latent-mae", {"weights": "tiny.pth", "keys": ["layer4_mean"]},
                           BuildContext(config_dir=tmp_path))
    assert space.input == "latents" and space.features(torch.randn(1, 4, 16, 16))["layer4_mean"].shape == (1, 1, 16)
    with pytest.raises(AssetError, match="features.weights: .*absent.pth does not exist"):
        registry.build("feature", "latent-mae", {"weights": "absent.pth"}, BuildContext(config_dir=tmp_path))


def test_without_weights_offline_it_names_the_asset_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(AssetError) as error:
        make_registry(drpo_mae).build("feature", "latent-mae", {}, BuildContext())
    message = str(error.value)
    assert "\n" not in message and "`drpo assets fetch latent-mae-256`" in message
    assert str(tmp_path / "cache" / "assets" / "latent-mae-256" / "mae_latent_256_torch.pth") in message
    assert message.endswith("or set features.weights to a local copy")


def test_the_generator_must_give_sd_vae_latents(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    recipe = {"generator": "tiny", "rankers": ["tiny-brightness"], "features": "latent-mae", "kernel": "tiny-laplacian",
              "prompts": {"path": str(tmp_path / "prompts.txt")}}
    with pytest.raises(ConfigError, match="'latent-mae' needs sd-vae-latents from the generator"):
        resolve_config(base=recipe, registry=make_registry(drpo_mae))


def test_sd_turbo_recommends_latent_mae(monkeypatch):
    monkeypatch.setenv("DRPO_LOAD_PLUGINS", "")
    registry = Registry().load_entry_points()
    assert registry.get("generator", "sd-turbo").recommended(None)["features.name"] == "latent-mae"
    assert "sd-vae-latents" in registry.get("generator", "sd-turbo").provides
    assert registry.get("feature", "latent-mae").requires == ("latents", "sd-vae-latents")
    with pytest.raises(PluginError, match="unknown feature"):
        make_registry().get("feature", "latent-mae")  # the test registries hold only what they are given


def test_a_run_saves_the_weights_path_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("DRPO_LOAD_PLUGINS", "")
    write_tiny_checkpoint(tmp_path / "tiny.pth")
    (tmp_path / "prompts.txt").write_text("a cat\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("generator: sd-turbo\nrankers: [brightness]\nfeatures: {name: latent-mae, weights: tiny.pth}\n"
                      "prompts: {path: prompts.txt}\n")
    monkeypatch.chdir(tmp_path.parent)
    resolved = resolve_config(recipe, registry=Registry().load_entry_points())
    assert resolved.options["features"].weights == "tiny.pth"
    assert f"weights: {tmp_path / 'tiny.pth'}" in resolved.portable_yaml()
