"""Make the HPSv2 conversion test data with the real open_clip (run by hand, never by CI).

A tiny model with ViT-H-14's architecture flags (pre-norm ViT with a class token and ln_pre, GELU not
QuickGELU, no layer scale, an argmax-pooled causal text tower, bias-free ``visual.proj`` and
``text_projection`` parameters, text width equal to the embedding width as in ViT-H-14) and only its
sizes shrunk, built and scored by open_clip the way ``hpsv2.score`` does (``create_model_and_transforms``'s
``preprocess_val``, ``encode_image``/``encode_text`` with ``normalize=True``, cosine, no logit scale). Its
weights are perturbed away from the initialisation, so biases and layer norms are not 0 and 1 and a
conversion that drops or swaps them shows.

open_clip needs torchvision, which must never sit beside the project's torch 2.13 CPU build
(ecosystem.md §1.2), so run this from the repository root in a throwaway environment outside it::

    python3 -m venv "$TMPDIR/oc"
    "$TMPDIR/oc/bin/pip" install torch==2.14.1 torchvision==0.29.1 open_clip_torch transformers safetensors
    "$TMPDIR/oc/bin/python" tests/data/hpsv2/make_golden.py

(made with open_clip 3.3.0, torch 2.14.1, transformers 5.24.0, Pillow 13.0.0; it rewrites every file
byte for byte).

It writes, beside itself: ``open_clip_tiny.safetensors`` (the open_clip state dict, as an HPS checkpoint
holds it), ``images/*.png`` (the inputs), ``golden.json`` (prompts, token ids, open_clip's scores) and
``golden_tensors.safetensors`` (open_clip's preprocessed pixels and normalised embeddings), and
``vit_h_14_shapes.json``: every tensor of the real ViT-H-14 state dict with its shape (built on the meta
device, no weights), so the conversion of the full-size layout is checked too. The prompts
are tokenised with the tiny CLIP vocabulary of ``drpo_diffusers.testing.write_clip_vocab`` (the tests
build the same one); open_clip sees the ids padded with zeros to its context length, as its own
tokenizer pads.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTokenizer

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SEED = 19
#: ViT-H-14's JSON config (open_clip/model_configs/ViT-H-14.json) with the sizes shrunk; every flag it
#: leaves at open_clip's defaults stays at them
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 40, "head_width": 20, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 516, "width": 32, "heads": 2, "layers": 2},
}
NAME = "tiny-ViT-H-14"
#: (width, height): square, already at size, a downscale, and crops whose offsets round differently in
#: torchvision (round half to even) and transformers (floor): 43 - 32 = 11 -> 6 vs 5
SIZES = [(32, 32), (64, 64), (48, 40), (40, 56), (43, 32)]
PROMPTS = [
    "a photo of the cat",
    "the red square",
    "Two dogs, playing; in THE snow!",
    "a very long prompt that goes on and on past the seventy-seven tokens a clip text tower can read at once",
]


def _tiny_tokenizer() -> CLIPTokenizer:
    spec = importlib.util.spec_from_file_location("_diffusers_testing", REPO / "plugins/drpo_diffusers/testing.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = module.write_clip_vocab(tmp)
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def _image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth gradients, a disc and some noise: content at every scale, so resizing matters."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    red = 0.5 + 0.5 * np.sin(6 * x + rng.uniform(0, 3))
    green = 0.5 + 0.5 * np.cos(5 * y + rng.uniform(0, 3))
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    blue = ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(float)
    pixels = np.stack([red, green, blue], -1) + 0.1 * rng.standard_normal((height, width, 3))
    return Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "logit_scale":
                continue
            spread = float(parameter.std()) if parameter.numel() > 1 and float(parameter.std()) > 0 else 0.1
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.3 * spread * noise)


def _write_vit_h_14_shapes() -> None:
    from open_clip.model import CLIP

    config = open_clip.get_model_config("ViT-H-14")
    with torch.device("meta"):
        model = CLIP(**config)
    lines = [f"  {json.dumps(key)}: {list(value.shape)}" for key, value in model.state_dict().items()]
    head = {"open_clip": open_clip.__version__, "open_clip_config": config}
    text = json.dumps(head)[:-1] + ', "shapes": {\n' + ",\n".join(lines) + "\n}}\n"
    (HERE / "vit_h_14_shapes.json").write_text(text)


def main() -> None:
    _write_vit_h_14_shapes()
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{NAME}.json").write_text(json.dumps(CONFIG))
        open_clip.add_model_config(tmp)
        model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=None, precision="fp32")
    model.eval()
    _perturb(model, torch.Generator().manual_seed(SEED))
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(HERE / "open_clip_tiny.safetensors"))

    rng = np.random.default_rng(SEED)
    (HERE / "images").mkdir(exist_ok=True)
    names, images = [], []
    for index, (width, height) in enumerate(SIZES):
        image = _image(width, height, rng)
        name = f"images/{index}_{width}x{height}.png"
        image.save(HERE / name)
        names.append(name)
        images.append(Image.open(HERE / name).convert("RGB"))  # what the tests read back

    tokenizer = _tiny_tokenizer()
    ids = tokenizer(PROMPTS, truncation=True, max_length=77)["input_ids"]
    context = CONFIG["text_cfg"]["context_length"]
    text = torch.zeros(len(ids), context, dtype=torch.long)  # open_clip pads with 0
    for row, tokens in enumerate(ids):
        text[row, :len(tokens)] = torch.tensor(tokens)

    with torch.no_grad():
        pixels = torch.stack([preprocess(image) for image in images])
        image_embeds = model.encode_image(pixels, normalize=True)
        text_embeds = model.encode_text(text, normalize=True)
        scores = image_embeds @ text_embeds.T  # hpsv2.score: the diagonal of this, per (image, prompt)

    save_file({"pixel_values": pixels.contiguous(), "image_embeds": image_embeds.contiguous(),
               "text_embeds": text_embeds.contiguous()}, str(HERE / "golden_tensors.safetensors"))
    golden = {
        "made_by": "tests/data/hpsv2/make_golden.py",
        "versions": {"open_clip": open_clip.__version__, "torch": torch.__version__},
        "open_clip_config": CONFIG,
        "images": names,
        "prompts": PROMPTS,
        "input_ids": ids,
        "preprocess": repr(preprocess),
        "scores": scores.tolist(),  # [image][prompt] cosine
    }
    (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(repr(preprocess))
    print("scores\n", scores)


if __name__ == "__main__":
    main()
