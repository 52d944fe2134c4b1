"""drpo's vision feature spaces (method.md §5.2-§5.4): DINOv2, pixel ViT-MAE and the teacher UNet.

Registration only: torch, transformers and diffusers are imported inside the factories, so listing
plugins stays fast. One short module per space:

* ``dinov2`` (``drpo_vision_features.dino``): decoded images, bicubic-resized and normalised, through a
  frozen DINOv2; per chosen layer the mean and std of its patch tokens and its CLS token (one particle
  each). The paper's ablation "VAE-dec. + DINOv2" (layers 3, 6, 9, 12).
* ``pixel-mae`` (``drpo_vision_features.pixel_mae``): the same through a frozen ViT-MAE encoder with
  masking truly off (every patch, in order). ``masking: official`` is the official SDXL trainer's
  behaviour: HF's random masking at the checkpoint's ratio (a random 25 % of the patches of
  ``facebook/vit-mae-base``, drawn anew per call), which the ``sdxl-turbo:paper`` preset selects.
* ``teacher-unet`` (``drpo_vision_features.teacher``): activations of the generator's own frozen base UNet
  (adapters off through forward and backward) at chosen blocks, on the latents plus a little noise
  derived from each candidate's noise; pooled 4x4 and flattened (one particle each).

The pixel spaces take images: the training loop decodes latents with gradient through the frozen VAE
(``decode_chunk`` images at a time, recomputed in the backward when gradient checkpointing is on).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from drpo_core import hookimpl
from drpo_core.context import BuildContext, LocalPath
from drpo_core.hookspecs import Register

if TYPE_CHECKING:
    from drpo_core.interfaces import FeatureSpace

TokenStat = Literal["patch_mean", "patch_std", "cls"]
TOKEN_STATS: tuple[TokenStat, ...] = ("patch_mean", "patch_std", "cls")

#: the paper's teacher-UNet recipe for SDXL-Turbo (method.md §6.4): tuned anchor weights, lambda 0.25,
#: keys averaged
TEACHER_SDXL = {
    "drift.positive_weight": 3000.0,
    "drift.negative_weight": 2000.0,
    "drift.ref_positive_weight": 3500.0,
    "drift.ref_negative_weight": 5000.0,
    "drift.ref_lambda": 0.25,
    "drift.aggregation": "mean",
}


class _HubModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    stats: list[TokenStat] = Field(
        default_factory=lambda: list(TOKEN_STATS), min_length=1,
        description="per layer: mean and std of the patch tokens, the CLS token (one particle each)")
    image_size: int | None = Field(
        None, ge=8, description="side the images are resized to (bicubic); default: the model's preprocessor "
        "config (crop size, else size; 224 when it has none)")


class DinoOptions(_HubModelOptions):
    model: LocalPath = Field(
        "facebook/dinov2-base",
        description="transformers: a hub id or local directory (from_pretrained); timm: a timm model name "
        "(vit_base_patch14_dinov2.lvd142m), hf-hub:ID or local-dir:PATH")
    backend: Literal["transformers", "timm"] = Field(
        "transformers", description="timm needs the timm extra (and torchvision)")
    layers: list[int] = Field(
        default_factory=lambda: [3, 6, 9, 12], min_length=1,
        description="transformer layers (1-based) whose tokens give keys layer{L}_{stat}")


class PixelMAEOptions(_HubModelOptions):
    model: LocalPath = Field("facebook/vit-mae-base", description="a hub id or local directory (from_pretrained)")
    layers: list[int] = Field(
        default_factory=lambda: [12], min_length=1,
        description="transformer layers (1-based) whose tokens give keys layer{L}_{stat}")
    masking: Literal["off", "official"] = Field(
        "off", description="off: every patch, in order (mask_ratio 0, fixed order); official: HF's random "
        "masking at the checkpoint's mask_ratio, new per call (the official SDXL code: 25 % of the patches)")


class TeacherOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blocks: list[str] = Field(
        default_factory=lambda: ["down_blocks.2", "mid_block", "up_blocks.0"], min_length=1,
        description="UNet modules whose outputs are the keys (dotted module names)")
    noise_level: float = Field(0.1, ge=0, description="sigma: the UNet sees latents + sigma * xi")
    timestep: int = Field(100, ge=0, le=999, description="the UNet's timestep")
    pool: int = Field(4, ge=1, description="average pooling kernel and stride (adaptive 1x1 when the map is smaller)")
    checkpointing: bool = Field(
        True, description="recompute the teacher's blocks in the backward (with the adapters off): far less "
        "memory; false keeps every activation")
    seed: int = Field(0, description="salt of the noise xi (derived from each candidate's noise)")


@hookimpl
def drpo_register_features(register: Register[Any]) -> None:
    register("dinov2", _build_dino, options=DinoOptions, requires=("images",),
             summary="DINOv2 on decoded images: patch mean/std and CLS per layer")
    register("pixel-mae", _build_pixel_mae, options=PixelMAEOptions, requires=("images",),
             pair_defaults={"sdxl-turbo:paper": {"features.masking": "official"}},
             summary="ViT-MAE on decoded images, masking off: patch mean/std and CLS")
    register("teacher-unet", _build_teacher, options=TeacherOptions, requires=("latents", "sd-unet"),
             pair_defaults={"sdxl-turbo": TEACHER_SDXL},
             summary="the generator's frozen base UNet: pooled block activations")


def _build_dino(options: DinoOptions, context: BuildContext) -> FeatureSpace:
    from drpo_vision_features.dino import build_dino

    return build_dino(options, context)


def _build_pixel_mae(options: PixelMAEOptions, context: BuildContext) -> FeatureSpace:
    from drpo_vision_features.pixel_mae import build_pixel_mae

    return build_pixel_mae(options, context)


def _build_teacher(options: TeacherOptions, context: BuildContext) -> FeatureSpace:
    from drpo_vision_features.teacher import TeacherUNetFeatures

    return TeacherUNetFeatures(options.blocks, noise_level=options.noise_level, timestep=options.timestep,
                               pool=options.pool, checkpointing=options.checkpointing, seed=options.seed)
