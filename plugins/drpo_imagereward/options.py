"""The ``imagereward`` ranker's options (pydantic, ``extra="forbid"``)."""

from __future__ import annotations

from pydantic import Field

from drpo_core.context import LocalPath, ModelRunOptions

#: the hub repository of ImageReward v1.0: ``ImageReward.pt`` (the state dict) and ``med_config.json``
IMAGEREWARD_REPO = "THUDM/ImageReward"


class ImageRewardOptions(ModelRunOptions):
    """Where the weights come from, plus ``batch_size``, ``dtype`` and ``device`` (shared with the CLIP-family
    rankers: a backbone dtype, scores float32 whatever it is)."""

    model: LocalPath = Field(IMAGEREWARD_REPO, description="hub id or local directory holding the checkpoint and "
                                                           "med_config.json")
    revision: str | None = Field(None, description="hub revision of model")
    checkpoint: str = Field("ImageReward.pt", description="the state dict's file name inside model (.pt, .pth or "
                                                          ".safetensors)")
    vocabulary: LocalPath | None = Field(None, description="BERT WordPiece vocab.txt; default: bert-base-uncased's, "
                                                           "shipped with the plugin (no download)")
    vision_head_width: int = Field(64, ge=1, description="ViT attention head width (ImageReward's ViT-L/16: "
                                                         "1024 / 16 heads = 64); the checkpoint does not record it")
