"""The asset registry: cache, checksums, offline, atomic downloads, one-line errors; all with file:// URLs."""

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from drpo_cli.main import app
from drpo_core import assets, hookimpl
from drpo_core.assets import Asset, load_checkpoint
from drpo_core.errors import AssetError, PluginError
from drpo_core.registry import registry_from, set_registry

PAYLOAD = b"weights " * 1000


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh DRPO_CACHE, downloads off as in every test (HF_HUB_OFFLINE); file:// URLs still work."""
    monkeypatch.setenv("DRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DRPO_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "published" / "model+v1.pth"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


def local_asset(source: Path, **changes) -> Asset:
    fields = {"name": "tiny", "url": source.as_uri(), "sha256": hashlib.sha256(PAYLOAD).hexdigest(),
              "licence": "MIT", **changes}
    return Asset(**fields)


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part")) if folder.exists() else []


# -- the record ---------------------------------------------------------------------------------------


def test_an_asset_checks_its_fields_and_names_its_file_after_the_url():
    asset = Asset("x", "https://example.org/a/sac%2Blogos.pth", "A" * 64, "MIT")
    assert asset.filename == "sac+logos.pth" and asset.sha256 == "a" * 64
    assert Asset("x", "file:///tmp/w.bin", "unverified", "MIT").verifiable is False
    with pytest.raises(ValueError, match="64 hex digits"):
        Asset("x", "https://example.org/w.bin", "abc", "MIT")
    with pytest.raises(ValueError, match="not one of https, http, file, hf"):
        Asset("x", "ftp://example.org/w.bin", "unverified", "MIT")
    with pytest.raises(ValueError, match="plain file name"):
        Asset("x", "https://example.org/w.bin", "unverified", "MIT", filename="../w.bin")


def test_the_cache_follows_drpo_cache_then_xdg(monkeypatch, tmp_path):
    assert assets.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("DRPO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "drpo"


# -- fetch ----------------------------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_caches(source, cache):
    asset = local_asset(source)
    assert assets.state(asset).status == "missing"
    seen = []
    path = assets.fetch(asset, progress=lambda done, total: seen.append((done, total)))
    assert path == cache / "assets" / "tiny" / "model+v1.pth" and path.read_bytes() == PAYLOAD
    assert seen[-1][0] == len(PAYLOAD)
    assert assets.state(asset).status == "verified" and leftovers(cache) == []
    source.unlink()  # cached: nothing is downloaded again
    assert assets.fetch(asset) == path == assets.path(asset)


def test_a_checksum_mismatch_keeps_nothing(source, cache):
    asset = local_asset(source, sha256="0" * 64)
    with pytest.raises(AssetError) as error:
        assets.fetch(asset)
    message = one_line(error)
    assert f"has SHA-256 {hashlib.sha256(PAYLOAD).hexdigest()}, not the registered {'0' * 64}: not kept" in message
    assert not (cache / "assets" / "tiny" / "model+v1.pth").exists() and leftovers(cache) == []


def test_a_forced_fetch_that_fails_leaves_the_cached_file_alone(source, cache):
    asset = local_asset(source)
    path = assets.fetch(asset)
    source.write_bytes(b"something else")
    with pytest.raises(AssetError, match="not kept"):
        assets.fetch(asset, force=True)
    assert path.read_bytes() == PAYLOAD and leftovers(cache) == []


def test_an_unreachable_source_is_one_line_naming_where_to_put_the_file(tmp_path, cache):
    asset = local_asset(tmp_path / "nowhere.pth")
    with pytest.raises(AssetError) as error:
        assets.fetch(asset)
    assert "could not download asset 'tiny'" in one_line(error)
    assert str(cache / "assets" / "tiny" / "nowhere.pth") in str(error.value) and leftovers(cache) == []


def test_missing_while_offline_says_which_file_to_put_where(cache):
    asset = Asset("remote", "https://example.invalid/models/w.pth", "unverified", "MIT")
    with pytest.raises(AssetError) as error:
        assets.path(asset, alternative="set features.weights to a local copy")
    message = one_line(error)
    assert message == (
        "asset 'remote' (w.pth) is not cached and HF_HUB_OFFLINE is set: run `drpo assets fetch remote` where you "
        f"are online, or download https://example.invalid/models/w.pth to {cache / 'assets' / 'remote' / 'w.pth'}, "
        "or set features.weights to a local copy")
    with pytest.raises(AssetError, match="HF_HUB_OFFLINE is set"):
        assets.fetch(asset)


def test_drpo_offline_turns_downloads_off_too(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("DRPO_OFFLINE", "1")
    with pytest.raises(AssetError, match="DRPO_OFFLINE is set"):
        assets.path(Asset("remote", "https://example.invalid/w.pth", "unverified", "MIT"))


def test_a_file_put_in_place_by_hand_is_verified_once(source, cache):
    asset = local_asset(source, url="https://example.invalid/model+v1.pth")
    target = cache / "assets" / "tiny" / "model+v1.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(PAYLOAD)
    assert assets.state(asset).status == "not checked yet"
    assert assets.path(asset) == target  # offline, yet present: hashed, remembered
    assert assets.state(asset).status == "verified"
    target.write_bytes(PAYLOAD[:-1] + b"X")  # replaced: checked again
    with pytest.raises(AssetError) as error:
        assets.path(asset)
    assert "delete it and run `drpo assets fetch tiny`" in one_line(error)


def test_an_unverified_asset_is_used_and_listed_as_such(source):
    asset = local_asset(source, sha256="unverified")
    assert assets.path(asset).read_bytes() == PAYLOAD  # file:// is local: fetched even offline
    assert assets.state(asset).status == "unverified (no checksum registered)"


# -- Hugging Face hub assets go through huggingface_hub's cache ------------------------------------------


def hub_cache(root: Path, repo: str, inner: str, data: bytes) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    commit = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / inner
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


def test_a_hub_asset_is_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    asset = Asset("hubbed", "hf://org/model/heads/mlp.pth", hashlib.sha256(PAYLOAD).hexdigest(), "MIT")
    with pytest.raises(AssetError) as error:
        assets.path(asset)
    assert "`hf download org/model heads/mlp.pth`" in one_line(error)
    cached = hub_cache(tmp_path / "hub", "org/model", "heads/mlp.pth", PAYLOAD)
    assert assets.path(asset) == cached and assets.state(asset).status == "verified"
    assert assets.fetch(asset) == cached  # offline: the cached file


# -- loading checkpoints ---------------------------------------------------------------------------------


def test_a_checkpoint_weights_only_refuses_is_one_line_saying_what_to_do(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(AssetError) as error:
        load_checkpoint(path)
    message = one_line(error)
    assert "torch.load(weights_only=True) refuses it, as it holds argparse.Namespace" in message
    assert "save only its tensors" in message
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AssetError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(AssetError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pth")
    torch.save({"w": torch.ones(3)}, tmp_path / "plain.pth")
    assert torch.equal(load_checkpoint(tmp_path / "plain.pth")["w"], torch.ones(3))


# -- plugins register assets; the CLI lists and fetches them ---------------------------------------------


class AssetPlugin:
    def __init__(self, source: Path):
        self.source = source

    @hookimpl
    def drpo_register_assets(self, register):
        register("tiny", url=self.source.as_uri(), sha256=hashlib.sha256(PAYLOAD).hexdigest(), licence="MIT",
                 summary="a test file")
        register("remote", url="https://example.invalid/w.pth", sha256="unverified", licence="not stated")


@pytest.fixture
def with_assets(source):
    registry = registry_from([AssetPlugin(source)])
    set_registry(registry)
    yield registry
    set_registry(None)


def test_plugins_register_assets_looked_up_by_name(with_assets):
    assert with_assets.names("asset") == ["remote", "tiny"]
    assert with_assets.asset("tiny").summary == "a test file"
    assert [a.name for a in with_assets.assets()] == ["remote", "tiny"]
    assert ("asset", "tiny") in with_assets.plugins[0].components
    with pytest.raises(PluginError, match="unknown asset 'tin': did you mean tiny.*drpo assets list"):
        with_assets.asset("tin")


def test_a_bad_asset_registration_marks_the_plugin_broken():
    class Bad:
        @hookimpl
        def drpo_register_assets(self, register):
            register("bad", url="https://example.org/w.bin", sha256="123", licence="MIT")

    registry = registry_from([Bad()])
    assert registry.plugins[0].state == "broken" and "64 hex digits" in registry.plugins[0].error
    assert registry.names("asset") == []


def test_drpo_assets_list_and_fetch(with_assets, cache):
    runner = CliRunner()
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["assets", "list", "--json"]).stdout)}
    assert rows["tiny"]["status"] == "missing" and rows["tiny"]["licence"] == "MIT"
    assert rows["tiny"]["path"] == str(cache / "assets" / "tiny" / "model+v1.pth")
    result = runner.invoke(app, ["assets", "fetch", "tiny"])
    assert result.exit_code == 0, result.output
    assert f"tiny: fetched at {cache / 'assets' / 'tiny' / 'model+v1.pth'} (verified)" in result.stdout
    assert "already cached" in runner.invoke(app, ["assets", "fetch", "tiny"]).stdout
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["assets", "list", "--json"]).stdout)}
    assert rows["tiny"]["status"] == "verified"
    assert "tiny" in runner.invoke(app, ["assets", "list"]).stdout
    failed = runner.invoke(app, ["assets", "fetch", "remote"])
    assert failed.exit_code == 2 and failed.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in failed.stderr


def test_the_builtin_assets(monkeypatch):
    from drpo_core.registry import Registry

    monkeypatch.setenv("DRPO_LOAD_PLUGINS", "")
    registry = Registry().load_entry_points()
    mae, aesthetic = registry.asset("latent-mae-256"), registry.asset("laion-aesthetic-mlp")
    assert mae.filename == "mae_latent_256_torch.pth"
    assert mae.sha256 == "4810249905d2882a41d5a0fe97ebac995af8918dbe121daa9871e5bc605445b1"  # method.md §5.1
    assert aesthetic.filename == "sac+logos+ava1-l14-linearMSE.pth" and aesthetic.licence == "Apache-2.0"
