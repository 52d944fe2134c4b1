"""Options every model-backed ranker shares: how many images per forward pass, in what precision, on which
device (a big reward can sit on its own GPU). A plugin's options subclass :class:`ModelRunOptions` and may
redeclare a field to change its default (HPSv3 scores 4 images at a time, not 16)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _torch_device(value: str) -> str:
    import torch  # here, not at import: registering a plugin's options must not load torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{value!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    return value


#: an option naming a torch device ("cpu", "cuda", "cuda:1"), checked when the config is validated
TorchDevice = Annotated[str, AfterValidator(_torch_device)]


class ModelRunOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(16, ge=1, description="images per forward pass")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="backbone weights; auto: the run's mixed precision on CUDA, fp32 elsewhere (scores are "
                            "float32 either way)")
    device: TorchDevice | None = Field(None, description='where the model runs, e.g. "cuda:1"; default: the run\'s '
                                                         "device")
