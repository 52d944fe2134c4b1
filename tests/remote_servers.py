"""Ranker servers for the remote-ranker tests: `drpo serve-ranker` with the fakes, the reference script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "reference-ranker-server" / "serve.py"

# `drpo serve-ranker` with the fakes registered (tiny-brightness, tiny-broken, tiny-slow) beside drpo_remote
SERVE = textwrap.dedent("""
    import sys
    import drpo_remote
    from drpo_core.registry import set_registry
    from drpo_core.testing import make_registry, slow_plugin

    set_registry(make_registry(drpo_remote, slow_plugin))
    from drpo_cli.main import app
    app(sys.argv[1:])
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """A server subprocess on 127.0.0.1:``port``; ``start()`` returns once /v1/health answers."""

    def __init__(self, command: list[str], port: int, env: dict[str, str] | None = None):
        self.command, self.port, self.env = command, port, {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, seconds: float = 90) -> Server:
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, self.process.communicate()
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1) as answer:
                    if json.loads(answer.read()) == {"status": "ok"}:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{self.command} did not come up"
            time.sleep(0.1)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=30)


def drpo_server(tmp_path: Path, ranker: str, port: int, *args: str, env: dict[str, str] | None = None) -> Server:
    script = tmp_path / "serve_fakes.py"
    script.write_text(SERVE)
    return Server([sys.executable, str(script), "serve-ranker", ranker, "--port", str(port), "--device", "cpu",
                   *args], port, env)


def reference_server(port: int, *args: str, env: dict[str, str] | None = None) -> Server:
    return Server([sys.executable, str(REFERENCE), "--port", str(port), *args], port, env)
