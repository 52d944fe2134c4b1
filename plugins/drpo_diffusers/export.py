"""Export a trained :class:`~drpo_diffusers.generator.TurboGenerator` for use outside drpo.

Formats (each directory also gets a model card ``README.md``):

* ``format="diffusers"``: ``pytorch_lora_weights.safetensors`` with the adapter's LoRA config
  (rank, alpha, targets) in the file's metadata, so ``pipe.load_lora_weights(dir)`` restores the
  scale ``alpha / rank`` exactly.
* ``format="kohya"``: ``drpo_lora_kohya.safetensors`` with kohya-ss keys
  (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``), the format ComfyUI and
  AUTOMATIC1111 load; diffusers loads it with ``pipe.load_lora_weights(dir, weight_name=...)``.
  Module names use the diffusers UNet spelling, as kohya-ss does for SD 1.x/2.x.
* ``fuse=True``: a complete pipeline directory with the LoRA merged into the UNet weights
  (``DiffusionPipeline.from_pretrained(dir)``). Fully fine-tuned generators always export this way.

The generator being exported is left untouched: fusing happens on a copy of its UNet.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from drpo_core.errors import ConfigError

KOHYA_WEIGHT_NAME = "drpo_lora_kohya.safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FORMATS = ("diffusers", "kohya")


class ExportableGenerator(Protocol):
    """What export reads of a :class:`drpo_diffusers.generator.TurboGenerator` (which imports this module)."""

    pipe: Any
    unet: Any
    architecture: str
    base_model: str
    lora: bool
    lora_rank: int
    lora_alpha: float
    resolution: int


def export_generator(
    generator: ExportableGenerator,
    out_dir: str | Path,
    format: str = "diffusers",
    fuse: bool = False,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``generator``'s weights to ``out_dir`` in ``format``; returns ``out_dir``.

    ``card`` fills the model card; known keys: ``title``, ``recipe`` (name or mapping), ``ranker``,
    ``config`` (the run configuration, a mapping), ``metrics`` (name -> value); other keys are
    listed under "Details".
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: expected one of {', '.join(FORMATS)}")
    if fuse and format != "diffusers":
        raise ConfigError("fuse=True writes a full diffusers pipeline; use format='diffusers'")
    if not generator.lora and format == "kohya":
        raise ConfigError("kohya export needs LoRA adapters; this generator was fully fine-tuned")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if fuse or not generator.lora:
        kind = "pipeline"
        _save_pipeline(generator, out_dir)
    elif format == "diffusers":
        kind = "diffusers"
        _save_diffusers_lora(generator, out_dir)
    else:
        kind = "kohya"
        _save_kohya_lora(generator, out_dir)
    (out_dir / "README.md").write_text(model_card(generator, kind, card or {}), encoding="utf-8")
    return out_dir


def _lora_config(generator: ExportableGenerator) -> LoraConfig:
    return generator.unet.peft_config["default"]


def _save_diffusers_lora(generator: ExportableGenerator, out_dir: Path) -> None:
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(generator.unet))
    pipeline_cls = type(generator.pipe)
    # without the metadata diffusers would assume alpha == rank
    pipeline_cls.save_lora_weights(
        out_dir,
        unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in state.items()},
        unet_lora_adapter_metadata=_lora_config(generator).to_dict(),
        weight_name=DIFFUSERS_WEIGHT_NAME,
    )


def _save_kohya_lora(generator: ExportableGenerator, out_dir: Path) -> None:
    peft_state = get_peft_model_state_dict(generator.unet)
    # convert_state_dict_to_kohya turns "unet." into the "lora_unet_" prefix
    state = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    # ... and it writes alpha = rank; write the real alpha, or the LoRA scale would be wrong
    alpha = float(_lora_config(generator).lora_alpha)
    state = {
        k: torch.tensor(alpha) if k.endswith(".alpha") else v.detach().cpu().contiguous()
        for k, v in state.items()
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(generator.lora_rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": {"sd": "sd_v2", "sdxl": "sdxl_base_v1-0"}[generator.architecture],
        "ss_training_comment": "DrPO (drpo)",
    }
    save_file(state, str(out_dir / KOHYA_WEIGHT_NAME), metadata=metadata)


def _save_pipeline(generator: ExportableGenerator, out_dir: Path) -> None:
    pipe = generator.pipe
    unet = pipe.unet
    if generator.lora:
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()  # drop the (now merged) adapter layers, keep the merged weights
    extra = {"requires_safety_checker": False} if generator.architecture == "sd" else {}
    fused = type(pipe)(**{**pipe.components, "unet": unet}, **extra)
    fused.save_pretrained(out_dir)


# ---------------------------------------------------------------------- model card


def model_card(generator: ExportableGenerator, kind: str, card: Mapping[str, Any]) -> str:
    base = generator.base_model or "the base model"
    front = {
        "base_model": generator.base_model or None,
        "library_name": "diffusers",
        "license": "other",
        "tags": ["drpo", "text-to-image", "diffusers", "one-step"] + (["lora"] if kind != "pipeline" else []),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [f"# {card.get('title', f'DrPO fine-tune of {base}')}", ""]
    lines += [
        f"A one-step text-to-image model: `{base}` fine-tuned with Drifting Preference Optimization "
        "(DrPO, arXiv 2606.02521) with drpo.",
        "",
        "## Licence",
        "",
        f"These weights are a derivative of `{base}`. The base model's licence terms apply to them; "
        "read and follow that licence before using or sharing this model.",
        "",
        "## Usage",
        "",
        _usage(generator, kind),
        "",
        "## Training",
        "",
        f"- base model: `{base}` ({generator.architecture.upper()}, {generator.resolution}px, 1 step, guidance 0)",
    ]
    if generator.lora:
        modules = _lora_config(generator).target_modules  # peft keeps a set of names (or one regex)
        targets = sorted([modules] if isinstance(modules, str) else modules or [])
        lines.append(f"- LoRA: rank {generator.lora_rank}, alpha {generator.lora_alpha:g}, targets {targets}")
    else:
        lines.append("- full fine-tuning of the UNet")
    if "ranker" in card:
        lines.append(f"- ranker: {card['ranker']}")
    if "recipe" in card:
        lines.append(f"- recipe: {_inline(card['recipe'])}")
    extra = {k: v for k, v in card.items() if k not in {"title", "ranker", "recipe", "config", "metrics"}}
    if extra:
        lines += ["", "### Details", ""] + [f"- {k}: {_inline(v)}" for k, v in extra.items()]
    if card.get("config"):
        lines += [
            "",
            "### Configuration",
            "",
            "```yaml",
            yaml.safe_dump(dict(card["config"]), sort_keys=False).strip(),
            "```",
        ]
    if card.get("metrics"):
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {_inline(value)} |" for name, value in dict(card["metrics"]).items()]
    return "\n".join(lines) + "\n"


def _inline(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_inline(v)}" for k, v in value.items())
    return str(value)


def _usage(generator: ExportableGenerator, kind: str) -> str:
    base = generator.base_model or "<base model>"
    r = generator.resolution
    call = f"image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, height={r}, width={r}).images[0]"
    if kind == "pipeline":
        load = (
            'pipe = AutoPipelineForText2Image.from_pretrained("<this directory>", torch_dtype=torch.float16)'
        )
        steps = [load, 'pipe.to("cuda")']
    else:
        load = f'pipe = AutoPipelineForText2Image.from_pretrained("{base}", torch_dtype=torch.float16)'
        weight = f', weight_name="{KOHYA_WEIGHT_NAME}"' if kind == "kohya" else ""
        steps = [load, 'pipe.to("cuda")', f'pipe.load_lora_weights("<this directory>"{weight})']
    code = [
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "",
        *steps,
        call,
        "```",
    ]
    text = "\n".join(code)
    if kind == "kohya":
        text += (
            f"\n\nComfyUI / AUTOMATIC1111: copy `{KOHYA_WEIGHT_NAME}` into the LoRA folder (models/loras)."
        )
    return text
