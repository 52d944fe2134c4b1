"""The ``hpsv3`` ranker's options (a pydantic model, ``extra="forbid"``) and its checkpoint asset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drpo_core.context import LocalPath, ModelRunOptions, TorchDevice

#: the reward model's weights: Qwen2-VL-7B-Instruct fine-tuned with the reward head (MIT, as the hpsv3 package);
#: no checksum was published and none could be computed here
HPSV3_ASSET = {"url": "hf://MizzenAI/HPSv3/HPSv3.safetensors", "sha256": "unverified", "licence": "MIT",
               "summary": "HPSv3 reward model (Qwen2-VL-7B backbone and reward head, bf16)"}
#: the base model HPSv3 was trained from: its config, tokenizer and chat format (its weights are not read)
QWEN2_VL_7B = "Qwen/Qwen2-VL-7B-Instruct"
#: HPSv3's image size: min_pixels = max_pixels = 256 * 28 * 28, i.e. 256 visual tokens per image
HPSV3_PIXELS = 256 * 28 * 28


class HPSv3Options(ModelRunOptions):
    checkpoint: LocalPath | None = Field(None, description="HPSv3 weights (.safetensors, upstream's key layout); "
                                                           "default: the asset hpsv3 (MizzenAI/HPSv3)")
    base: LocalPath = Field(QWEN2_VL_7B, description="hub id or local directory of the Qwen2-VL base: its config and "
                                                     "tokenizer (no weights are read from it)")
    base_revision: str | None = None
    batch_size: int = Field(4, ge=1, description="images per forward pass (one 448x448 image and prompt is about "
                                                 "1,000 tokens)")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="backbone weights; auto: bf16 on CUDA (as HPSv3 was trained), fp32 elsewhere; the "
                            "reward head is float32 either way")
    device: TorchDevice | None = Field(None, description='where the model runs, e.g. "cuda:1" to keep a 7B reward off the '
                                                 "generator's GPU; default: the run's device")
    min_pixels: int = Field(HPSV3_PIXELS, ge=28 * 28, description="smallest image area after resizing (HPSv3: "
                                                                  "200704)")
    max_pixels: int = Field(HPSV3_PIXELS, ge=28 * 28, description="largest image area after resizing (HPSv3: "
                                                                  "200704)")

    @model_validator(mode="after")
    def _pixels(self) -> HPSv3Options:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} is larger than max_pixels {self.max_pixels}")
        return self
