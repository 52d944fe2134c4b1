"""What a component factory is told about the run it is built for, and option types plugins share: the
``LocalPath`` marker, ``TorchDevice``, and :class:`ModelRunOptions` (batch size, dtype and device of a ranker on
a frozen model: a plugin's options subclass it and may redeclare a field to change its default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class _LocalPathMarker:
    """Marks an option that may name a file or folder relative to the recipe's folder."""

    def __repr__(self) -> str:
        return "LocalPath"


LOCAL_PATH = _LocalPathMarker()
#: an option naming a local file or folder (or, where the component allows, a hub id): a relative
#: path that exists next to the recipe is saved absolute in the run's config, so it can be reused
LocalPath = Annotated[str, LOCAL_PATH]


@dataclass(frozen=True)
class BuildContext:
    #: the ``name:variant`` suffix the user asked for (``None`` when absent)
    variant: str | None = None
    #: torch device string the run uses ("cpu", "cuda", "cuda:1"; the local rank's under accelerate)
    device: str = "cpu"
    #: accelerate's mixed precision: "no", "fp16" or "bf16"
    mixed_precision: str = "no"
    seed: int = 0
    #: directory the YAML config lives in: relative paths in options resolve against it
    config_dir: Path = field(default_factory=Path.cwd)
    #: seconds one call may take (a ranker section's ``timeout``; the component then runs in a worker process
    #: that is ended at this deadline); None: no limit, in this process. A remote ranker fits its retries in it
    timeout: float | None = None


def _torch_device(value: str) -> str:
    import torch  # here: registering a plugin's options must not load torch

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
