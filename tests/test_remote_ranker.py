"""The remote ranker in a run's config, and what the wire's uint8 images change in the scores."""

from __future__ import annotations

import pytest
import torch

import drpo_clip_rankers
import drpo_image_rankers
import drpo_remote
from drpo_clip_rankers.testing import make_tiny_clip
from drpo_core.config import resolve_config
from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError
from drpo_remote.client import RemoteOptions, RemoteRanker
from drpo_remote.wire import quantise
from tests.conftest import DRPO, make_registry
from tests.remote_servers import Server, free_port

from .test_trainer import tiny_config


def test_a_remote_ranker_is_named_by_its_url_and_a_bad_url_is_one_line(tmp_path):
    registry = make_registry(drpo_remote)
    url = "http://127.0.0.1:8765"
    config = tiny_config(tmp_path, rankers=[{"name": f"remote:{url}", "timeout": 30, "token_env": "T"}])
    resolved = resolve_config(base=config, registry=registry)
    assert resolved.config.rankers[0].name == f"remote:{url}" and resolved.config.rankers[0].timeout == 30
    assert resolved.options["rankers.0"].token_env == "T"
    for bad, message in (("remote:ftp://host", "expected a server URL such as http://127.0.0.1:8765"),
                         ("remote:http://host:99999", "Port out of range")):
        with pytest.raises(ConfigError, match=rf"rankers.0: ranker 'remote': variant '{bad[7:]}': {message}"):
            resolve_config(base={**config, "rankers": [bad]}, registry=registry)


def test_a_remote_ranker_without_a_timeout_is_refused_in_resolve(tmp_path):
    registry = make_registry(drpo_remote)
    config = tiny_config(tmp_path, rankers=["remote:http://127.0.0.1:8765"])
    with pytest.raises(ConfigError, match=r"^rankers.0.timeout: ranker 'remote' needs a timeout .* "
                                          r"--set rankers.0.timeout=120 \(rankers.0.name from "):
        resolve_config(base=config, registry=registry)
    graded = tiny_config(tmp_path, rankers=["brightness"])
    with pytest.raises(ConfigError, match=r"^eval.rankers.0.timeout: ranker 'remote-binary' needs a timeout"):
        resolve_config(base={**graded, "eval": {"rankers": ["remote-binary:http://127.0.0.1:8765"]}},
                       registry=make_registry(drpo_remote, drpo_image_rankers))


def test_an_unset_token_variable_is_one_line(monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token_env: the environment variable NO_SUCH_TOKEN is not set"):
        RemoteRanker("http://127.0.0.1:1", RemoteOptions(token_env="NO_SUCH_TOKEN"), 5, binary=False)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip")


def test_served_pickscore_equals_the_in_process_one_bit_for_bit(tiny_clip):
    """PickScore (like every CLIP-family ranker here) rounds its images to 8 bits itself (round(255 x), as
    diffusers' numpy_to_pil does): the wire's uint8 images are the very pixels it would have used."""
    options = {"model": str(tiny_clip), "processor": str(tiny_clip)}
    local = make_registry(drpo_clip_rankers).build("ranker", "pickscore", options, BuildContext())
    port = free_port()
    server = Server([DRPO, "serve-ranker", "pickscore", "--port", str(port), "--device", "cpu", "--max-batch", "12",
                     *[f"--set={key}={value}" for key, value in options.items()]], port,
                    env={"HF_HUB_OFFLINE": "1", "DRPO_LOAD_PLUGINS": "clip-rankers,remote"}).start()
    try:
        remote = RemoteRanker(server.url, RemoteOptions(batch_size=12), 30, binary=False)
        images = torch.rand(12, 3, 40, 48, generator=torch.Generator().manual_seed(1))
        prompts = [f"a photo of {i} cats" for i in range(12)]
        served, own = remote.score(images, prompts, [None] * 12), local.score(images, prompts, [None] * 12)
        print(f"served vs in process: max |difference| {float((served - own).abs().max()):.2e}")
        assert torch.equal(served, own)
    finally:
        server.kill()


def test_uint8_images_move_a_float_input_score_by_a_measured_bound(tiny_clip):
    """A ranker that reads float pixels sees each move by at most 1/510. The mean pixel value moves by at most
    that; tiny CLIP's tensor path (score_differentiable, no rounding of its own) by what is printed."""
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    rounded = quantise(images).float().div(255)
    assert float((rounded - images).abs().max()) <= 1 / 510 + 1e-7
    brightness = (rounded.mean(dim=(1, 2, 3)) - images.mean(dim=(1, 2, 3))).abs().max()
    assert float(brightness) <= 1 / 510
    ranker = make_registry(drpo_clip_rankers).build(
        "ranker", "pickscore", {"model": str(tiny_clip), "processor": str(tiny_clip)}, BuildContext())
    prompts = ["a photo of a cat"] * 64
    with torch.no_grad():
        exact, wire = ranker.score_differentiable(images, prompts), ranker.score_differentiable(rounded, prompts)
    change, spread = float((wire - exact).abs().max()), float(exact.std())
    print(f"tiny CLIP, float path: max |score change| {change:.2e}, {change / spread:.2%} of the scores' std "
          f"{spread:.2e}; order kept for {float((wire.argsort() == exact.argsort()).float().mean()):.0%} of ranks")
    assert change < 0.02 * spread
