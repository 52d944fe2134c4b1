"""HPSv2 on open_clip itself (``backend: open_clip``, extra ``openclip``): what ``hpsv2.score`` runs.

For comparison with the converted transformers model, not needed otherwise. open_clip needs torchvision,
and torchvision must be the build that matches the installed torch (ecosystem.md §1.2: never beside the
torch 2.13 CPU wheel), so the project's CI cannot run this path; it was checked by hand against the
tiny golden model (tests/data/hpsv2) on torch 2.14.1 + torchvision 0.29.1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from drpo_clip_rankers.common import OPENAI_MEAN, OPENAI_STD, ClipFamilyRanker, Preprocessing, freeze
from drpo_core.errors import PluginError
from drpo_core.model_rankers import to_pictures

if TYPE_CHECKING:
    from drpo_clip_rankers.options import HPSv2Options

#: open_clip's model config for HPSv2
MODEL = "ViT-H-14"


class OpenClipRanker(ClipFamilyRanker):
    def __init__(self, name: str, model: Any, preprocess: Any, tokenizer: Any, preprocessing: Preprocessing, *,
                 device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        super().__init__(name, images=self._pixels, preprocessing=preprocessing, device=device, dtype=dtype,
                         batch_size=batch_size)
        self.model = freeze(model, device, dtype)
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.preprocess(picture) for picture in to_pictures(images)])

    def scores_of_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        image = F.normalize(self.model.encode_image(pixel_values).float(), dim=-1)
        with torch.no_grad():
            text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (image * text).sum(dim=-1)


def build_open_clip(name: str, options: HPSv2Options, state: Mapping[str, torch.Tensor], device: torch.device,
                    dtype: torch.dtype, model_name: str = MODEL) -> OpenClipRanker:
    try:
        import open_clip
    except ImportError as error:  # open_clip missing, or torchvision broken beside this torch
        raise PluginError(f"ranker {name!r}: backend open_clip needs open_clip_torch and a torchvision that "
                          f"matches torch (pip install 'drpo[openclip]'): {error}") from None
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, precision="fp32")
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as error:
        raise PluginError(f"ranker {name!r}: the checkpoint does not fit open_clip {model_name}: "
                          f"{str(error).splitlines()[0]}") from None
    size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)
    preprocessing = Preprocessing(size, (size, size), OPENAI_MEAN, OPENAI_STD, crop_offset="half-even")
    return OpenClipRanker(name, model, preprocess, open_clip.get_tokenizer(model_name), preprocessing, device=device,
                          dtype=dtype, batch_size=options.batch_size)
