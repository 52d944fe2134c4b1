"""``log.trackers``: TensorBoard read back with its own reader, wandb through a stub module, and a tracker
whose package is missing refused in one line before anything is written."""

import importlib
import json
import math
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from drpo_core.config import resolve_config
from drpo_core.errors import ConfigError, DrpoError
from drpo_core.jsonl import read_jsonl
from drpo_core.metrics import read_metrics
from drpo_core.runs import run_in
from drpo_core.tracking import scalars
from drpo_core.trainer import Trainer
from tests.conftest import make_registry
from tests.test_trainer import tiny_config


def train(config: dict, resume: str | None = None) -> Trainer:
    registry = make_registry()
    trainer = Trainer(resolve_config(base=config, registry=registry), registry=registry)
    trainer.train(resume=resume)
    return trainer


def expected_tags(record: dict, prefix: str) -> dict[str, float]:
    """What the tracker should hold for one metrics.jsonl / eval.jsonl line, written out by hand."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{prefix}/{key}/{sub}": v for sub, v in value.items()})
        elif isinstance(value, (int, float)):
            out[f"{prefix}/{key}"] = float(value)
    return out


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_scalar_names_follow_the_jsonl_keys():
    record = {"step": 3, "loss_pref": 1.5, "prompts": 2, "failure": "ranker 'x' raised", "mean/pref/s": 0.1,
              "time": {"sample": 0.25, "rank": 0.5}, "skips": [1, 2]}
    assert scalars(record, "train") == {"train/loss_pref": 1.5, "train/prompts": 2.0, "train/mean/pref/s": 0.1,
                                        "train/time/sample": 0.25, "train/time/rank": 0.5}


def test_tensorboard_holds_each_step_of_metrics_jsonl_once_also_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, log={"trackers": ["tensorboard"]}, eval={"every": 3})
    first = train(config)
    run_dir = Path(first.run_dir)
    # a second session from the step-3 checkpoint, longer: the first session's steps 4-6 (and its final
    # evaluation at step 6) are superseded, as after a kill
    train(tiny_config(tmp_path, log={"trackers": ["tensorboard"]}, eval={"every": 3}, train={"steps": 8}),
          resume=str(run_dir / "checkpoints" / "step-000003"))
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged: dict[str, list[tuple[int, float]]] = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    evals: dict[int, dict] = {}
    for _, record in read_jsonl(run_dir / "eval.jsonl"):
        evals[record["step"]] = record  # the latest evaluation of a step is the one that counts
    assert sorted(evals) == [0, 3, 6, 8]
    expected: dict[str, list[tuple[int, float]]] = {}
    for records, prefix in ((metrics, "train"), ([evals[s] for s in sorted(evals)], "eval")):
        for record in records:
            for tag, value in expected_tags(record, prefix).items():
                expected.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    for tag in ("train/loss_pref", "train/loss_ref", "train/grad_norm", "train/lr", "train/skip_failure",
                "train/prompts", "train/time/sample", "train/time/optimizer", "train/mean/pref/rms_r0.02",
                "eval/score/tiny-brightness", "eval/base_score/tiny-brightness", "eval/diversity"):
        assert tag in expected, tag
    assert set(logged) == set(expected)
    for tag, points in expected.items():  # every step once, in order, with metrics.jsonl's value (float32)
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert all(same(a, b) for (_, a), (_, b) in zip(logged[tag], points, strict=True)), tag


WANDB_STUB = """\
import json
import os

LOG = {log!r}


def _write(entry):
    with open(LOG, "a") as handle:
        handle.write(json.dumps(entry) + "\\n")


class Run:
    def log(self, values, step=None):
        _write({{"log": values, "step": step}})

    def finish(self):
        _write({{"finish": True}})


def init(**kwargs):
    if os.environ.get("DRPO_WANDB_STUB_FAIL"):
        raise RuntimeError(os.environ["DRPO_WANDB_STUB_FAIL"])
    _write({{"init": kwargs}})
    return Run()
