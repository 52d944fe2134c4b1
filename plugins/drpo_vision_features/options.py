"""The options of the vision feature spaces (their own module, so the spaces' modules can import them
without importing the package that lazily imports them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from drpo_core.context import LocalPath

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
