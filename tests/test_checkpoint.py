"""Checkpoints: exact round trips, exact resume of AdamW, pruning, and crash safety."""

import random

import numpy as np
import pytest
import torch

import drpo_core.checkpoint as checkpoint_module
from drpo_core.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from drpo_core.errors import DrpoError

CONFIG = "seed: 0\ntrain:\n  steps: 10\n"


def _save(run_dir, step, value=0.0, **overrides):
    kwargs = {
        "trainable": {"lora.A": torch.full((2, 3), value), "lora.B": torch.arange(4.0)},
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "scheduler_state": {"last_epoch": step, "base_lrs": [1e-3]},
        "state": {"prompt_stream": {"epoch": 0, "position": step}, "metrics_lines": step},
        "config_text": CONFIG,
    }
    kwargs.update(overrides)
    return save_checkpoint(run_dir, step, **kwargs)


def _step_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_round_trip(tmp_path):
    trainable = {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.float64), "t": torch.randn(5, 5).t()}
    path = _save(tmp_path, 6, trainable=trainable)

    assert path == tmp_path / "checkpoints" / "step-000006"
    assert sorted(p.name for p in path.iterdir()) == sorted(checkpoint_module.REQUIRED_FILES)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000006"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path
    assert ckpt.step == 6
    assert ckpt.trainable.keys() == trainable.keys()
    assert all(torch.equal(ckpt.trainable[k], trainable[k]) for k in trainable)
    assert ckpt.trainable["b"].dtype == torch.float64
    assert ckpt.state == {"prompt_stream": {"epoch": 0, "position": 6}, "metrics_lines": 6}
    assert ckpt.scheduler_state == {"last_epoch": 6, "base_lrs": [1e-3]}
    assert ckpt.config_text == CONFIG


def _make_training(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    x = torch.randn(16, 4)  # from the global RNG: resuming must restore it too
    loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_adamw_resume_matches_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = _make_training()
    for _ in range(2):
        _train_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path, 2, trainable=model.state_dict(), optimizer_state=optimizer.state_dict(),
                    scheduler_state=scheduler.state_dict(), state={}, config_text=CONFIG)
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    # the files themselves are readable with weights_only=True
    step_dir = resolve_checkpoint(tmp_path)
    torch.load(step_dir / "optimizer.pt", weights_only=True)
    torch.load(step_dir / "scheduler.pt", weights_only=True)
    torch.load(step_dir / "rng.pt", weights_only=True)

    torch.manual_seed(12345)  # a fresh process would be in some other RNG state
    model, optimizer, scheduler = _make_training(seed=99)
    ckpt = load_checkpoint(tmp_path)
    model.load_state_dict(ckpt.trainable)
    optimizer.load_state_dict(ckpt.optimizer_state)
    scheduler.load_state_dict(ckpt.scheduler_state)
    restore_rng_state(ckpt.rng)
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    resumed = model.state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert _step_names(tmp_path) == ["step-000004", "step-000005"]


def test_keep_last_never_prunes_latest(tmp_path):
    _save(tmp_path, 10)
    _save(tmp_path, 3, keep_last=1)  # e.g. resumed from an older checkpoint
    assert _step_names(tmp_path) == ["step-000003", "step-000010"]
    assert resolve_checkpoint(tmp_path).name == "step-000003"


def test_keep_last_none_keeps_all(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=None)
    assert len(_step_names(tmp_path)) == 5


def test_saving_same_step_again_replaces_it(tmp_path):
    _save(tmp_path, 2, value=1.0)
    _save(tmp_path, 2, value=2.0)
    assert torch.equal(load_checkpoint(tmp_path).trainable["lora.A"], torch.full((2, 3), 2.0))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, value=1.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    # a real kill runs no cleanup: disable it too, so the half-written temp dir stays behind
    monkeypatch.setattr(checkpoint_module.torch, "save", killed)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, value=2.0)
    monkeypatch.undo()

    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-000002-")
    assert _step_names(tmp_path) == ["step-000001"]
    assert resolve_checkpoint(tmp_path).name == "step-000001"
    assert torch.equal(load_checkpoint(tmp_path).trainable["lora.A"], torch.full((2, 3), 1.0))

    _save(tmp_path, 2, value=2.0)  # the next save cleans up the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-000001", "step-000002"]


def test_exception_mid_write_cleans_up(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    monkeypatch.setattr(checkpoint_module, "capture_rng_state", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        _save(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]


def test_crash_before_pointer_update_resolves_previous(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "_write_latest", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert _step_names(tmp_path) == ["step-000001", "step-000002"]
    assert resolve_checkpoint(tmp_path).name == "step-000001"
    assert resolve_checkpoint(tmp_path, which=2).name == "step-000002"


def test_dangling_pointer_falls_back_to_newest(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "latest").write_text("step-000009\n")
    with pytest.warns(UserWarning, match="using step-000002"):
        assert resolve_checkpoint(tmp_path).name == "step-000002"


def test_resolve_forms(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 12)
    step_dir = tmp_path / "checkpoints" / "step-000001"
    assert resolve_checkpoint(step_dir) == step_dir
    assert resolve_checkpoint(tmp_path / "checkpoints").name == "step-000012"
    assert resolve_checkpoint(tmp_path, which=1) == step_dir
    assert resolve_checkpoint(tmp_path, which="1") == step_dir
    assert resolve_checkpoint(tmp_path, which="step-000001") == step_dir
    with pytest.raises(DrpoError, match=r"no checkpoint 7 in .*available: step-000001, step-000012"):
        resolve_checkpoint(tmp_path, which=7)


def test_resolve_errors(tmp_path):
    with pytest.raises(DrpoError, match="checkpoint path not found"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(DrpoError, match=r"no checkpoint in .*: run without --resume first"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / ".tmp-step-000001-abc").mkdir(parents=True)
    with pytest.raises(DrpoError, match="run without --resume first"):
        resolve_checkpoint(tmp_path)
    path = _save(tmp_path, 1)
    (path / "optimizer.pt").unlink()
    with pytest.raises(DrpoError, match=r"step-000001 is incomplete \(missing optimizer.pt\)"):
        resolve_checkpoint(tmp_path)


def test_corrupt_file_is_one_line_error(tmp_path):
    path = _save(tmp_path, 1)
    (path / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DrpoError, match="optimizer.pt: cannot read") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_rejects_state_that_cannot_be_read_back(tmp_path):
    class Custom:
        pass

    with pytest.raises(DrpoError, match=r"scheduler_state\['fn'\] holds a Custom"):
        _save(tmp_path, 1, scheduler_state={"fn": Custom()})
    with pytest.raises(DrpoError, match="not JSON-serializable"):
        _save(tmp_path, 1, state={"when": object()})
    assert not (tmp_path / "checkpoints").exists()  # validated before touching the disk


def test_rng_round_trip(tmp_path):
    def draw():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(3).tolist())

    random.gauss(0, 1)  # leave a cached gaussian in python's state
    _save(tmp_path, 1)
    expected = draw()
    draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path).rng)
    assert draw() == expected

    state = capture_rng_state()
    expected = draw()
    restore_rng_state(state)
    assert draw() == expected
