"""``hpsv2`` / ``hpsv2.1``: Human Preference Score v2 and v2.1 (open_clip ViT-H-14 fine-tuned on HPD).

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` of ``xswu/HPSv2``: assets ``hpsv2``
and ``hpsv2.1``) is an open_clip state dict; :mod:`drpo_clip_rankers.convert` turns it into a transformers
``CLIPModel`` when the ranker loads, so no open_clip (and no torchvision) is needed. Scores are what
``hpsv2.score`` returns: the cosine of the normalised image and prompt embeddings, no logit scale (the
paper's tables print it x100; typical values 0.2-0.35).

Images go through open_clip's ``preprocess_val`` (resize the shortest edge to 224, bicubic, centre crop
with torchvision's rounding, OpenAI CLIP mean and std), reproduced without torchvision. Prompts go through
a transformers CLIP tokenizer (``tokenizer``, default that of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
the BPE vocabulary open_clip ships) after open_clip's own text cleaning (:func:`open_clip_clean`: ftfy,
HTML entities), so curly quotes, ligatures or ``&amp;`` tokenise as HPSv2 saw them.

``backend: open_clip`` (extra ``openclip``) runs open_clip itself instead, for comparison; it needs
torchvision, which must match the installed torch.
"""

from __future__ import annotations

import html
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from drpo_clip_rankers.common import (
    OPENAI_MEAN,
    OPENAI_STD,
    OpenClipImages,
    Preprocessing,
    check_tokenizer,
    load_tokenizer,
)
from drpo_clip_rankers.convert import OpenClipArchitecture, to_transformers
from drpo_clip_rankers.options import HPS_ASSETS
from drpo_clip_rankers.similarity import SimilarityRanker
from drpo_core import assets
from drpo_core.config import resolve_path
from drpo_core.errors import AssetError, PluginError
from drpo_core.model_rankers import pick_device, pick_dtype

if TYPE_CHECKING:
    from drpo_clip_rankers.options import HPSv2Options
    from drpo_core.context import BuildContext
    from drpo_core.interfaces import Ranker

#: ftfy's curly quotes (``ftfy.chardata.SINGLE_QUOTE_RE`` / ``DOUBLE_QUOTE_RE``), made straight
_QUOTES = {**dict.fromkeys(map(ord, "\u02bc\u2018\u2019\u201a\u201b"), "'"),
           **dict.fromkeys(map(ord, "\u201c\u201d\u201e\u201f"), '"')}
#: ftfy's Latin ligatures and character widths (``ftfy.chardata``), for when ftfy is not installed
_LIGATURES = {ord(k): v for k, v in {"Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ",
                                     "ǅ": "Dž", "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj",
                                     "ǌ": "nj", "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt",
                                     "ﬆ": "st"}.items()}
_WIDTHS = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                           if unicodedata.normalize("NFKC", chr(i)) != chr(i)}}


def open_clip_clean(text: str) -> str:
    """open_clip's tokenizer cleaning (``basic_clean`` and ``whitespace_clean``): ``ftfy.fix_text``, HTML
    entities unescaped twice, whitespace runs made one space. Without ftfy installed, the parts of
    ``fix_text`` prompts meet (curly quotes, Latin ligatures, full-width forms, NFC) stand in for it; its
    mojibake repair does not."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        text = unicodedata.normalize("NFC", text.translate(_LIGATURES).translate(_WIDTHS).translate(_QUOTES))
    text = html.unescape(html.unescape(text))
    return " ".join(text.split())


def read_state_dict(path: Path, ranker: str) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint: ``.safetensors``, or a torch file (``weights_only``) holding the state dict
    itself or under ``state_dict`` (HPSv2's layout)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = assets.load_checkpoint(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PluginError(f"ranker {ranker!r}: {path} does not hold an open_clip state dict of tensors")
    return dict(state)


def checkpoint_path(name: str, options: HPSv2Options, context: BuildContext) -> Path:
    if options.checkpoint is None:
        asset = assets.Asset(name=name, **HPS_ASSETS[name])
        return assets.path(asset, alternative="set the ranker's checkpoint to a local copy")
    path = resolve_path(options.checkpoint, context.config_dir)
    if not path.is_file():
        raise AssetError(f"ranker {name!r}: checkpoint {options.checkpoint!r} does not exist (default: the asset "
                         f"{name}, `drpo assets fetch {name}`)")
    return path


def build(name: str, options: HPSv2Options, context: BuildContext) -> Ranker:
    device = pick_device(options.device, context)
    dtype = pick_dtype(options.dtype, device, context)
    path = checkpoint_path(name, options, context)
    state = read_state_dict(path, name)
    if options.backend == "open_clip":
        from drpo_clip_rankers.openclip_backend import build_open_clip

        return build_open_clip(name, options, state, device, dtype, options.open_clip_model)
    architecture = OpenClipArchitecture(options.vision_head_width, options.text_head_width, options.quick_gelu)
    try:
        model = to_transformers(state, architecture, dtype)
    except PluginError as error:
        raise PluginError(f"ranker {name!r}: {path}: {error}") from None
    del state
    tokenizer = load_tokenizer(name, options.tokenizer, context, options.tokenizer_revision)
    check_tokenizer(name, tokenizer, model.config.text_config, options.tokenizer)
    size = int(model.vision_model.embeddings.image_size)
    preprocessing = Preprocessing(size, (size, size), OPENAI_MEAN, OPENAI_STD, crop_offset="half-even")
    return SimilarityRanker(name, model, tokenizer, images=OpenClipImages(preprocessing),
                            preprocessing=preprocessing, device=device, dtype=dtype, batch_size=options.batch_size,
                            clean_text=open_clip_clean)
