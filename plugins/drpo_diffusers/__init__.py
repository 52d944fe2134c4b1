"""drpo's diffusers plugin: the SD-Turbo and SDXL-Turbo one-step generators.

Registration only: diffusers and torch are imported inside the factories, so listing plugins
stays fast. The generator lives in ``drpo_diffusers.generator``, LoRA/pipeline export in
``drpo_diffusers.export`` and tiny test pipelines in ``drpo_diffusers.testing``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from drpo_core import hookimpl
from drpo_core.context import BuildContext, LocalPath
from drpo_core.hookspecs import Register
from drpo_core.interfaces import Generator

#: transformers' notice when diffusers' pipeline modules import ``CLIPImageProcessor`` or
#: ``SiglipImageProcessor`` without torchvision installed (printed by every run that loads a pipeline)
_TORCHVISION_NOTICE = re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to "
                                 r"`\w+ImageProcessorPil`")


class _NoTorchvisionNotice(logging.Filter):
    """Drops that one notice: the generators use no image processor (no safety checker, no IP adapter), so
    the PIL fallback changes nothing. Every other message of transformers' import logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _TORCHVISION_NOTICE.match(record.getMessage())


# before diffusers is imported (inside the factories): the notice is logged when its modules load
_import_logger = logging.getLogger("transformers.utils.import_utils")
if not any(isinstance(f, _NoTorchvisionNotice) for f in _import_logger.filters):
    _import_logger.addFilter(_NoTorchvisionNotice())


class TurboOptions(BaseModel):
    """Options shared by the ``sd-turbo`` and ``sdxl-turbo`` generators."""

    model_config = ConfigDict(extra="forbid")

    model: LocalPath = Field(description="hub id, or a local diffusers pipeline directory (relative to the config)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description='weight file variant, e.g. "fp16"')
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="weight dtype; auto: the run's mixed precision on CUDA, fp32 on CPU"
    )
    lora: bool = Field(
        True,
        description="train LoRA adapters (reference = adapters disabled, free); false: full fine-tuning, "
        "where the frozen reference is a deep copy of the UNet (twice the UNet memory)",
    )
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet module names (suffixes) that get adapters",
        min_length=1,
    )
    resolution: int = Field(512, ge=8, description="image size in pixels (square)")
    decode_chunk: int = Field(4, ge=1, description="images the VAE decodes at once")
    vae_slicing: bool = False
    vae_tiling: bool = False

    gradient_checkpointing: None = Field(None, description="moved to train.gradient_checkpointing")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _moved(cls, value: Any) -> None:
        raise ValueError("set train.gradient_checkpointing instead (the trainer turns it on or off)")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_eight(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {value}")
        return value


class SDTurboOptions(TurboOptions):
    model: LocalPath = Field("stabilityai/sd-turbo", description=TurboOptions.model_fields["model"].description)
    one_step: Literal["pipeline", "official"] = Field(
        "pipeline",
        description="pipeline: the diffusers pipeline's one step (what the exported LoRA gets at inference); "
        "official: the official DrPO code's, unscaled noise in and x0 re-projected to t=0 "
        "(0.9996 x0 + 0.0292 eps, method.md §6.1)",
    )


class SDXLTurboOptions(TurboOptions):
    model: LocalPath = Field("stabilityai/sdxl-turbo", description=TurboOptions.model_fields["model"].description)


#: run settings of the paper's recipes (method.md §6.4), shared by both generators
PAPER_DRIFT = {
    "kernel.name": "laplacian",
    "drift.radii": [0.02, 0.05, 0.2],
    "drift.positive_weight": 3000.0,
    "drift.negative_weight": 3000.0,
    "drift.ref_positive_weight": 3000.0,
    "drift.ref_negative_weight": 3000.0,
    "drift.ref_lambda": 0.2,
    "selection.positives": 8,
    "selection.negatives": 8,
    "train.prompts_per_step": 1,
    "train.grad_accum": 8,
}
#: SD-Turbo (the paper's path): K=24, lr 1e-4, fp16, 1,000 steps, latent-MAE features (its six layer4 keys)
#: whose keys' losses are summed. Not the raw latents: the paper's ablation puts them below the base model
#: (method.md §11.6).
SD_TURBO_DEFAULTS = {
    **PAPER_DRIFT,
    "selection.candidates": 24,
    "train.lr": 1e-4,
    "train.mixed_precision": "fp16",
    "train.steps": 1000,
    "features.name": "latent-mae",
    "drift.aggregation": "sum",
}
#: SDXL-Turbo: K=16, lr 1e-5, bf16, 5,000 steps; its pixel-MAE and teacher-UNet keys' losses are averaged.
SDXL_TURBO_DEFAULTS = {
    **PAPER_DRIFT,
    "selection.candidates": 16,
    "train.lr": 1e-5,
    "train.mixed_precision": "bf16",
    "train.steps": 5000,
    "features.name": "latent",
    "drift.aggregation": "mean",
}
#: what both generators hand to feature spaces: latents, decoded images, that the latents are those of a
#: 4-channel Stable Diffusion VAE (scaled by its factor: what latent-MAE was trained on; SDXL's VAE shares the
#: architecture with retrained weights), and a Stable Diffusion UNet with its text conditioning
#: (``TurboGenerator.frozen_base`` / ``unet_conditioning``, for the teacher-UNet space)
PROVIDES = ("latents", "images", "sd-vae-latents", "sd-unet")

#: ``name:paper``: the official code's switches on top of the generator's recommendations; ``drpo config
#: show`` names each key it sets "generator NAME:paper". Feature spaces add their own for the preset through
#: ``pair_defaults`` keyed by ``NAME:paper`` (pixel-MAE's official random masking for ``sdxl-turbo:paper``).
PAPER_PRESETS: dict[str, dict[str, object]] = {
    # the official one-step conversion, whose latent the latent-MAE sees and the rankers score
    "sd-turbo": {"generator.one_step": "official"},
    # the SDXL trainer's default feature space (its teacher-UNet recipe: add --features teacher-unet,
    # whose anchor weights for sdxl-turbo come with it)
    "sdxl-turbo": {"features.name": "pixel-mae"},
}


def _with_preset(name: str, defaults: dict[str, object]) -> Callable[[str | None], dict[str, object]]:
    def recommend(variant: str | None) -> dict[str, object]:
        return {**defaults, **(PAPER_PRESETS[name] if variant == "paper" else {})}

    return recommend


@hookimpl
def drpo_register_generators(register: Register[Generator]) -> None:
    register(
        "sd-turbo",
        _build_sd,
        options=SDTurboOptions,
        defaults=_with_preset("sd-turbo", SD_TURBO_DEFAULTS),
        variants=("paper",),
        provides=PROVIDES,
        summary="SD-Turbo (SD 2.1) one-step generator, LoRA on the UNet, 512px (:paper preset)",
    )
    register(
        "sdxl-turbo",
        _build_sdxl,
        options=SDXLTurboOptions,
        defaults=_with_preset("sdxl-turbo", SDXL_TURBO_DEFAULTS),
        variants=("paper",),
        provides=PROVIDES,
        summary="SDXL-Turbo one-step generator, LoRA on the UNet, 512px (:paper preset)",
    )


def _build_sd(options: SDTurboOptions, context: BuildContext) -> Generator:
    from drpo_diffusers.generator import TurboGenerator

    return TurboGenerator.from_options(options, context, architecture="sd")


def _build_sdxl(options: SDXLTurboOptions, context: BuildContext) -> Generator:
    from drpo_diffusers.generator import TurboGenerator

    return TurboGenerator.from_options(options, context, architecture="sdxl")
