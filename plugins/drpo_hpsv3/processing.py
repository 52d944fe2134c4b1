"""HPSv3's inputs, built without ``Qwen2VLProcessor`` (whose video half needs torchvision).

**Images** take the two steps upstream applies to an image file:

1. ``hpsv3.dataset.utils.fetch_image`` (qwen-vl-utils): the 8-bit RGB picture resized with PIL's bicubic
   filter to :func:`smart_resize` of its size, with ``min_pixels = max_pixels = 256 * 28 * 28`` (about
   448 x 448, kept aspect);
2. ``Qwen2VLImageProcessor``: its own ``smart_resize`` (a no-op: the size is already a multiple of 28 within
   its limits), values / 255, OpenAI CLIP mean and std, then patches: the picture repeated along time to the
   temporal patch (2), cut into 14 x 14 patches ordered by 2 x 2 merge window, each flattened as
   (channel, time, row, column) into ``3 * 2 * 14 * 14 = 1176`` values; ``image_grid_thw = (1, H/14, W/14)``.

**Text** is Qwen2-VL-Instruct's chat format of one user turn (the image, then HPSv3's instruction with the
prompt, then ``<|Reward|>``), with the generation prompt, as ``processor.apply_chat_template`` writes it; the
``<|image_pad|>`` placeholder becomes one token per merged patch (``t * h * w / 4``). Batches are padded on
the right, as upstream's processor pads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from drpo_core.errors import ComponentError

if TYPE_CHECKING:
    from PIL import Image

#: OpenAI CLIP's normalisation (Qwen2-VL's image processor uses it)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: qwen-vl-utils refuses more elongated images
MAX_ASPECT_RATIO = 200
REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"

# The instruction HPSv3 was trained and is run with (hpsv3 1.0.0, ``hpsv3/dataset/data_collator_qwen.py``,
# MIT licence), verbatim: the model reads these exact tokens.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""  # noqa: W291  (the trailing spaces are part of what the model saw)
RATING_REQUEST = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
#: Qwen2-VL-Instruct's chat template, rendered for [system default, user turn] plus the generation prompt
CHAT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' (and Qwen2-VL's) target size: each side a multiple of ``factor`` (rounded), the area
    within [min_pixels, max_pixels] (scaled down with floor, up with ceil), aspect kept as nearly as possible."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ComponentError(f"ranker 'hpsv3' takes images with an aspect ratio up to {MAX_ASPECT_RATIO}, got "
                             f"{height}x{width}")
    new_height = max(factor, round(height / factor) * factor)
    new_width = max(factor, round(width / factor) * factor)
    if new_height * new_width > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_height = math.floor(height / beta / factor) * factor
        new_width = math.floor(width / beta / factor) * factor
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


@dataclass(frozen=True)
class ImagePatching:
    """Qwen2-VL's patching numbers (the vision tower's) and HPSv3's image area."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 256 * 28 * 28

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, picture: Image.Image) -> Image.Image:
        """Step 1: ``fetch_image``'s PIL bicubic resize to :func:`smart_resize`."""
        from PIL import Image

        height, width = smart_resize(picture.height, picture.width, self.factor, self.min_pixels, self.max_pixels)
        return picture.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)

    def patches(self, picture: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Step 2 on a picture already resized: ``(patches (t*h*w, C*T*P*P), (t, h, w))``, float32."""
        array = np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1)
        # as the image processor: rescale in float64 then float32, normalise in float32
        scaled = (array * (1 / 255)).astype(np.float32)
        mean = np.array(CLIP_MEAN, dtype=np.float32)[:, None, None]
        std = np.array(CLIP_STD, dtype=np.float32)[:, None, None]
        return self.patchify(torch.from_numpy((scaled - mean) / std))

    def patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A normalised (C, H, W) image (H, W multiples of patch * merge) as Qwen2-VL patch rows."""
        channels, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        if height % (p * m) or width % (p * m):
            raise ComponentError(f"ranker 'hpsv3': a {height}x{width} image is not a multiple of {p * m}")
        grid_h, grid_w = height // p, width // p
        frames = image.unsqueeze(0).expand(t, -1, -1, -1)  # one picture repeated to a temporal patch
        x = frames.reshape(1, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        # (time blocks, merge rows, merge cols, rows in window, cols in window, channel, time, y, x)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return x.reshape(grid_h * grid_w, channels * t * p * p).contiguous(), (1, grid_h, grid_w)

    def pixel_values(self, pictures: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pixel_values, image_grid_thw)`` of a batch of pictures, both steps."""
        rows, grids = zip(*(self.patches(self.resized(p)) for p in pictures), strict=True)
        return torch.cat(rows), torch.tensor(grids, dtype=torch.long)

    def tensor_pixel_values(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The differentiable path, for float images ``(B, 3, H, W)`` in [0, 1]: what upstream's
        ``differentiable=True`` inferencer does to tensors (torchvision's antialiased bicubic resize, i.e.
        ``F.interpolate(bicubic, antialias=True)``, no 8-bit rounding, no clamp), then normalise and patch.
        Gradients flow to ``images``."""
        import torch.nn.functional as F

        height, width = smart_resize(images.shape[-2], images.shape[-1], self.factor, self.min_pixels,
                                     self.max_pixels)
        x = images.float()
        if (height, width) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
        rows, grids = zip(*(self.patchify((image - mean) / std) for image in x), strict=True)
        return torch.cat(rows), torch.tensor(grids, dtype=torch.long)


def prompt_text(prompt: str, image_tokens: int) -> str:
    """The chat text of one (image, prompt), the image placeholder already expanded."""
    vision = "<|vision_start|>" + IMAGE_TOKEN * image_tokens + "<|vision_end|>"
    return CHAT_PREFIX + vision + INSTRUCTION.format(text_prompt=prompt) + RATING_REQUEST + CHAT_SUFFIX
