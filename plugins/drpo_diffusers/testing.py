"""Tiny SD and SDXL Turbo pipelines for tests, built from configs without any hub access.

The component configs follow diffusers' own pipeline tests; the schedulers are the Turbo ones
(SD-Turbo: Euler, SDXL-Turbo: Euler ancestral, both with ``timestep_spacing="trailing"``, so one
step runs at t=999). Each builder saves the pipeline with ``save_pretrained`` so the plugin loads it
through the same ``from_pretrained`` path as real weights. The VAE has two levels, so the latent
is half the image size (``vae_scale_factor == 2``); use ``resolution=TINY_RESOLUTION``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTokenizer

    from drpo_diffusers.generator import TurboGenerator

#: image size the tiny pipelines are meant for (latents of 16 x 16)
TINY_RESOLUTION = 32

_SCHEDULER_KW: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="trailing",
    prediction_type="epsilon",
)


def _absent(*components: str) -> dict[str, Any]:
    """Optional pipeline components the tiny pipelines go without (diffusers annotates them as required,
    its pipelines take None)."""
    return dict.fromkeys(components)


def _bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP byte-to-unicode map: 256 printable symbols, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_vocab(directory: str | Path) -> tuple[Path, Path]:
    """Write a minimal valid CLIP BPE vocabulary (516 tokens); returns (vocab.json, merges.txt)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["th", "the</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\nt h\nth e</w>\n", encoding="utf-8")
    return vocab_file, merges_file


def make_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the minimal vocabulary (the files live in a temporary directory)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_clip_vocab(tmp)
        # model_max_length must be set: without a tokenizer config it is "infinite" and the
        # pipeline pads prompts to it.
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
    )


def _text_config(hidden: int, **extra: Any) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=1000,
        **extra,
    )


def make_tiny_sd(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny SD-Turbo-like ``StableDiffusionPipeline`` into ``directory``."""
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextModel

    directory = Path(directory)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_tiny_vae(scaling_factor=0.18215),
        text_encoder=CLIPTextModel(_text_config(8)),
        tokenizer=make_tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(**_SCHEDULER_KW),
        **_absent("safety_checker", "feature_extractor", "image_encoder"),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def make_tiny_sdxl(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny SDXL-Turbo-like ``StableDiffusionXLPipeline`` into ``directory``."""
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
    from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(directory)
    torch.manual_seed(seed)
    text_dim, projection_dim, time_dim = 16, 16, 8
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        # six time ids of time_dim each, plus the pooled text embedding of text_encoder_2
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        # SDXL concatenates the hidden states of both text encoders
        cross_attention_dim=2 * text_dim,
        norm_num_groups=2,
    )
    tokenizer = make_tiny_tokenizer()
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_text_config(text_dim)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(text_dim, projection_dim=projection_dim)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerAncestralDiscreteScheduler(**_SCHEDULER_KW),
        **_absent("image_encoder", "feature_extractor"),
    )
    pipe.save_pretrained(directory)
    return directory


def build_tiny_pipelines(root: str | Path) -> dict[str, Path]:
    """``{"sd": dir, "sdxl": dir}`` under ``root``, built once (reused when already there)."""
    root = Path(root)
    dirs = {"sd": root / "tiny-sd-turbo", "sdxl": root / "tiny-sdxl-turbo"}
    for arch, builder in (("sd", make_tiny_sd), ("sdxl", make_tiny_sdxl)):
        if not (dirs[arch] / "model_index.json").is_file():
            builder(dirs[arch])
    return dirs


def tiny_generator(architecture: str, directory: str | Path, *, gradient_checkpointing: bool = False,
                   **options: Any) -> TurboGenerator:
    """A :class:`TurboGenerator` on a tiny pipeline directory, at ``TINY_RESOLUTION`` on the CPU; gradient
    checkpointing on when asked (what the trainer does with ``train.gradient_checkpointing``)."""
    from drpo_core.context import BuildContext
    from drpo_diffusers import SDTurboOptions, SDXLTurboOptions
    from drpo_diffusers.generator import TurboGenerator

    options_cls = {"sd": SDTurboOptions, "sdxl": SDXLTurboOptions}[architecture]
    options.setdefault("resolution", TINY_RESOLUTION)
    generator = TurboGenerator.from_options(
        options_cls(model=str(directory), **options), BuildContext(), architecture=architecture
    )
    if gradient_checkpointing:
        generator.enable_gradient_checkpointing()
    return generator


def make_tiny_run(root: str | Path, pipeline: str | Path, prompts: list[str], seed: int = 0) -> Path:
    """A run directory ``root/run`` of the tiny SD-Turbo at ``pipeline``, whose recipe (``root/recipe.yaml``)
    names the pipeline by a path relative to itself, with one checkpoint of random LoRA weights (so the
    fine-tune differs from its base); uses the process-wide registry (``sd-turbo``, ``brightness``,
    ``latent``)."""
    import os

    import torch
    import yaml

    from drpo_core.checkpoint import save_checkpoint
    from drpo_core.config import resolve_config
    from drpo_core.context import BuildContext
    from drpo_core.registry import get_registry

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    recipe = {
        "generator": {"name": "sd-turbo", "model": os.path.relpath(pipeline, root), "resolution": TINY_RESOLUTION,
                      "lora_rank": 4, "lora_alpha": 8},
        "rankers": ["brightness"], "features": "latent",
        "selection": {"candidates": 4, "positives": 1, "negatives": 1},
        "train": {"steps": 1, "mixed_precision": "no"},
        "prompts": {"path": "prompts.txt", "eval_count": 1}, "log": {"progress": False}, "output_dir": "run",
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    resolved = resolve_config(root / "recipe.yaml")
    generator = get_registry().build("generator", "sd-turbo", resolved.options["generator"],
                                     BuildContext(config_dir=resolved.config_dir), "generator")
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in generator.trainable_parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=draw))
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(resolved.portable_yaml())
    save_checkpoint(run, 1, trainable=generator.trainable_state_dict(), optimizer_state={}, scheduler_state={},
                    state={}, config_text=resolved.portable_yaml())
    return run
