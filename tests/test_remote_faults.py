"""A remote ranker's server that misbehaves (127.0.0.1 only, deadlines of seconds): each fault ends in one
bounded, clear error naming the URL; a run whose server comes back in time loses nothing, and one that
gives up checkpoints at the failing step's start and resumes bit-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import drpo_remote
from drpo_core import checkpoint as ckpt
from drpo_core.config import resolve_config
from drpo_core.metrics import read_metrics
from drpo_core.trainer import Trainer
from drpo_remote.client import RemoteOptions, RemoteRanker, RemoteRankerError
from tests.conftest import make_registry
from tests.remote_servers import drpo_server, free_port

from .test_trainer import tiny_config


class _Misbehaving(BaseHTTPRequestHandler):
    """Answers metadata properly and score requests as ``server.mode`` says."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # "slow": the client gave up waiting
            pass

    def do_GET(self):
        self._send(200, json.dumps({"api": 1, "name": "fake", "variant": None, "binary": False}).encode())

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n, mode, rid = len(request["prompts"]), self.server.mode, request["id"]  # type: ignore[attr-defined]
        self.server.calls += 1  # type: ignore[attr-defined]
        if mode == "slow":
            time.sleep(5)
        answers = {
            "500": (500, json.dumps({"error": "the scorer ran out of memory"}).encode()),
            "malformed": (200, b"<html>proxy error</html>"),
            "nan-token": (200, f'{{"id": "{rid}", "scores": [NaN{", 0.5" * (n - 1)}]}}'.encode()),
            "count": (200, json.dumps({"id": rid, "scores": [0.5] * (n - 1)}).encode()),
            "wrong-id": (200, json.dumps({"id": "someone-else", "scores": [0.5] * n}).encode()),
            "null": (200, json.dumps({"id": rid, "scores": [None] + [0.5] * (n - 1)}).encode()),
        }
        self._send(*answers.get(mode, (200, json.dumps({"id": rid, "scores": [0.5] * n}).encode())))


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Misbehaving)
    server.mode, server.calls, server.daemon_threads = "ok", 0, True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _ranker(url: str, deadline: float = 4.0, **options) -> RemoteRanker:
    options = {"retries": 3, "backoff": 0.1, "request_timeout": 0.5, **options}
    return RemoteRanker(url, RemoteOptions(**options), deadline, binary=False)


def _score(ranker: RemoteRanker, n: int = 4) -> torch.Tensor:
    return ranker.score(torch.rand(n, 3, 4, 4), ["a"] * n, [None] * n)


def test_a_server_never_started_fails_after_the_retries_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RemoteRankerError, match=rf"ranker server {url}: metadata failed 4 time\(s\) in .* s "
                                                r"\(deadline 3.6 s, retries 3\); last: cannot connect \(Connection refused\)"):
        _ranker(url)
    assert time.monotonic() - start < 0.1 + 0.2 + 0.4 + 1.0  # the three backoffs, and the connections


@pytest.mark.parametrize(("mode", "message", "calls"), [
    ("500", r"score failed 4 time\(s\) .*last: HTTP 500: the scorer ran out of memory", 4),
    ("slow", r"score failed 4 time\(s\) .*last: no answer within 0.5 s \(request_timeout\)", None),
    ("malformed", r"answered wrongly: the response is not valid JSON", 1),
    ("nan-token", r"answered wrongly: the response is not valid JSON: NaN is not a JSON value "
                  r"\(non-finite scores are null\)", 1),
    ("count", r"answered wrongly: 3 scores for 4 images", 1),
    ("wrong-id", r"answered wrongly: the response answers request 'someone-else', not '[0-9a-f]{32}'", 1),
])
def test_each_bad_answer_is_one_bounded_error_naming_the_url(fake, mode, message, calls):
    url = f"http://127.0.0.1:{fake.server_port}"
    ranker = _ranker(url)
    fake.mode = mode
    start = time.monotonic()
    with pytest.raises(RemoteRankerError, match=rf"ranker server {url}.*{message}"):
        _score(ranker)
    took = time.monotonic() - start
    assert took < 4.0, took  # within the deadline (a retried failure) or at once (a wrong answer)
    if calls is not None:
        assert fake.calls == calls  # wrong answers are not retried; server errors are, `retries` times
    if mode == "slow":  # 4 attempts waited their request_timeout, with backoffs of 0.1, 0.2 and 0.4 s between
        assert fake.calls == 4 and 4 * 0.5 + 0.7 <= took


def test_a_null_score_is_nan_for_the_loop_to_skip(fake):
    ranker = _ranker(f"http://127.0.0.1:{fake.server_port}")
    fake.mode = "null"
    scores = _score(ranker)
    assert torch.isnan(scores[0]) and torch.equal(scores[1:], torch.full((3,), 0.5))