"""


@pytest.fixture
def wandb_stub(tmp_path, monkeypatch) -> Iterator[Path]:
    """A ``wandb`` module that writes its calls to a JSON-lines file (the real one is not needed)."""
    stubs, log = tmp_path / "stubs", tmp_path / "wandb-calls.jsonl"
    (stubs / "wandb").mkdir(parents=True)
    (stubs / "wandb" / "__init__.py").write_text(WANDB_STUB.format(log=str(log)))
    monkeypatch.syspath_prepend(str(stubs))
    real = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "wandb"}
    importlib.invalidate_caches()
    yield log
    sys.modules.pop("wandb", None)  # the stub; the real one, if it had been imported, comes back
    sys.modules.update(real)


def test_wandb_gets_the_run_directory_and_each_step_of_metrics_jsonl(tmp_path, wandb_stub, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = tiny_config(tmp_path / "a", log={"trackers": ["wandb"]}, train={"steps": 4})
    first = train(config)
    run_dir = Path(first.run_dir)
    train(tiny_config(tmp_path / "a", log={"trackers": ["wandb"]}, train={"steps": 6}), resume="latest")

    calls = [json.loads(line) for line in wandb_stub.read_text().splitlines()]
    inits = [c["init"] for c in calls if "init" in c]
    assert len(inits) == 2 and sum("finish" in c for c in calls) == 2
    assert inits[0]["dir"] == str(run_dir) and inits[0]["name"] == run_dir.name
    assert inits[0]["project"] == "drpo" and inits[0]["resume"] == "allow"
    assert inits[0]["config"]["train"]["steps"] == 4
    assert inits[1]["id"] == inits[0]["id"]  # the resumed session continues the same wandb run
    assert (run_dir / "wandb" / "drpo-run-id").read_text().strip() == inits[0]["id"]
    logs = [c for c in calls if "log" in c]
    train_logs = [c for c in logs if "train/loss_pref" in c["log"]]
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [c["step"] for c in train_logs] == [m["step"] for m in metrics] == list(range(1, 7))
    for call, record in zip(train_logs, metrics, strict=True):
        assert call["log"] == expected_tags(record, "train")
    eval_logs = [c for c in logs if "eval/score/tiny-brightness" in c["log"]]
    assert [c["step"] for c in eval_logs] == [0, 4, 6]


def wandb_records(path: Path):
    """The records of an offline run's ``run-ID.wandb`` file: LevelDB-log framing (32 KiB blocks, chunks with
    a 7-byte header: crc32, length, type) after a 7-byte file header, each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log (its framing changed?)"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_reads_back_as_metrics_jsonl(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config = tiny_config(tmp_path, log={"trackers": ["wandb"]}, train={"steps": 4}, eval={"every": 2})
    run_dir = Path(train(config).run_dir)
    train(tiny_config(tmp_path, log={"trackers": ["wandb"]}, train={"steps": 6}, eval={"every": 2}),
          resume="latest")

    sessions = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(sessions) == 2
    runs, history = [], {}
    for session in sessions:
        for record in wandb_records(session):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                runs.append((record.run.run_id, record.run.display_name, record.run.project))
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    assert len(runs) == 2 and len(set(runs)) == 1 and runs[0][1:] == (run_dir.name, "drpo")
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for tag, value in expected_tags(record, "train").items():
            assert same(history[tag][record["step"]], value), (tag, record["step"])
    assert sorted(history["train/loss_pref"]) == list(range(1, 7))
    evals = {r["step"]: r for _, r in read_jsonl(run_dir / "eval.jsonl")}
    assert sorted(history["eval/score/tiny-brightness"]) == sorted(evals) == [0, 2, 4, 6]
    for step, record in evals.items():
        for tag, value in expected_tags(record, "eval").items():
            assert same(history[tag][step], value), (tag, step)


def test_wandb_that_cannot_start_is_one_line_and_leaves_no_run_behind(tmp_path, wandb_stub, monkeypatch):
    monkeypatch.setenv("DRPO_WANDB_STUB_FAIL", "No API key configured. Use `wandb login` to log in.\nmore")
    config = tiny_config(tmp_path, log={"trackers": ["tensorboard", "wandb"]})
    with pytest.raises(DrpoError) as error:
        train(config)
    assert str(error.value) == ("log.trackers: wandb did not start: No API key configured. Use `wandb login` to log "
                                "in. (log in with `wandb login`, or set WANDB_MODE=offline to keep the run on this "
                                "machine)")
    assert run_in(Path(config["output_dir"])) is None  # the same command works once wandb can start
    monkeypatch.delenv("DRPO_WANDB_STUB_FAIL")
    train(config)


@pytest.mark.parametrize(("tracker", "install"), [("tensorboard", 'pip install "drpo[tracking]"'),
                                                  ("wandb", 'pip install "drpo[wandb]"')])
def test_a_tracker_without_its_package_is_refused_in_one_line(tmp_path, monkeypatch, tracker, install):
    monkeypatch.setitem(sys.modules, tracker, None)  # importlib.util.find_spec: not installed
    config = tiny_config(tmp_path, log={"trackers": [tracker]})
    with pytest.raises(ConfigError) as error:
        resolve_config(base=config, base_origin="recipe.yaml", registry=make_registry())
    assert str(error.value) == f"recipe.yaml: log.trackers: {tracker} is not installed: {install}"


def test_the_cli_refuses_a_missing_tracker_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent("""\
        import sys
        sys.modules["tensorboard"] = None  # as if it were not installed
        from drpo_cli.main import main
        main()
        """)
    result = subprocess.run([sys.executable, "-c", script, "train", "--output-dir", str(out),
                             "--set", "log.trackers=[tensorboard]"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        'Error: --set: log.trackers: tensorboard is not installed: pip install "drpo[tracking]"']
    assert not out.exists()


def test_a_finished_runs_weights_load_without_its_tracker_package(tmp_path, monkeypatch, isolated_registry):
    from drpo_core.runs import load_generator

    config = tiny_config(tmp_path, train={"steps": 1}, eval={"seeds": [0]}, checkpoint={"every": 1})
    train(config)
    saved = Path(config["output_dir"]) / "checkpoints" / "step-000001" / "config.yaml"
    assert "trackers: []" in saved.read_text()
    saved.write_text(saved.read_text().replace("trackers: []", "trackers:\n  - wandb"))
    monkeypatch.setitem(sys.modules, "wandb", None)
    resolved, generator = load_generator(config["output_dir"])
    assert resolved.config.log.trackers == [] and generator.trainable_parameters()
