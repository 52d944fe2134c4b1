"""Offline, a run's missing hub models are named all at once before any model loads
(``drpo_core.preflight.check_models_cached``)."""

import pytest

from drpo_core.config import resolve_config
from drpo_core.errors import PluginError
from drpo_core.preflight import check_models_cached

SD_TURBO, CLIP_L = "stabilityai/sd-turbo", "openai/clip-vit-large-patch14"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def resolved(builtin_registry, tmp_path, *assignments):
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    return resolve_config(flags={"generator": "sd-turbo", "rankers": "clip"}, registry=builtin_registry,
                          assignments=[f"prompts.path={tmp_path / 'prompts.txt'}", *assignments])


def test_every_missing_model_is_named_in_one_line_with_its_key(builtin_registry, tmp_path, empty_cache):
    with pytest.raises(PluginError) as error:
        check_models_cached(resolved(builtin_registry, tmp_path))
    assert str(error.value) == (
        f"models not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: generator.model {SD_TURBO}, "
        f"rankers.0.model {CLIP_L}; download first (hf download {SD_TURBO} && hf download {CLIP_L}) or set those "
        "options to local directories")


def test_cached_snapshots_and_local_folders_count_as_present(builtin_registry, tmp_path, empty_cache):
    snapshot = empty_cache / "models--stabilityai--sd-turbo" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    with pytest.raises(PluginError) as error:
        check_models_cached(resolved(builtin_registry, tmp_path))
    assert f"rankers.0.model {CLIP_L};" in str(error.value) and SD_TURBO not in str(error.value)
    local = tmp_path / "my-clip"
    local.mkdir()
    check_models_cached(resolved(builtin_registry, tmp_path, f"rankers.0.model={local}"))  # nothing missing


def test_an_options_class_can_say_which_models_a_variant_loads(builtin_registry, tmp_path, empty_cache):
    (empty_cache / "models--stabilityai--sd-turbo" / "snapshots" / "0").mkdir(parents=True)
    (empty_cache / "models--stabilityai--sd-turbo" / "snapshots" / "0" / "model_index.json").write_text("{}")
    counting = resolve_config(flags={"generator": "sd-turbo", "rankers": "geneval:counting"},
                              registry=builtin_registry)
    with pytest.raises(PluginError) as error:  # the detector's default, no CLIP: counting has no colours
        check_models_cached(counting)
    assert "rankers.0.detector_model facebook/mask2former-swin-small-coco-instance;" in str(error.value)
    assert CLIP_L not in str(error.value)
    colours = resolve_config(flags={"generator": "sd-turbo", "rankers": "geneval:colors"}, registry=builtin_registry)
    with pytest.raises(PluginError, match=f"rankers.0.clip_model {CLIP_L}"):
        check_models_cached(colours)


def test_online_nothing_is_checked(builtin_registry, tmp_path, empty_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_models_cached(resolved(builtin_registry, tmp_path))  # the models download when they load
