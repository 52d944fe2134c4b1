"""``aesthetic``: the LAION aesthetic predictor (improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE``).

OpenAI CLIP ViT-L/14's projected image embedding, L2-normalised, through an MLP of five linear layers
(768 -> 1024 -> 128 -> 64 -> 16 -> 1; its dropouts do nothing at inference, and it has no activations),
in float32. Scores are about 1-10 (LAION images mostly 4-7). The prompt is not used.

The head's weights are the asset ``laion-aesthetic-mlp`` (registered by ``drpo_image_rankers``), or any
file of the same layout (``layers.{0,2,4,6,7}.weight/bias``; ``.pth`` read with ``weights_only=True`` or
``.safetensors``) given as ``head``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, CLIPImageProcessorPil, CLIPModel, CLIPVisionModelWithProjection

from drpo_clip_rankers.common import ClipFamilyRanker, Preprocessing, ProcessorImages, freeze, load_pretrained
from drpo_core import assets
from drpo_core.errors import PluginError
from drpo_core.model_rankers import pick_device, pick_dtype
from drpo_image_rankers import LAION_AESTHETIC_MLP

if TYPE_CHECKING:
    from drpo_clip_rankers.options import AestheticOptions
    from drpo_core.context import BuildContext

ASSET = "laion-aesthetic-mlp"
_LAYER = re.compile(r"layers\.(\d+)\.(weight|bias)")


class AestheticHead(torch.nn.Module):
    """The LAION MLP: its ``nn.Linear`` layers applied in order (keys ``layers.N``), nothing in between."""

    def __init__(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        super().__init__()
        indices = sorted({int(m.group(1)) for key in state if (m := _LAYER.fullmatch(key))})
        unknown = [key for key in state if not _LAYER.fullmatch(key)]
        if not indices or unknown:
            raise PluginError(f"ranker 'aesthetic': {source} is not a LAION aesthetic MLP (layers.N.weight/bias)"
                              + (f"; unknown keys {unknown[:3]}" if unknown else ""))
        self.layers = torch.nn.ModuleDict()
        previous = None
        for index in indices:
            weight, bias = state.get(f"layers.{index}.weight"), state.get(f"layers.{index}.bias")
            if weight is None or bias is None or weight.dim() != 2 or (previous and weight.shape[1] != previous):
                raise PluginError(f"ranker 'aesthetic': {source}: layer {index} is not a Linear that follows the last")
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight.float(), "bias": bias.float()})
            self.layers[str(index)] = layer
            previous = weight.shape[0]
        if previous != 1:
            raise PluginError(f"ranker 'aesthetic': {source}: the last layer has {previous} outputs, not 1")

    @property
    def in_features(self) -> int:
        first: torch.nn.Linear = next(iter(self.layers.values()))  # type: ignore[assignment]
        return first.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            x = layer(x)
        return x.squeeze(-1)


class ImageTower(torch.nn.Module):
    """The image half of a CLIP model (``CLIPModel`` or ``CLIPVisionModelWithProjection``): projected embeddings."""

    def __init__(self, model: CLIPModel | CLIPVisionModelWithProjection) -> None:
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection
        self.projection_dim = int(model.visual_projection.out_features)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        return embeds


class AestheticRanker(ClipFamilyRanker):
    def __init__(self, model: ImageTower, head: AestheticHead, *,
                 images: Callable[[torch.Tensor], torch.Tensor], preprocessing: Preprocessing,
                 device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        super().__init__("aesthetic", images=images, preprocessing=preprocessing, device=device, dtype=dtype,
                         batch_size=batch_size)
        self.model = freeze(model, device, dtype)
        self.head = freeze(head, device, torch.float32)
        embed = model.projection_dim
        if head.in_features != embed:
            raise PluginError(f"ranker 'aesthetic': the head takes {head.in_features}-d embeddings but the CLIP model "
                              f"projects to {embed}")

    def scores_of_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        embeds = self.model(pixel_values)
        scores: torch.Tensor = self.head(F.normalize(embeds.float(), dim=-1))
        return scores


def load_head(path: Path) -> AestheticHead:
    state: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = assets.load_checkpoint(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PluginError(f"ranker 'aesthetic': {path} does not hold a state dict of tensors")
    return AestheticHead(state, str(path))


def build(options: AestheticOptions, context: BuildContext) -> AestheticRanker:
    head = load_head(assets.option_or_asset(options.head, assets.Asset(name=ASSET, **LAION_AESTHETIC_MLP),
                                            context.config_dir, "ranker 'aesthetic': head",
                                            "set the ranker's head to a local copy of the file"))
    device = pick_device(options.device, context)
    dtype = pick_dtype(options.dtype, device, context)
    config = load_pretrained("aesthetic", "model", AutoConfig.from_pretrained, options.model, context, options.revision)
    # a full CLIP model (its text tower is dropped) or only its image half
    clip: CLIPModel | CLIPVisionModelWithProjection
    if config.model_type == "clip":
        clip = load_pretrained("aesthetic", "model", CLIPModel.from_pretrained, options.model, context,
                               options.revision, dtype=dtype)
    elif config.model_type == "clip_vision_model":
        clip = load_pretrained("aesthetic", "model", CLIPVisionModelWithProjection.from_pretrained, options.model,
                               context, options.revision, dtype=dtype)
    else:
        raise PluginError(f"ranker 'aesthetic': model {options.model!r} is a {config.model_type!r}, not a CLIP model")
    model = ImageTower(clip)
    del clip
    source = options.processor or options.model
    revision = options.processor_revision if options.processor else options.revision
    processor = load_pretrained("aesthetic", "processor", CLIPImageProcessorPil.from_pretrained, source, context,
                                revision)
    return AestheticRanker(model, head, images=ProcessorImages(processor),
                           preprocessing=Preprocessing.of_processor(processor, "aesthetic"), device=device,
                           dtype=dtype, batch_size=options.batch_size)
