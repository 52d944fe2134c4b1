"""The raw-latent feature space is the official ``DirectLatentFeatureExtractor`` (method.md §5.5): patch
statistics over p x p patches, the full-resolution ``latent`` key, ``latent_norm``."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import drpo_latent
from drpo_core.errors import ComponentError, ConfigError
from drpo_core.pooling import patch_stats, spatial_stats
from drpo_latent.features import LatentFeatures
from tests.conftest import make_registry

GOLDEN = load_file(str(Path(__file__).parent / "data" / "mae" / "golden.safetensors"))
OFFICIAL_KEYS = sorted(key.removeprefix("latent/") for key in GOLDEN if key.startswith("latent/"))


def test_every_key_matches_the_official_extractor():
    assert OFFICIAL_KEYS == ["latent", "latent_mean", "latent_mean_2", "latent_mean_4", "latent_norm", "latent_std",
                             "latent_std_2", "latent_std_4"]
    ours = LatentFeatures(OFFICIAL_KEYS).features(GOLDEN["input"])
    for key in OFFICIAL_KEYS:
        assert ours[key].shape == GOLDEN[f"latent/{key}"].shape, key
        torch.testing.assert_close(ours[key], GOLDEN[f"latent/{key}"], atol=1e-5, rtol=0, msg=key)


def test_particle_counts_on_512px_latents():
    """64x64 latents: every pixel, one mean, (64/2)^2 2x2 patches and (64/4)^2 4x4 patches."""
    out = LatentFeatures(["latent", "latent_mean", "latent_norm", "latent_std_2", "latent_mean_4"]).features(
        torch.randn(3, 4, 64, 64))
    assert {key: tuple(v.shape) for key, v in out.items()} == {
        "latent": (3, 4096, 4), "latent_mean": (3, 1, 4), "latent_norm": (3, 1, 4), "latent_std_2": (3, 1024, 4),
        "latent_mean_4": (3, 256, 4)}
    assert LatentFeatures(["latent"], stride=4).features(torch.randn(1, 4, 64, 64))["latent"].shape == (1, 256, 4)


def test_patches_are_row_major_and_their_statistics_exact():
    x = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(1, 2, 4, 4)
    mean, std = patch_stats(x, 2)
    assert mean.shape == (1, 4, 2)
    assert mean[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # patches (0,0), (0,1), (1,0), (1,1)
    torch.testing.assert_close(std[0, 0, 0], torch.tensor(4.25 + 1e-6, dtype=torch.float64).sqrt())
    whole_mean, whole_std = spatial_stats(x)
    torch.testing.assert_close(patch_stats(x, 4)[0], whole_mean)
    torch.testing.assert_close(patch_stats(x, 4)[1], whole_std)
    with pytest.raises(ValueError, match="a 4x4 map does not split into 3x3 patches"):
        patch_stats(x, 3)


def test_defaults_and_key_checks():
    options = drpo_latent.LatentOptions()
    assert options.keys == list(drpo_latent.DEFAULT_KEYS) and options.stride == 1
    registry = make_registry()
    with pytest.raises(ConfigError, match="unknown key 'latent_max'"):
        registry.validate_options("feature", "latent", {"keys": ["latent_max"]}, "features")
    assert registry.validate_options("feature", "latent", {"keys": ["latent_mean_8"]}, "features").keys == [
        "latent_mean_8"]
    with pytest.raises(ComponentError, match="latent feature key .latent_mean_3.: a 16x16 map does not split into 3x3"):
        LatentFeatures(["latent_mean_3"]).features(torch.randn(1, 4, 16, 16))
