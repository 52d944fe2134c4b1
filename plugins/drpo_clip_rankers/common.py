"""What the CLIP-family rankers share: loading, the two image paths, batching, checks.

**Two image paths.**

* ``score`` (what DrPO ranks with, under no grad) shows the model its images the way its authors did:
  as 8-bit pictures (``round(255 x)``, diffusers' ``numpy_to_pil``) through the model's own preprocessing:
  its transformers image processor, always the PIL backend (``CLIPImageProcessorPil``, what the models
  were published with; with torchvision installed transformers would pick its torchvision backend,
  which resizes differently), or for HPSv2 open_clip's ``preprocess_val`` (:class:`OpenClipImages`).
* ``score_differentiable`` (for gradient baselines such as DRaFT): the same steps on tensors, no PIL, no
  rounding: antialiased bicubic resize (``torch.nn.functional.interpolate(antialias=True)``, which uses
  PIL's bicubic coefficient a = -0.5), clamp to [0, 1] (the 8-bit picture cannot leave it), centre crop,
  normalise. It differs from the PIL path by the 8-bit rounding and PIL's fixed-point resampling;
  ``tests/test_clip_rankers.py`` measures it.

**Precision.** The backbone runs in the ranker's ``dtype`` (autocast off, so the run's mixed precision does
not change it); embeddings are cast to float32 before they are normalised and compared, and heads run in
float32.

**Checks.** Images must be ``(B, 3, H, W)`` with one prompt per image. Rows whose pixels are not finite get
NaN scores (the loop skips their prompt, as for any ranker); a non-finite score from finite pixels is an
error naming the ranker (an fp16 overflow, or broken weights).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from drpo_clip_rankers.options import PROMPT_FREE, SCORE_RANGES
from drpo_core.context import BuildContext
from drpo_core.errors import ComponentError, PluginError
from drpo_core.hub import from_hub_or_cache, resolve_model
from drpo_core.model_rankers import ModelRanker, to_pictures

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: OpenAI CLIP's normalisation (open_clip's ViT-H-14 and HPSv2 use it too)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
Dtype = Literal["auto", "fp32", "fp16", "bf16"]
#: normalised text embeddings kept per ranker (a ViT-H prompt embedding is 4 KB)
TEXT_CACHE_SIZE = 1024
_Loaded = TypeVar("_Loaded")
_Module = TypeVar("_Module", bound=torch.nn.Module)


# ---------------------------------------------------------------------------------------- loading


def load_pretrained(ranker: str, key: str, load: Callable[..., _Loaded], model: str, context: BuildContext,
                    revision: str | None = None, **kwargs: Any) -> _Loaded:
    """``load`` (a ``from_pretrained``) on a hub id or a local directory, with the ranker's one-line errors."""
    name, is_local = resolve_model(model, context.config_dir, where=f"ranker {ranker!r}: {key}")
    if is_local and revision is not None:
        raise PluginError(f"ranker {ranker!r}: revision {revision!r} is for hub ids, but {key} {model!r} is a "
                          "local directory")
    return from_hub_or_cache(load, name, is_local, dict(kwargs, revision=revision), owner=f"ranker {ranker!r}")


def load_tokenizer(ranker: str, source: str, context: BuildContext, revision: str | None) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase = load_pretrained(ranker, "processor", AutoTokenizer.from_pretrained,
                                                         source, context, revision)
    return tokenizer


def check_tokenizer(ranker: str, tokenizer: PreTrainedTokenizerBase, text_config: Any, source: str) -> None:
    """The tokenizer must fit the text tower: ids inside its vocabulary, prompts ended by the token it pools."""
    size, limit = len(tokenizer), int(text_config.vocab_size)
    if size > limit or size < 258:
        raise PluginError(f"ranker {ranker!r}: the tokenizer of {source!r} has {size} tokens but the text encoder "
                          f"takes up to {limit} (a wrong processor, or missing tokenizer files?)")
    pooled = text_config.eos_token_id
    # eos_token_id 2 is transformers' legacy marker for "pool at the largest id" (open_clip's argmax)
    if pooled != 2 and tokenizer.eos_token_id != pooled:
        raise PluginError(f"ranker {ranker!r}: the tokenizer of {source!r} ends prompts with token "
                          f"{tokenizer.eos_token_id}, but the text encoder pools at token {pooled}")


