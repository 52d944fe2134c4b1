"""Remote rankers from the command line as a new user meets them: `drpo serve-ranker` on a taken port is one line
(exit 2) before it claims to serve; `drpo eval` and `drpo doctor` take the section's ``timeout`` (as a recipe's,
or ``--set rankers.NAME.timeout=SECONDS``) and run the remote ranker in a worker process, as training does, and
say how to give the timeout when it is missing."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

import drpo_image_rankers
import drpo_remote
from drpo_cli.main import app
from drpo_core.context import BuildContext
from drpo_core.report import build_rankers, check_rankers
from drpo_core.worker import WorkerRanker
from tests.conftest import DRPO, TINY_RUN
from tests.remote_servers import Server, free_port

NEEDS = "needs a timeout (seconds one score call may take, retries included), e.g. --set"


@pytest.fixture(scope="module")
def brightness_server():
    """`drpo serve-ranker brightness`: mean luminance, declared to ignore the prompt."""
    port = free_port()
    server = Server([DRPO, "serve-ranker", "brightness", "--port", str(port), "--device", "cpu"], port).start()
    yield server
    server.kill()


@pytest.fixture
def remote_registry(isolated_registry, monkeypatch, tmp_path):
    isolated_registry.register_module(drpo_remote)
    isolated_registry.register_module(drpo_image_rankers)
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a warm sunset\na cold lake\na red apple\n")
    return isolated_registry


def test_a_taken_port_is_one_line_and_exit_2_before_serving(isolated_registry):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve-ranker", "tiny-brightness", "--port", str(port), "--device", "cpu"])
    assert (result.exit_code, result.output.strip()) == (
        2, f"Error: --port {port}: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_eval_runs_a_remote_ranker_with_a_timeout_in_a_worker(brightness_server, remote_registry):
    remote = f"remote:{brightness_server.url}"
    checked = check_rankers([remote], [{"timeout": 30, "retries": 1}])
    (built,) = build_rankers([remote], checked, BuildContext())
    try:
        assert isinstance(built.ranker, WorkerRanker) and built.ranker.timeout == 30
    finally:
        built.ranker.close()


def test_eval_scores_with_a_remote_ranker_as_with_the_same_ranker_in_process(brightness_server, remote_registry):
    remote = f"remote:{brightness_server.url}"
    args = ["eval", "--generator", "tiny", "--prompts", "prompts.txt", "--seeds", "0,1", "--device", "cpu"]
    missing = CliRunner().invoke(app, [*args, "--ranker", remote])
    assert (missing.exit_code, missing.output.strip()) == (
        2, f"Error: rankers.{remote}.timeout: ranker 'remote' {NEEDS} rankers.0.timeout=120")
    result = CliRunner().invoke(app, [*args, "--ranker", "brightness", "--ranker", remote, "--set",
                                      f"rankers.{remote}.timeout=30", "--json", "report.json"])
    assert result.exit_code == 0, result.output
    means = {name: entry["base"]["mean"] for name, entry in json.loads(Path("report.json").read_text())
             ["rankers"].items()}
    assert means[remote] == pytest.approx(means["brightness"], abs=1 / 510)  # the wire's uint8 rounding at most


def test_doctor_checks_a_remote_ranker_whose_section_has_a_timeout(brightness_server, remote_registry):
    remote = f"remote:{brightness_server.url}"
    Path("rem.yaml").write_text(TINY_RUN + f"rankers: [{{name: '{remote}', timeout: 30}}]\n")
    passed = f"{remote}: PASS (prompt ignored as declared: the caption check does not apply; scores "
    for args in (["--config", "rem.yaml"], [remote, "--set", f"rankers.{remote}.timeout=30"]):
        result = CliRunner().invoke(app, ["doctor", *args, "--device", "cpu"])
        assert result.exit_code == 0 and result.output.startswith(passed), result.output
    missing = CliRunner().invoke(app, ["doctor", remote])
    assert (missing.exit_code, missing.output.strip()) == (
        2, f"Error: rankers.{remote}.timeout: ranker 'remote' {NEEDS} rankers.{remote}.timeout=120")


@pytest.mark.parametrize(("value", "problem"), [("-1", "Input should be greater than 0 (got -1)"),
                                                 ("soon", "Input should be a valid number (got 'soon')")])
def test_a_bad_timeout_is_one_line_in_eval_and_doctor(remote_registry, value, problem):
    eval_run = CliRunner().invoke(app, ["eval", "--generator", "tiny", "--ranker", "brightness", "--set",
                                        f"rankers.0.timeout={value}", "--device", "cpu"])
    assert (eval_run.exit_code, eval_run.output.strip()) == (2, f"Error: rankers.brightness.timeout: {problem}")
    doctor = CliRunner().invoke(app, ["doctor", "brightness", "--set", f"rankers.brightness.timeout={value}"])
    assert (doctor.exit_code, doctor.output.strip()) == (2, f"Error: rankers.brightness.timeout: {problem}")
