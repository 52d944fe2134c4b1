"""The SD-Turbo / SDXL-Turbo generators on tiny pipelines built from configs (no hub access)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import ValidationError

import drpo_diffusers
from drpo_core.context import BuildContext
from drpo_core.errors import PluginError
from drpo_diffusers.testing import TINY_RESOLUTION, tiny_generator

ARCHS = ["sd", "sdxl"]
PROMPTS = ["a cat", "the dog", "a cat"]
PIPE_KW = dict(num_inference_steps=1, guidance_scale=0.0, height=TINY_RESOLUTION, width=TINY_RESOLUTION)


def make_noise(gen, n=3, seed=0):
    return torch.randn(n, *gen.noise_shape, generator=torch.Generator().manual_seed(seed))


def randomize_lora(gen, seed=1, scale=0.3):
    torch.manual_seed(seed)
    gen.load_trainable_state_dict(
        {k: torch.randn_like(v) * scale for k, v in gen.trainable_state_dict().items()}
    )


def unets_of(gen):
    """Every distinct UNet the generator holds (its attributes and its pipeline's components)."""
    candidates = list(vars(gen).values()) + list(gen.pipe.components.values())
    return {id(m): m for m in candidates if isinstance(m, UNet2DConditionModel)}


# ---------------------------------------------------------------------- sampling


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_sample_equals_pipeline(tiny_dirs, arch):
    gen = tiny_generator(arch, tiny_dirs[arch])
    noise = make_noise(gen)
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[arch])  # an untouched pipeline
    pipe.set_progress_bar_config(disable=True)

    expected = pipe(PROMPTS, latents=noise, output_type="latent", **PIPE_KW).images
    assert pipe.scheduler.timesteps.tolist() == [999]
    assert gen.timestep.item() == 999
    with torch.no_grad():
        latents = gen.sample(PROMPTS, noise)
    assert latents.shape == (len(PROMPTS), *gen.noise_shape) == expected.shape
    diff = (latents - expected).abs().max().item()
    print(f"{arch}: max |sample - pipeline latents| = {diff:.3g} (latent scale {expected.abs().max():.3g})")
    assert diff < 1e-4

    images = pipe(PROMPTS, latents=noise, output_type="pt", **PIPE_KW).images
    with torch.no_grad():
        decoded = gen.decode(latents)
    diff = (decoded - images).abs().max().item()
    print(f"{arch}: max |decode(sample) - pipeline images| = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_is_the_same_unet_with_adapters_off(tiny_dirs, arch):
    gen = tiny_generator(arch, tiny_dirs[arch])
    noise = make_noise(gen)
    assert len(unets_of(gen)) == 1  # no second UNet
    base_params = sum(p.numel() for p in DiffusionPipeline.from_pretrained(tiny_dirs[arch]).unet.parameters())
    lora_params = sum(p.numel() for p in gen.trainable_parameters())
    assert sum(p.numel() for p in gen.unet.parameters()) == base_params + lora_params
    pointers = {name: p.data_ptr() for name, p in gen.unet.named_parameters()}

    with torch.no_grad():
        before_training = gen.sample(PROMPTS, noise)
    assert torch.equal(gen.reference(PROMPTS, noise), before_training)  # LoRA starts at B = 0

    randomize_lora(gen)
    with torch.no_grad():
        adapted = gen.sample(PROMPTS, noise)
    reference = gen.reference(PROMPTS, noise)
    assert not reference.requires_grad
    assert torch.equal(reference, before_training)
    assert (adapted - reference).abs().max() > 1e-2
    # adapters are back on after reference()
    assert all(not m.disable_adapters for m in gen.unet.modules() if isinstance(m, BaseTunerLayer))
    with torch.no_grad():
        assert torch.equal(gen.sample(PROMPTS, noise), adapted)
    assert {name: p.data_ptr() for name, p in gen.unet.named_parameters()} == pointers
    assert len(unets_of(gen)) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_only_lora_parameters(tiny_dirs, arch):
    gen = tiny_generator(arch, tiny_dirs[arch])
    trainable = gen.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    noise = make_noise(gen)
    gen.sample(PROMPTS, noise).square().mean().backward()

    modules = {
        name: getattr(gen.pipe, name, None) for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    with_grad = set()
    for module_name, module in modules.items():
        for name, param in module.named_parameters() if module is not None else []:
            if param.grad is not None:
                with_grad.add(f"{module_name}.{name}")
    assert with_grad and all(name.startswith("unet.") and ".lora_" in name for name in with_grad)
    lora_b = [p for n, p in gen.unet.named_parameters() if ".lora_B." in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_sample_but_not_reference(tiny_dirs, arch):
    gen = tiny_generator(arch, tiny_dirs[arch])
    assert not gen.unet.is_gradient_checkpointing  # train.gradient_checkpointing decides: the trainer turns it on
    gen.enable_gradient_checkpointing()  # as the trainer does by default; exercised by the backward passes below
    assert gen.unet.is_gradient_checkpointing
    gen.train(True)
    noise = make_noise(gen)
    with torch.no_grad():
        sample0 = gen.sample(PROMPTS, noise)
    reference0 = gen.reference(PROMPTS, noise)
    target = sample0 + torch.randn(sample0.shape, generator=torch.Generator().manual_seed(3))

    optimizer = torch.optim.AdamW(gen.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = (gen.sample(PROMPTS, noise) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        assert (gen.sample(PROMPTS, noise) - sample0).abs().max() > 1e-3
    assert torch.equal(gen.reference(PROMPTS, noise), reference0)


def test_full_finetuning_keeps_a_frozen_copy(tiny_dirs):
    gen = tiny_generator("sd", tiny_dirs["sd"], lora=False)
    assert len(unets_of(gen)) == 2  # documented: the reference is a deep copy
    assert len(gen.trainable_parameters()) == len(list(gen.unet.parameters()))
    assert set(gen.trainable_state_dict()) == set(gen.unet.state_dict())
    noise = make_noise(gen)
    reference0 = gen.reference(PROMPTS, noise)
    optimizer = torch.optim.AdamW(gen.trainable_parameters(), lr=1e-3)
    gen.sample(PROMPTS, noise).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert (gen.sample(PROMPTS, noise) - reference0).abs().max() > 1e-3
    assert torch.equal(gen.reference(PROMPTS, noise), reference0)


def test_official_one_step_is_the_official_codes_conversion(tiny_dirs):
    """method.md §6.1: eps from the unscaled noise at t=999, x0 = (z - 0.9977 eps) / 0.0683, re-projected to
    t=0 as 0.9996 x0 + 0.0292 eps; written out here on the untouched pipeline's own components."""
    gen = tiny_generator("sd", tiny_dirs["sd"], one_step="official")
    noise = make_noise(gen)
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs["sd"])
    with torch.no_grad():
        hidden, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
        eps = pipe.unet(noise, 999, encoder_hidden_states=hidden).sample
        expected = (noise - 0.9977 * eps) / 0.0683 * 0.9996 + 0.0292 * eps
        latents = gen.sample(PROMPTS, noise)
        pipeline_latents = tiny_generator("sd", tiny_dirs["sd"]).sample(PROMPTS, noise)
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen.reference(PROMPTS, noise), expected, atol=1e-5, rtol=1e-5)
    assert (latents - pipeline_latents).abs().max() > 1e-2  # not the pipeline's convention
    # the constants are SD's scaled-linear schedule, rounded as the official code has them
    abar = pipe.scheduler.alphas_cumprod
    assert abs(abar[999].sqrt() - 0.0683) < 5e-4 and abs((1 - abar[999]).sqrt() - 0.9977) < 5e-4
    assert abs(abar[0].sqrt() - 0.9996) < 5e-4 and abs((1 - abar[0]).sqrt() - 0.0292) < 5e-4
    # differentiable, into the adapters
    gen.sample(PROMPTS, noise).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.trainable_parameters())


def test_official_one_step_is_sd_turbos_only(tiny_dirs):
    with pytest.raises(ValidationError, match="one_step"):
        tiny_generator("sdxl", tiny_dirs["sdxl"], one_step="official")
    from drpo_diffusers.generator import TurboGenerator

    with pytest.raises(PluginError, match="SDXL-Turbo's official code follows the pipeline"):
        TurboGenerator(DiffusionPipeline.from_pretrained(tiny_dirs["sdxl"]), architecture="sdxl",
                       resolution=TINY_RESOLUTION, one_step="official")


@pytest.mark.parametrize("checkpointing", [True, False])
def test_frozen_base_turns_the_adapters_off_and_restores_the_generator(tiny_dirs, checkpointing):
    gen = tiny_generator("sdxl", tiny_dirs["sdxl"], gradient_checkpointing=checkpointing)
    randomize_lora(gen)
    noise = make_noise(gen)
    reference = gen.reference(PROMPTS, noise)
    with gen.frozen_base() as unet:
        assert unet is gen.unet and not gen._adapters_on() and unet.is_gradient_checkpointing
        cond = gen.unet_conditioning(PROMPTS)
        assert set(cond) == {"encoder_hidden_states", "added_cond_kwargs"}
        with torch.no_grad():
            torch.testing.assert_close(gen.sample(PROMPTS, noise), reference)  # the base, inside
    assert gen._adapters_on() and gen.unet.is_gradient_checkpointing == checkpointing
    assert gen.trainable_parameters() and all(p.requires_grad for p in gen.trainable_parameters())
    with gen.frozen_base(checkpointing=False):
        assert not gen.unet.is_gradient_checkpointing
    assert gen.unet.is_gradient_checkpointing == checkpointing


# ---------------------------------------------------------------------- decode / encode / state


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_with_grad_recomputes_each_chunk_and_gives_the_same_gradient(tiny_dirs, arch):
    gen = tiny_generator(arch, tiny_dirs[arch], decode_chunk=2)
    with torch.no_grad():
        latents = gen.sample(PROMPTS, make_noise(gen))
    calls = []
    gen.vae.decoder.register_forward_hook(lambda *args: calls.append(1))
    weights = torch.rand(len(PROMPTS), 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (True, False):
        gen._checkpointing = checkpointing
        calls.clear()
        x = latents.clone().requires_grad_(True)
        (gen.decode(x) * weights).sum().backward()
        grads.append(x.grad)
        assert len(calls) == (4 if checkpointing else 2)  # two chunks, each recomputed in the backward
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)




@pytest.mark.parametrize("arch", ARCHS)
def test_decode_and_encode(tiny_dirs, arch):
    gen = tiny_generator(arch, tiny_dirs[arch], decode_chunk=2)
    with torch.no_grad():
        latents = gen.sample(PROMPTS, make_noise(gen))
        images = gen.decode(latents)
    assert images.shape == (len(PROMPTS), 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1
    assert not images.requires_grad

    gen.decode_chunk = 1
    with torch.no_grad():
        assert torch.allclose(gen.decode(latents), images, atol=1e-6)

    # with grad enabled, decoding is differentiable (pixel feature spaces need it)
    x = latents.clone().requires_grad_(True)
    gen.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    encoded = gen.encode(images.requires_grad_(True))
    assert encoded.shape == latents.shape and not encoded.requires_grad


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_state_round_trip(tiny_dirs, arch):
    trained = tiny_generator(arch, tiny_dirs[arch])
    randomize_lora(trained)
    state = trained.trainable_state_dict()
    assert all(".lora_" in key for key in state)

    fresh = tiny_generator(arch, tiny_dirs[arch])
    fresh.load_trainable_state_dict(state)
    noise = make_noise(fresh)
    with torch.no_grad():
        assert torch.equal(fresh.sample(PROMPTS, noise), trained.sample(PROMPTS, noise))

    other = tiny_generator(arch, tiny_dirs[arch], lora_rank=4)
    with pytest.raises(PluginError, match="checkpoint does not fit this generator"):
        other.load_trainable_state_dict(state)


# ---------------------------------------------------------------------- bad input


def test_missing_model_path(tmp_path):
    with pytest.raises(PluginError, match=r"model path './no/such/model' does not exist"):
        tiny_generator("sd", "./no/such/model")


def test_directory_without_model_index(tmp_path):
    with pytest.raises(PluginError, match="not a diffusers pipeline directory"):
        tiny_generator("sd", tmp_path)


def test_uncached_hub_id_fails_fast_offline():
    start = time.monotonic()
    with pytest.raises(PluginError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        tiny_generator("sd", "drpo-tests/no-such-model")
    assert time.monotonic() - start < 10


def test_tokenizer_fallback_is_caught(tiny_dirs, tmp_path):
    broken = shutil.copytree(tiny_dirs["sd"], tmp_path / "broken")
    (broken / "tokenizer" / "tokenizer.json").unlink()  # transformers then silently returns 2 tokens
    with pytest.raises(PluginError, match=r"tokenizer has 2 tokens but its text encoder expects up to 1000"):
        tiny_generator("sd", broken)


def test_unsupported_pipeline_kind(tiny_dirs, tmp_path):
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(
        PluginError, match="is a FluxPipeline, but the sd-turbo generator needs a StableDiffusionPipeline"
    ):
        tiny_generator("sd", other)
    with pytest.raises(PluginError, match="is a StableDiffusionXLPipeline.*use the sdxl-turbo generator"):
        tiny_generator("sd", tiny_dirs["sdxl"])


def test_lora_target_that_matches_nothing(tiny_dirs):
    with pytest.raises(PluginError, match="LoRA target module 'to_qkv' matches no Linear/Conv layer"):
        tiny_generator("sd", tiny_dirs["sd"], lora_target_modules=["to_q", "to_qkv"])


# ---------------------------------------------------------------------- registration


def test_registration_and_options(tiny_dirs):
    registered = {}

    def register(name, factory, **kwargs):
        registered[name] = (factory, kwargs)

    drpo_diffusers.drpo_register_generators(register)
    assert set(registered) == {"sd-turbo", "sdxl-turbo"}
    sd_factory, sd = registered["sd-turbo"]
    assert sd["defaults"](None)["selection.candidates"] == 24 and sd["defaults"](None)["train.lr"] == 1e-4
    assert registered["sdxl-turbo"][1]["defaults"](None)["selection.candidates"] == 16
    assert sd["variants"] == ("paper",) and sd["defaults"]("paper")["generator.one_step"] == "official"
    assert "sd-unet" in sd["provides"] and "sd-unet" in registered["sdxl-turbo"][1]["provides"]
    assert sd["options"]().model == "stabilityai/sd-turbo"
    assert registered["sdxl-turbo"][1]["options"]().model == "stabilityai/sdxl-turbo"
    with pytest.raises(ValidationError):
        sd["options"](lora_rnk=4)
    with pytest.raises(ValidationError, match="multiple of 8"):
        sd["options"](resolution=100)

    # a relative model path resolves against the config's directory
    root = Path(tiny_dirs["sd"]).parent
    options = sd["options"](model=Path(tiny_dirs["sd"]).name, resolution=TINY_RESOLUTION)
    gen = sd_factory(options, BuildContext(config_dir=root))
    assert gen.noise_shape == (4, TINY_RESOLUTION // 2, TINY_RESOLUTION // 2)


def test_plugin_import_is_light():
    code = "import sys, drpo_diffusers; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------- quiet, once


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def library_logs():
    """Every message diffusers and transformers log (their library loggers do not propagate)."""
    handler = _Records()
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler.messages
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.parametrize("arch", ARCHS)
def test_long_prompts_warn_once_and_diffusers_repeats_nothing(tiny_dirs, arch, library_logs):
    gen = tiny_generator(arch, tiny_dirs[arch])
    long = "a " + " ".join(["very"] * 50) + " red apple on a table"
    longer = long + " under the evening sun"
    tokens = len(gen.pipe.tokenizer(longer, verbose=False).input_ids)
    assert tokens > gen.pipe.tokenizer.model_max_length == 77
    noise = make_noise(gen, n=2)
    library_logs.clear()
    with torch.no_grad():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gen.sample(["a cat", "the dog"], noise)  # short: nothing to say
            assert caught == []
            gen.sample([long, longer], noise)
            gen.sample(["another " + long, "another " + longer], noise)  # new prompts, encoded again
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert f"loses {tokens - 77} of its {tokens} tokens" in messages[0] and "2 of the 2 prompts" in messages[0]
    assert not [m for m in library_logs if "was truncated" in m or "Token indices sequence length" in m]
    # the filter was only there during the encode: diffusers' other messages still show
    from drpo_diffusers.generator import _DropMessages

    for name in (type(gen.pipe).encode_prompt.__module__, "transformers.tokenization_utils_base"):
        assert not any(isinstance(f, _DropMessages) for f in logging.getLogger(name).filters)


def test_missing_torchvision_notice_is_not_printed(tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has nothing to say")
    pipeline = "import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"
    control = subprocess.run([sys.executable, "-c", pipeline], cwd=tmp_path, capture_output=True, text=True,
                             check=True)
    if "requires torchvision" not in control.stderr:
        pytest.skip("this transformers version does not print the notice")
    code = ("import logging, drpo_diffusers.generator; "
            "logging.getLogger('transformers.utils.import_utils').warning('another notice')")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "requires torchvision" not in out.stderr, out.stderr
    assert "another notice" in out.stderr  # the logger's other messages still pass