# ----------------------------------------------------------------------------------- image paths


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre crop and normalise, as numbers: what both image paths apply."""

    #: shortest edge to resize to (aspect kept), or (height, width)
    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    #: how the crop's offset rounds: "floor" (transformers) or "half-even" (torchvision's ``round``)
    crop_offset: Literal["floor", "half-even"] = "floor"

    @classmethod
    def of_processor(cls, processor: Any, ranker: str) -> Preprocessing:
        """The numbers of a transformers CLIP image processor."""
        size, crop = processor.size, processor.crop_size
        resize: int | tuple[int, int] | None = None
        if processor.do_resize:
            if size.shortest_edge and not size.longest_edge:
                resize = int(size.shortest_edge)
            elif size.height and size.width:
                resize = (int(size.height), int(size.width))
            else:
                raise PluginError(f"ranker {ranker!r}: image processor size {dict(size)} is not supported")
        modes: dict[int, Literal["bicubic", "bilinear"]] = {3: "bicubic", 2: "bilinear"}
        interpolation = modes.get(int(processor.resample))
        if interpolation is None:
            raise PluginError(f"ranker {ranker!r}: image processor resample {processor.resample!r} is not "
                              "bicubic or bilinear")
        scale = float(processor.rescale_factor) * 255 if processor.do_rescale else 1.0
        if not math.isclose(scale, 1.0, rel_tol=1e-6):
            raise PluginError(f"ranker {ranker!r}: image processor rescale_factor {processor.rescale_factor} is "
                              "not 1/255")
        mean, std = (tuple(processor.image_mean), tuple(processor.image_std)) if processor.do_normalize else (
            (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        return cls(resize, (int(crop.height), int(crop.width)) if processor.do_center_crop else None,
                   _triple(mean), _triple(std), interpolation)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize: the shortest edge set, the longest truncated (as torchvision
        and transformers both compute it)."""
        if self.resize is None:
            return height, width
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = min(height, width), max(height, width)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if height <= width else (new_long, self.resize)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the centre crop."""
        if self.crop is None:
            return 0, 0, height, width
        ch, cw = self.crop
        if ch > height or cw > width:
            raise ComponentError(f"a {height}x{width} image is smaller than the {ch}x{cw} crop after resizing")
        if self.crop_offset == "floor":
            return (height - ch) // 2, (width - cw) // 2, ch, cw
        return int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0)), ch, cw

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """The differentiable path: float images in [0, 1] to normalised model input (float32)."""
        x = images.float()
        height, width = self.output_size(*x.shape[-2:])
        if (height, width) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(height, width), mode=self.interpolation, antialias=True,
                              align_corners=False).clamp(0, 1)
        top, left, ch, cw = self.crop_box(height, width)
        x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)[:, None, None]
        return (x - mean) / std


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) != 3:
        raise PluginError(f"image mean/std must have 3 values, got {list(values)}")
    return float(values[0]), float(values[1]), float(values[2])


class ProcessorImages:
    """The ranking path of a transformers image processor: 8-bit pictures through the processor itself."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels: torch.Tensor = self.processor(images=to_pictures(images), return_tensors="pt")["pixel_values"]
        return pixels


