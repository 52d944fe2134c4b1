"""The metrics log (append, counts, truncation on resume) and the step timer."""

import json
import time

import numpy as np
import pytest
import torch

from drpo_core.errors import DrpoError
from drpo_core.metrics import MetricsLog, StepTimer, read_metrics


def _log_with(path, n):
    with MetricsLog(path) as log:
        for step in range(n):
            log.write({"step": step, "loss": 1.0 / (step + 1)})


def test_write_counts_and_reads_back(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        assert log.line_count == 0
        log.write({"step": 0, "loss": torch.tensor(0.5), "reward": np.float32(2.0), "nan": float("nan")})
        log.write({"step": 1, "phase": {"sample": 0.25}})
        assert log.line_count == 2
        # flushed per line: readable while the log is still open
        assert [r["step"] for r in read_metrics(path)] == [0, 1]
    records = read_metrics(path)
    assert records[0]["loss"] == 0.5 and records[0]["reward"] == 2.0
    assert records[0]["nan"] != records[0]["nan"]  # NaN survives the round trip
    assert path.read_text().count("\n") == 2


def test_rejects_unserializable_values(tmp_path):
    with MetricsLog(tmp_path / "m.jsonl") as log, pytest.raises(TypeError, match="not JSON-serializable"):
        log.write({"images": torch.zeros(3)})


def test_new_log_refuses_existing_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_with(path, 2)
    with pytest.raises(DrpoError, match="already holds metrics"):
        MetricsLog(path)


def test_resume_drops_lines_after_checkpoint_and_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_with(path, 5)
    with open(path, "ab") as f:
        f.write(b'{"step": 5, "lo')  # the killed run died mid-line

    with MetricsLog(path, resume_lines=3) as log:
        assert log.line_count == 3
        log.write({"step": 3})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]


def test_resume_at_current_length_only_drops_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_with(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"step": 2')
    with MetricsLog(path, resume_lines=2) as log:
        log.write({"step": 2})
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_resume_with_fewer_lines_than_expected_warns(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log_with(path, 2)
    with pytest.warns(UserWarning, match="only 2 complete lines"), MetricsLog(path, resume_lines=4) as log:
        assert log.line_count == 2


def test_resume_missing_file_starts_empty(tmp_path):
    with pytest.warns(UserWarning, match="is missing"), MetricsLog(tmp_path / "m.jsonl", resume_lines=3) as log:
        assert log.line_count == 0


def test_truncate_on_open_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in range(4):
            log.write({"step": step})
        assert log.truncate(1) == 1
        assert log.line_count == 1
        log.write({"step": 9})
        assert log.truncate(10) == 2
    assert [r["step"] for r in read_metrics(path)] == [0, 9]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(DrpoError, match="metrics file not found"):
        read_metrics(tmp_path / "none.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0}\n{oops}\n')
    with pytest.raises(DrpoError, match=r"bad.jsonl:2: bad JSON"):
        read_metrics(path)


def test_timer_phases_accumulate_and_sum_to_wall_time():
    timer = StepTimer()
    timer.start_step(sync=True)  # no CUDA in use: sync must be a harmless no-op
    begin = time.perf_counter()
    with timer("sample"):
        time.sleep(0.02)
    with timer("rank"):
        time.sleep(0.01)
    with timer("sample"):
        time.sleep(0.02)
    wall = time.perf_counter() - begin
    seconds = timer.split()

    assert list(seconds) == ["sample", "rank"]
    assert seconds["sample"] >= 0.04 and seconds["rank"] >= 0.01
    assert sum(seconds.values()) == pytest.approx(wall, abs=0.01)
    assert sum(seconds.values()) <= wall
    assert timer.split() == {}  # split resets


def test_timer_records_phase_that_raises():
    timer = StepTimer()
    with pytest.raises(RuntimeError), timer("update"):
        raise RuntimeError("boom")
    assert "update" in timer.split()