def test_a_server_error_that_passes_is_retried_without_loss(fake):
    ranker = _ranker(f"http://127.0.0.1:{fake.server_port}", retries=5)
    fake.mode = "500"
    threading.Timer(0.25, lambda: setattr(fake, "mode", "ok")).start()
    assert torch.equal(_score(ranker), torch.full((4,), 0.5)) and fake.calls >= 2


# -- a run whose server goes away -------------------------------------------------------------------------

TRAIN = textwrap.dedent("""
    import sys
    import drpo_kernels, drpo_latent, drpo_remote
    from drpo_core.registry import set_registry
    from drpo_core.testing import make_registry

    set_registry(make_registry(drpo_kernels, drpo_latent, drpo_remote))
    from drpo_cli.main import app
    app(sys.argv[1:])
""")


def _cli(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "train_cli.py"
    script.write_text(TRAIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _config(tmp_path: Path, url: str, output: str, **ranker) -> dict:
    remote = {"name": f"remote:{url}", "timeout": 4, "retries": 3, "backoff": 0.2, "request_timeout": 1, **ranker}
    return tiny_config(tmp_path, rankers=[remote], prompts={"eval_count": 0}, train={"steps": 6},
                       checkpoint={"every": 3}, output_dir=str(tmp_path / output))


def _when_steps(run: Path, steps: int, action) -> threading.Thread:
    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= steps:
                action()
                return
            time.sleep(0.005)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(path)]


def _same_run(a: Path, b: Path) -> None:
    wa, wb = ckpt.load_checkpoint(a).trainable, ckpt.load_checkpoint(b).trainable
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _without_time(a / "metrics.jsonl") == _without_time(b / "metrics.jsonl")


def _train(config: dict) -> Trainer:
    registry = make_registry(drpo_remote)
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_a_server_killed_mid_run_checkpoints_the_step_start_and_the_resumed_run_is_bit_identical(tmp_path):
    port = free_port()
    server = drpo_server(tmp_path, "tiny-brightness", port).start()
    try:
        straight = _train(_config(tmp_path, server.url, "straight")).run_dir
        run = tmp_path / "killed"
        killed_at: list[float] = []
        _when_steps(run, 2, lambda: (server.kill(), killed_at.append(time.monotonic())))
        process = _cli(tmp_path, "--config", _write(tmp_path, _config(tmp_path, server.url, "killed")))
        _, err = process.communicate(timeout=300)
        took = time.monotonic() - killed_at[0]
        assert process.returncode == 2, err
        assert err.strip().splitlines() == [err.strip()] and "Traceback" not in err
        completed = len(read_metrics(run / "metrics.jsonl"))
        assert f"ranker server {server.url}: score failed" in err and "cannot connect" in err
        assert f"step-{completed:06d} ({completed} completed steps): resume with `drpo train --resume latest" in err
        assert took < 4 + 6, took  # the deadline, then the checkpoint and the interpreter's exit
        print(f"server killed after step {completed}: the run exited {took:.2f} s later (deadline 4 s)")
        server.start()  # the server is back: the run resumes from its directory alone
        resumed = _cli(tmp_path, "--resume", "latest", "--output-dir", str(run))
        _, err = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, err
        _same_run(straight, run)
    finally:
        server.kill()


@pytest.mark.slow
def test_a_server_back_within_the_retry_window_loses_nothing(tmp_path):
    port = free_port()
    server = drpo_server(tmp_path, "tiny-brightness", port).start()
    try:
        straight = _train(_config(tmp_path, server.url, "straight")).run_dir
        run = tmp_path / "restarted"
        seen: dict[str, float] = {}

        def restart() -> None:  # down for a server's start-up (seconds), while the run is mid-way
            server.kill()
            seen["steps at the kill"] = len(read_metrics(run / "metrics.jsonl"))
            server.start()
            seen["back"] = time.monotonic()

        watcher = _when_steps(run, 2, restart)
        _train(_config(tmp_path, server.url, "restarted", timeout=60, retries=12, backoff=0.1))
        ended = time.monotonic()
        watcher.join(1)
        assert seen["steps at the kill"] < 6 and ended > seen["back"]  # the run waited for the server
        _same_run(straight, run)
    finally:
        server.kill()


def _write(tmp_path: Path, config: dict) -> str:
    path = tmp_path / f"recipe-{time.monotonic_ns()}.yaml"
    path.write_text(json.dumps(config))
    return str(path)


def test_a_binary_or_graded_server_must_match_the_ranker_named(fake):
    from drpo_core.errors import ConfigError

    url = f"http://127.0.0.1:{fake.server_port}"
    with pytest.raises(ConfigError, match=rf"{url} serves 'fake', whose scores are graded: use the ranker "
                                          rf"remote:{url}"):
        RemoteRanker(url, RemoteOptions(), 5, binary=True)
