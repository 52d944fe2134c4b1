"""What a component factory is told about the run it is built for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BuildContext:
    #: the ``name:variant`` suffix the user asked for (``None`` when absent)
    variant: str | None = None
    #: torch device string the run uses ("cpu", "cuda", "cuda:1")
    device: str = "cpu"
    #: accelerate's mixed precision: "no", "fp16" or "bf16"
    mixed_precision: str = "no"
    seed: int = 0
    #: directory the YAML config lives in: relative paths in options resolve against it
    config_dir: Path = field(default_factory=Path.cwd)
