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

from typing import TYPE_CHECKING, Any

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_vision_features.options import (
    TEACHER_SDXL,
    DinoOptions,
    PixelMAEOptions,
    TeacherOptions,
)

if TYPE_CHECKING:
    from drpo_core.interfaces import FeatureSpace

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