class OpenClipImages:
    """open_clip's ``preprocess_val`` (``Resize(n, bicubic)``, ``CenterCrop(n)``, ``ToTensor``,
    ``Normalize``) on 8-bit pictures, in PIL and numpy: torchvision's output size and crop offset, PIL's
    resampling, without torchvision."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        p, out = self.preprocessing, []
        resample = Image.Resampling.BICUBIC if p.interpolation == "bicubic" else Image.Resampling.BILINEAR
        mean, std = np.array(p.mean, np.float32)[:, None, None], np.array(p.std, np.float32)[:, None, None]
        for picture in to_pictures(images):
            height, width = p.output_size(picture.height, picture.width)
            if (height, width) != (picture.height, picture.width):
                picture = picture.resize((width, height), resample)
            top, left, ch, cw = p.crop_box(height, width)
            picture = picture.crop((left, top, left + cw, top + ch))
            array = np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
            out.append(torch.from_numpy((array - mean) / std))
        return torch.stack(out)


# ---------------------------------------------------------------------------------------- rankers


def pooled(output: Any) -> torch.Tensor:
    """The projected embedding of ``get_image_features``/``get_text_features``: a tensor up to transformers
    4.x, a ``BaseModelOutputWithPooling`` holding it as ``pooler_output`` from 5.0."""
    if isinstance(output, torch.Tensor):
        return output
    embedding = getattr(output, "pooler_output", None)
    if not isinstance(embedding, torch.Tensor):
        raise TypeError(f"expected a tensor or an output with pooler_output, got {type(output).__name__}")
    return embedding


class ClipFamilyRanker(ModelRanker):
    """A ranker on a frozen CLIP-style model: subclasses compute float32 scores from model input.

    ``images``: the ranking path (float images in [0, 1] to model input on the CPU); ``preprocessing``: the
    numbers the differentiable path applies with tensor operations.
    """

    #: ``score_differentiable`` back-propagates to the images (for DRaFT-style baselines)
    differentiable: ClassVar[bool] = True

    def __init__(self, name: str, *, images: Callable[[torch.Tensor], torch.Tensor], preprocessing: Preprocessing,
                 device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.name = name
        self.score_range = SCORE_RANGES.get(name)
        self.uses_prompt = name not in PROMPT_FREE
        self.images = images
        self.preprocessing = preprocessing
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size

    # -- what subclasses implement

    def scores_of_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) float32 scores of model input ``pixel_values`` (on the device, in the model's dtype)."""
        raise NotImplementedError

    # -- the Ranker API

    def score_chunk(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scores_of_pixels(self.images(images).to(self.device, self.dtype), prompts)

    def score_differentiable(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) float32 scores through tensor resizing and normalisation, differentiable with respect to
        ``images`` when grad is enabled; on the ranker's device. Not validated beyond shapes: a gradient
        baseline checks its own loss."""
        self.check_inputs(images, prompts)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            pixels = self.preprocessing.tensor(chunk).to(self.dtype)
            with self.own_precision():
                out.append(self.scores_of_pixels(pixels, prompts[start:start + self.batch_size]).float())
        return torch.cat(out)


class TextEmbeddings:
    """Normalised float32 text embeddings of a CLIP text tower, each distinct prompt computed once;
    ``clean`` rewrites prompts before the tokenizer sees them (open_clip's cleaning, for HPSv2)."""

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 clean: Callable[[str], str] | None = None) -> None:
        self.model, self.tokenizer, self.device, self.clean = model, tokenizer, device, clean
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            texts = [self.clean(p) for p in missing] if self.clean else missing
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt")
            with torch.no_grad():
                embeds = pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                             attention_mask=tokens["attention_mask"].to(self.device)))
            for prompt, embed in zip(missing, F.normalize(embeds.float(), dim=-1), strict=True):
                self._cache[prompt] = embed
        stacked = torch.stack([self._cache[p] for p in prompts])
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        while len(self._cache) > TEXT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return stacked


def freeze(model: _Module, device: torch.device, dtype: torch.dtype) -> _Module:
    """``model`` without grad, in eval mode, on ``device`` in ``dtype``."""
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()
