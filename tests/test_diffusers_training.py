"""DrPO steps through the real loop on tiny SD and SDXL pipelines, then `drpo export` and reload."""

import json

import pytest
import torch
from typer.testing import CliRunner

from drpo_cli.main import app
from drpo_core.config import resolve_config
from drpo_core.metrics import read_metrics
from drpo_core.noise import sample_noise
from drpo_core.registry import Registry
from drpo_core.runs import load_generator
from drpo_core.trainer import Trainer
from drpo_mae.testing import write_tiny_checkpoint

ARCHITECTURES = {"sd": "sd-turbo", "sdxl": "sdxl-turbo"}


@pytest.fixture
def builtin_registry(monkeypatch):
    from drpo_core import registry as module

    monkeypatch.setattr(module, "_default", Registry().load_entry_points())
    return module._default


@pytest.mark.parametrize("architecture", ["sd", "sdxl"])
def test_drpo_steps_then_export_reproduces_the_trained_generator(tmp_path, tiny_dirs, architecture,
                                                                 builtin_registry):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\na cat\n")
    run_dir = tmp_path / "run"
    config = {
        "generator": {"name": ARCHITECTURES[architecture], "model": str(tiny_dirs[architecture]),
                      "resolution": 32, "lora_rank": 4, "lora_alpha": 8},
        "rankers": ["brightness"],
        # SD: the recommended latent-MAE on tiny weights (16x16 latents: layer4 is 2x2); SDXL: the raw latents
        "features": ({"name": "latent-mae", "weights": str(write_tiny_checkpoint(tmp_path / "mae.pth")),
                      "keys": ["layer4_mean", "layer4_std", "layer4_mean_2", "layer4_std_2"]}
                     if architecture == "sd" else "latent"),
        "selection": {"candidates": 4, "positives": 1, "negatives": 1},
        "train": {"steps": 2, "lr": 1e-2, "mixed_precision": "no"},
        "prompts": {"path": str(prompts), "eval_count": 1}, "eval": {"seeds": "0-1"},
        "log": {"progress": False}, "output_dir": str(run_dir),
    }
    resolved = resolve_config(base=config)
    # the generator's recommended settings sit under the user's
    assert resolved.origins["selection.candidates"] != "default"
    trainer = Trainer(resolved)
    before = {k: v.clone() for k, v in trainer.generator.trainable_state_dict().items()}
    trainer.train()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["loss_pref"])) for m in metrics)
    after = trainer.generator.trainable_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    result = CliRunner().invoke(app, ["export", str(run_dir), "--format", "diffusers"])
    assert result.exit_code == 0, result.output
    export_dir = run_dir / "export-diffusers"
    assert (export_dir / "pytorch_lora_weights.safetensors").is_file()
    assert "brightness" in (export_dir / "README.md").read_text()

    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_dirs[architecture])
    pipe.load_lora_weights(export_dir)
    _, generator = load_generator(run_dir)
    noise = sample_noise(generator.noise_shape, 0, 7)[None]
    with torch.no_grad():
        ours = generator.decode(generator.sample(["a cat"], noise))
        theirs = pipe("a cat", num_inference_steps=1, guidance_scale=0.0, latents=noise.clone(), height=32,
                      width=32, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert json.loads((run_dir / "run.json").read_text())["packages"]["diffusers"] != "not installed"
