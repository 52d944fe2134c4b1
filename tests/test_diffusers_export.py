"""Exported LoRAs and fused pipelines reproduce the trained generator in a fresh diffusers pipeline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from drpo_core.errors import ConfigError
from drpo_diffusers.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, export_generator
from drpo_diffusers.testing import TINY_RESOLUTION, tiny_generator

PROMPTS = ["a cat", "the dog"]
RANK, ALPHA = 4, 8.0  # alpha != rank: a loader that assumed alpha == rank would halve the LoRA
CARD = {
    "ranker": "pickscore",
    "recipe": "sd-turbo-pickscore",
    "metrics": {"pickscore": 22.5},
    "config": {"seed": 0},
}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def trained(request, tiny_dirs):
    """A generator after a few optimiser steps, with its noise and samples."""
    arch = request.param
    gen = tiny_generator(arch, tiny_dirs[arch], lora_rank=RANK, lora_alpha=ALPHA)
    noise = torch.randn(len(PROMPTS), *gen.noise_shape, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(gen.trainable_parameters(), lr=3e-3)
    for _ in range(3):
        loss = gen.sample(PROMPTS, noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        latents = gen.sample(PROMPTS, noise)
        images = gen.decode(latents)
    assert (latents - gen.reference(PROMPTS, noise)).abs().max() > 0.1  # the LoRA matters
    return arch, gen, noise, latents, images


def run_pipeline(pipe, noise):
    pipe.set_progress_bar_config(disable=True)
    kw = dict(
        num_inference_steps=1,
        guidance_scale=0.0,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        latents=noise,
    )
    return pipe(PROMPTS, output_type="latent", **kw).images, pipe(PROMPTS, output_type="pt", **kw).images


def assert_reproduces(pipe, trained):
    _, _, noise, latents, images = trained
    got_latents, got_images = run_pipeline(pipe, noise)
    assert (got_latents - latents).abs().max() < 1e-4
    assert (got_images - images).abs().max() < 1e-4


def assert_card(out_dir, base):
    card = (out_dir / "README.md").read_text()
    assert f"base_model: {base}" in card and "licence terms apply" in card
    assert "pickscore" in card and "22.5" in card and "seed: 0" in card


def test_diffusers_lora(trained, tiny_dirs, tmp_path):
    arch, gen = trained[:2]
    out = export_generator(gen, tmp_path / "lora", format="diffusers", card=CARD)
    with safe_open(str(out / DIFFUSERS_WEIGHT_NAME), framework="pt") as f:
        lora_config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert lora_config["unet.r"] == RANK and lora_config["unet.lora_alpha"] == ALPHA

    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[arch])
    pipe.load_lora_weights(out)
    assert_reproduces(pipe, trained)
    assert_card(out, tiny_dirs[arch])  # the model as the generator was given it, not its folder's name


def test_kohya_lora(trained, tiny_dirs, tmp_path):
    arch, gen = trained[:2]
    out = export_generator(gen, tmp_path / "kohya", format="kohya", card=CARD)
    with safe_open(str(out / KOHYA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(
        k.endswith(".lora_up.weight") for k in keys
    )
    assert alphas == {ALPHA}

    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[arch])
    pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHT_NAME)
    assert_reproduces(pipe, trained)
    assert "ComfyUI" in (out / "README.md").read_text()


def test_fused_pipeline(trained, tmp_path):
    arch, gen, noise, latents, _ = trained
    out = export_generator(gen, tmp_path / "fused", fuse=True, card=CARD)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert_reproduces(pipe, trained)
    # the generator itself still has its (unfused) adapters
    assert any(isinstance(m, BaseTunerLayer) for m in gen.unet.modules())
    with torch.no_grad():
        assert torch.equal(gen.sample(PROMPTS, noise), latents)


def test_full_finetuning_exports_a_pipeline(tiny_dirs, tmp_path):
    gen = tiny_generator("sd", tiny_dirs["sd"], lora=False)
    noise = torch.randn(len(PROMPTS), *gen.noise_shape, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(gen.trainable_parameters(), lr=1e-2)
    gen.sample(PROMPTS, noise).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        latents = gen.sample(PROMPTS, noise)
        images = gen.decode(latents)
    with pytest.raises(ConfigError, match="kohya export needs LoRA adapters"):
        export_generator(gen, tmp_path / "kohya", format="kohya")
    out = export_generator(gen, tmp_path / "full")
    assert_reproduces(DiffusionPipeline.from_pretrained(out), ("sd", gen, noise, latents, images))


def test_bad_export_arguments(tiny_dirs, tmp_path):
    gen = tiny_generator("sd", tiny_dirs["sd"])
    with pytest.raises(ConfigError, match="unknown export format 'onnx'"):
        export_generator(gen, tmp_path, format="onnx")
    with pytest.raises(ConfigError, match="fuse=True writes a full diffusers pipeline"):
        export_generator(gen, tmp_path, format="kohya", fuse=True)
