"""The rankers' options (pydantic models, ``extra="forbid"``) and the HPSv2 assets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from drpo_core.context import LocalPath, ModelRunOptions

#: the laion ViT-H/14 processor: PickScore's (its model card) and the tokenizer of HPSv2's open_clip ViT-H-14
LAION_VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L = "openai/clip-vit-large-patch14"
#: HPSv2 checkpoints on the hub (the HPSv2 repository, tgxs002/HPSv2, is Apache-2.0); no checksum was
#: published and none could be computed here
HPS_ASSETS = {
    "hpsv2": {"url": "hf://xswu/HPSv2/HPS_v2_compressed.pt", "sha256": "unverified", "licence": "Apache-2.0",
              "summary": "HPSv2 checkpoint (open_clip ViT-H-14)"},
    "hpsv2.1": {"url": "hf://xswu/HPSv2/HPS_v2.1_compressed.pt", "sha256": "unverified", "licence": "Apache-2.0",
                "summary": "HPSv2.1 checkpoint (open_clip ViT-H-14)"},
}

#: each ranker's documented score range (``Ranker.score_range``, checked by ``drpo doctor``): a cosine for the
#: image-prompt similarities (the paper prints it x100, so [-100, 100] there; typically 0.18-0.35), the LAION
#: predictor's 1-10 rating scale for the aesthetic head
SCORE_RANGES = {"pickscore": (-1.0, 1.0), "clip": (-1.0, 1.0), "hpsv2": (-1.0, 1.0), "hpsv2.1": (-1.0, 1.0),
                "aesthetic": (1.0, 10.0)}
#: rankers whose score does not read the prompt (``Ranker.uses_prompt`` false)
PROMPT_FREE = ("aesthetic",)


class ClipModelOptions(ModelRunOptions):
    """A transformers ``CLIPModel`` (or its vision tower) and its processor."""

    model: LocalPath = Field(OPENAI_VIT_L, description="hub id or local directory of the CLIP model")
    revision: str | None = Field(None, description="hub revision of model (and of the processor when it is the "
                                                   "model's)")
    processor: LocalPath | None = Field(None, description="hub id or local directory of the transformers processor "
                                                          "(image processor and tokenizer); default: the model's")
    processor_revision: str | None = None


class PickScoreOptions(ClipModelOptions):
    model: LocalPath = Field("yuvalkirstain/PickScore_v1", description="hub id or local directory of PickScore")
    processor: LocalPath | None = Field(LAION_VIT_H, description="hub id or local directory of the processor "
                                                                 "(the model card's)")


class AestheticOptions(ClipModelOptions):
    head: LocalPath | None = Field(None, description="the LAION MLP (.pth or .safetensors); default: asset "
                                                     "laion-aesthetic-mlp")


class HPSv2Options(ModelRunOptions):
    checkpoint: LocalPath | None = Field(None, description="open_clip checkpoint (.pt, .pth or .safetensors); default: "
                                                           "the asset of the ranker's name")
    tokenizer: LocalPath = Field(LAION_VIT_H, description="hub id or local directory of a transformers CLIP tokenizer")
    tokenizer_revision: str | None = None
    vision_head_width: int = Field(80, ge=1, description="open_clip image tower head width (ViT-H-14: 80)")
    text_head_width: int = Field(64, ge=1, description="open_clip text tower head width (ViT-H-14: 1024/16 = 64)")
    quick_gelu: bool = Field(False, description="QuickGELU activations (ViT-H-14: no, exact GELU)")
    backend: Literal["transformers", "open_clip"] = Field(
        "transformers", description="open_clip: run open_clip itself (extra openclip, needs torchvision)")
    open_clip_model: str = Field("ViT-H-14", description="backend open_clip: the open_clip model config")
