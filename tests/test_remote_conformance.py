"""One conformance suite for both ranker servers: `drpo serve-ranker` (tiny-brightness) and the stdlib-only
reference script (its stub scorer, the same mean pixel value). Same wire format, same answers."""

from __future__ import annotations

import base64
import json
import multiprocessing
import time
import urllib.error
import urllib.request

import pytest
import torch

from drpo_core.context import BuildContext
from drpo_core.errors import ConfigError
from drpo_remote.client import RemoteOptions, RemoteRanker, RemoteRankerError
from drpo_remote.wire import quantise, score_request
from tests.remote_servers import drpo_server, free_port, reference_server

TOKEN = {"CONFORMANCE_TOKEN": "s3cret-token"}


@pytest.fixture(scope="module", params=["serve-ranker", "reference"])
def server(request, tmp_path_factory):
    port = free_port()
    if request.param == "serve-ranker":
        made = drpo_server(tmp_path_factory.mktemp("serve"), "tiny-brightness", port, "--token-env",
                           "CONFORMANCE_TOKEN", "--max-batch", "3", env=TOKEN)
    else:
        made = reference_server(port, "--scorer", "stub", "--token-env", "CONFORMANCE_TOKEN", env=TOKEN)
    made.start()
    yield made
    made.kill()


def _client(server, monkeypatch, **options) -> RemoteRanker:
    monkeypatch.setenv("CONFORMANCE_TOKEN", TOKEN["CONFORMANCE_TOKEN"])
    return RemoteRanker(server.url, RemoteOptions(token_env="CONFORMANCE_TOKEN", **options), 10.0, binary=False)


def _post(url: str, body: bytes, token: str | None = TOKEN["CONFORMANCE_TOKEN"]) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + "/v1/score", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _expected(images: torch.Tensor) -> torch.Tensor:
    """The mean pixel value of the images as the wire carries them (uint8)."""
    return quantise(images).double().div(255).mean(dim=(1, 2, 3)).float()


def test_health_is_open_and_metadata_names_the_ranker_and_api(server, monkeypatch):
    with urllib.request.urlopen(server.url + "/v1/health", timeout=5) as answer:
        assert json.loads(answer.read()) == {"status": "ok"}
    meta = _client(server, monkeypatch).metadata
    assert meta["api"] == 1 and meta["binary"] is False and meta["name"] in ("tiny-brightness", "stub")
    assert {"name", "variant", "binary", "api", "drpo_version"} <= set(meta)


def test_scores_are_those_of_the_uint8_images_in_order(server, monkeypatch):
    images = torch.rand(7, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    ranker = _client(server, monkeypatch, batch_size=4)  # two requests; the drpo server scores in chunks of 3
    scores = ranker.score(images, [f"p{i}" for i in range(7)], [{"i": i} for i in range(7)])
    assert scores.dtype == torch.float32 and scores.shape == (7,)
    torch.testing.assert_close(scores, _expected(images), rtol=0, atol=1e-6)


def test_each_answer_carries_its_request_id(server):
    images = torch.rand(2, 3, 4, 4)
    status, answer = _post(server.url, score_request("req-42", images, ["a", "b"], [None, None]))
    assert status == 200 and answer["id"] == "req-42" and len(answer["scores"]) == 2


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_a_missing_or_wrong_token_gets_401(server, token, monkeypatch):
    status, answer = _post(server.url, score_request("r", torch.rand(1, 3, 4, 4), ["a"], [None]), token=token)
    assert status == 401 and answer["error"] == ("no bearer token" if token is None else "wrong bearer token")
    monkeypatch.setenv("WRONG_TOKEN", "nope")
    start = time.monotonic()
    with pytest.raises(RemoteRankerError, match=rf"ranker server {server.url} refused the token \(HTTP 401: "
                                                r"wrong bearer token\); the token comes from \$WRONG_TOKEN"):
        RemoteRanker(server.url, RemoteOptions(token_env="WRONG_TOKEN"), 10.0, binary=False)
    assert time.monotonic() - start < 2  # refused tokens are not retried


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (json.dumps({"id": "x", "images": {"dtype": "uint8", "shape": [1, 3, 2, 2], "data": "!!"},
                 "prompts": ["a"]}).encode(), '"images.data" is not base64'),
    (json.dumps({"id": "x", "images": {"dtype": "uint8", "shape": [1, 3, 2, 2],
                                       "data": base64.b64encode(bytes(5)).decode()},
                 "prompts": ["a"]}).encode(), "holds 5 bytes, shape [1, 3, 2, 2] needs 12"),
    (json.dumps({"id": "x", "images": {"dtype": "uint8", "shape": [2, 3, 2, 2],
                                       "data": base64.b64encode(bytes(24)).decode()},
                 "prompts": ["a"]}).encode(), "2 images, 1 prompts and 1 metadata"),
    (json.dumps({"id": "x", "images": {"dtype": "float32", "shape": [1, 3, 2, 2], "data": ""},
                 "prompts": ["a"]}).encode(), '"dtype": "uint8"'),
    (json.dumps({"id": "x", "images": {"dtype": "uint8", "shape": [1, 1, 2, 2],
                                       "data": base64.b64encode(bytes(4)).decode()},
                 "prompts": ["a"]}).encode(), '"images.shape" [1, 1, 2, 2]: images must be RGB, C = 3 (got C = 1)'),
])
def test_a_malformed_request_gets_400_with_the_reason(server, body, message):
    status, answer = _post(server.url, body)
    assert status == 400 and message in answer["error"], answer


def _client_process(url: str, token: str, client: int, requests: int) -> list[tuple[str, str, list, list]]:
    """A separate process: ``requests`` requests of images whose every pixel is a distinct uint8 value."""
    out = []
    for r in range(requests):
        values = [client * 40 + r * 4 + i for i in range(3)]  # distinct over clients, requests and images
        images = torch.stack([torch.full((3, 8, 8), v / 255) for v in values])
        request_id = f"client{client}-request{r}"
        status, answer = _post(url, score_request(request_id, images, ["p"] * 3, [None] * 3), token)
        assert status == 200, answer
        out.append((request_id, answer["id"], [v / 255 for v in values], answer["scores"]))
    return out


def test_concurrent_client_processes_get_their_own_scores_in_order(server):
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        jobs = [pool.apply_async(_client_process, (server.url, TOKEN["CONFORMANCE_TOKEN"], c, 5)) for c in range(4)]
        results = [job.get(timeout=120) for job in jobs]
    for answers in results:
        for sent, returned, expected, scores in answers:
            assert returned == sent
            assert scores == pytest.approx(expected, abs=1e-6)


def test_the_remote_ranker_needs_a_deadline_and_a_url():
    from drpo_remote import _build_graded

    with pytest.raises(ConfigError) as error:  # a hint that holds in a recipe, drpo eval and drpo doctor alike
        _build_graded(RemoteOptions(), BuildContext(variant="http://127.0.0.1:1"))
    assert str(error.value) == ("ranker remote:http://127.0.0.1:1 needs a timeout (seconds one score call may take, "
                                "retries included): `timeout: 120` in its ranker section of a recipe, or --set "
                                "rankers.NAME.timeout=120 with drpo eval and drpo doctor")
