"""Make the ImageReward parity test data with the original package's model classes (run by hand, never by CI).

``ImageReward.load`` cannot build a tiny model: it hard-codes a ViT-L/16 (``BLIP_Pretrain(vit='large')``), a
768-wide reward head and downloads ``bert-base-uncased`` for the tokenizer. So this script builds the
upstream classes themselves, from the ``image-reward`` 1.5 package's source files, at a tiny size:

* ``ImageReward.ImageReward`` (the reward model: BLIP plus the MLP head, ``score``, ``inference_rank``,
  ``score_gard``) and ``models/BLIP/{blip_pretrain,blip,med,vit}.py`` run unchanged;
* ``blip_pretrain.create_vit`` is replaced by one that returns the upstream ``VisionTransformer`` with tiny
  sizes (the original only offers ViT-B and ViT-L), ``blip_pretrain.init_tokenizer`` by the upstream steps
  (``BertTokenizer``, ``[DEC]`` as bos, ``[ENC]`` as additional special token) on a local vocabulary
  instead of the hub's ``bert-base-uncased``, and the ``MLP(768)`` the model builds by the upstream ``MLP`` of
  the tiny text width;
* the package's ``__init__`` is not run (it imports ``ReFL``, ``datasets``, ``diffusers`` and ``clip``, for
  training and other scores): its modules are loaded from its folder directly.

Weights are drawn at random (seeded) with spreads large enough that every image and every prompt moves the
score, and rounded to float16 values so the checkpoint is stored in float16 at half the size with no loss
(the real ``ImageReward.pt`` holds float32; the ranker loads either). The model then reloads the file the way
``ImageReward.load`` does (``torch.load``, ``load_state_dict(strict=False)``) before scoring.

Environment (outside the repository; image-reward pins ``timm==0.6.13`` and needs ``transformers<=4.55``,
which cannot sit beside the project's stack)::

    python3 -m venv "$TMPDIR/ir"
    "$TMPDIR/ir/bin/pip" install torch==2.13.0 torchvision==0.28.0 "transformers==4.46.3" "timm==0.6.13" \\
        "fairscale==0.4.13" "tokenizers<0.21" "huggingface-hub<1" pillow numpy safetensors
    "$TMPDIR/ir/bin/pip" install --no-deps image-reward==1.5
    "$TMPDIR/ir/bin/python" tests/data/imagereward/make_golden.py

(made with image-reward 1.5, torch 2.13.0+cpu, torchvision 0.28.0, transformers 4.46.3, timm 0.6.13,
fairscale 0.4.13; it rewrites every file byte for byte). Where the only torchvision wheel at hand is a CUDA
build beside a CPU torch, its C operators cannot load and ``import torchvision`` fails registering them; the
script then skips those registrations (the transforms ImageReward uses are Python and PIL).

It writes, beside itself: ``ImageReward.pt`` and ``med_config.json`` (the hub layout of THUDM/ImageReward),
``vocab.txt`` (the tiny WordPiece vocabulary), ``images/*.png`` (the inputs), ``golden.json`` (prompts,
upstream token ids with the tiny and with the real bert-base-uncased vocabulary, upstream scores) and
``golden_tensors.safetensors`` (upstream preprocessed pixels and the text features the head reads), and
``imagereward_v1_shapes.json``: every entry of the full-size model's state dict (ViT-L/16, BERT-base, built
on the meta device, no weights) with its shape, so the conversion of the real checkpoint's layout is checked
too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
FULL_VOCAB = REPO / "plugins" / "drpo_imagereward" / "bert-base-uncased-vocab.txt"
SEED = 21
#: the tiny upstream VisionTransformer (ViT-L/16 at 224 is width 1024, 24 blocks, 16 heads)
VISION = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 2}
#: ImageReward's med_config.json (BERT-base with cross-attention) with the sizes shrunk
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": None,
    "encoder_width": 768, "add_cross_attention": True,
}
#: (width, height): the batch (same size, a downscale whose crop offset rounds half to even: 38 - 32 = 6 -> 3)
#: and single images: already at size, a crop offset of 5.5 (torchvision rounds to 6), a tall one
BATCH_SIZE = (48, 40)
SINGLE_SIZES = [(32, 32), (43, 32), (40, 72)]
PROMPTS = [
    "a photo of a cat",
    "Two dogs, playing; in THE snow!",
    "café au lait in a red cup",
    "a very long prompt about a red cat and a blue dog that goes on and on, past the thirty five tokens "
    "that the image reward text encoder reads, so the tokenizer has to cut it short at last",
]
#: the batch's prompts: mixed lengths, so the padded batch holds rows of 7 to 35 real tokens
BATCH_PROMPTS = [PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[2]]
SINGLE_PROMPTS = [PROMPTS[1], PROMPTS[0], PROMPTS[3]]
#: the tiny vocabulary: BERT's special tokens, single characters and their ## pieces, some whole words
WORDS = ("a the of photo cat dog dogs two red blue cup in on and that past so at last long prompt about "
         "goes image text reads has to cut it short snow playing cafe au very thirty five reward")


def tolerate_cpu_torchvision() -> None:
    """A CUDA torchvision wheel beside a CPU torch cannot load its C operators; skip registering their fake
    kernels so ``import torchvision`` works (its PIL transforms do not need them)."""
    register = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda function: function
        return register(op, *args, **kwargs)

    torch.library.register_fake = tolerant


#: ImageReward's own med_config.json (THUDM/ImageReward, BLIP's BERT-base with cross-attention), for the
#: full-size layout
REAL_MED_CONFIG = dict(MED_CONFIG, hidden_size=768, intermediate_size=3072, max_position_embeddings=512,
                       num_attention_heads=12, num_hidden_layers=12, vocab_size=30524)


def upstream_modules(tokenizer_vocab: Path) -> types.SimpleNamespace:
    """The image-reward package's reward model and BLIP modules, loaded from its folder without its
    ``__init__`` (training and other scores), with the tiny ViT and the local vocabulary patched in."""
    spec = importlib.util.find_spec("ImageReward")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps image-reward==1.5"
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    import ImageReward.models.BLIP.vit as vit
    from ImageReward import ImageReward as reward_module

    def tiny_vit(vit_name, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        return vit.VisionTransformer(**VISION, drop_path_rate=drop_path_rate), VISION["embed_dim"]

    real = types.SimpleNamespace(create_vit=blip_pretrain.create_vit, MLP=reward_module.MLP,
                                 init_tokenizer=lambda: upstream_tokenizer(FULL_VOCAB))
    blip_pretrain.create_vit = tiny_vit
    blip_pretrain.init_tokenizer = lambda: upstream_tokenizer(tokenizer_vocab)
    upstream_mlp = reward_module.MLP
    reward_module.MLP = lambda input_size: upstream_mlp(MED_CONFIG["hidden_size"])
    return types.SimpleNamespace(ImageReward=reward_module.ImageReward, transform=reward_module._transform,
                                 patched=(blip_pretrain, reward_module), real=real)


def write_full_size_shapes(upstream: types.SimpleNamespace) -> None:
    """Every entry of the real ImageReward v1.0 state dict with its shape: the upstream model at its true size
    (ViT-L/16 at 224, BERT-base, the 768-wide head), built on the meta device (no weights)."""
    blip_pretrain, reward_module = upstream.patched
    patched = blip_pretrain.create_vit, blip_pretrain.init_tokenizer, reward_module.MLP
    blip_pretrain.create_vit, blip_pretrain.init_tokenizer = upstream.real.create_vit, upstream.real.init_tokenizer
    reward_module.MLP = upstream.real.MLP
    linspace = torch.linspace  # the ViT reads its drop-path rates with .item(), which meta tensors refuse
    torch.linspace = lambda *args, **kwargs: linspace(*args, **dict(kwargs, device="cpu"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "med_config.json").write_text(json.dumps(REAL_MED_CONFIG))
            with torch.device("meta"):
                model = upstream.ImageReward(med_config=str(Path(tmp) / "med_config.json"), device="cpu")
    finally:
        blip_pretrain.create_vit, blip_pretrain.init_tokenizer, reward_module.MLP = patched
        torch.linspace = linspace
    lines = [f"  {json.dumps(key)}: {list(value.shape)}" for key, value in model.state_dict().items()]
    head = json.dumps({"image-reward": "1.5", "med_config": REAL_MED_CONFIG})
    (HERE / "imagereward_v1_shapes.json").write_text(head[:-1] + ', "shapes": {\n' + ",\n".join(lines) + "\n}}\n")


def upstream_tokenizer(vocab: Path):
    """``blip.init_tokenizer`` on a local vocabulary (upstream: ``BertTokenizer.from_pretrained('bert-base-uncased')``,
    a hub download): the same added tokens in the same order."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab_file=str(vocab))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def write_tiny_vocab(path: Path) -> int:
    full = FULL_VOCAB.read_text(encoding="utf-8").split("\n")[:-1]
    pieces = sorted({c for c in "abcdefghijklmnopqrstuvwxyz0123456789"} | set(",.;!'-"))
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *(f"##{c}" for c in pieces if c.isalnum()),
              *dict.fromkeys(w for w in WORDS.split() if w not in pieces)]
    assert all(t in full for t in tokens)
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return len(tokens)


def image(width: int, height: int, rng: np.random.Generator):
    """Smooth gradients, a disc and some noise: content at every scale, so resizing and cropping matter."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    red = 0.5 + 0.5 * np.sin(6 * x + rng.uniform(0, 3))
    green = 0.5 + 0.5 * np.cos(5 * y + rng.uniform(0, 3))
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    blue = ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(float)
    pixels = np.stack([red, green, blue], -1) + 0.1 * rng.standard_normal((height, width, 3))
    return Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8))


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights with O(1) activations everywhere (not the 0.02 initialisation, under which the image barely
    reaches the score), rounded to float16 values."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "LayerNorm" in name or "norm" in name.rsplit(".", 2)[-2]:
                value = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise
            elif parameter.dim() == 1:
                value = 0.1 * noise
            elif "embed" in name or "cls_token" in name:
                value = noise
            else:
                value = noise / float(np.sqrt(parameter[0].numel()))
            parameter.copy_(value.half().float())


def main() -> None:
    tolerate_cpu_torchvision()
    import torchvision  # noqa: F401  (before timm, which imports it)
    import transformers
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(SEED)
    vocab_size = write_tiny_vocab(HERE / "vocab.txt")
    med = dict(MED_CONFIG, vocab_size=vocab_size + 2)  # + [DEC] and [ENC]
    (HERE / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
    upstream = upstream_modules(HERE / "vocab.txt")
    write_full_size_shapes(upstream)

    model = upstream.ImageReward(med_config=str(HERE / "med_config.json"), device="cpu")
    randomise(model, torch.Generator().manual_seed(SEED))
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    state.update({k: v for k, v in model.state_dict().items() if not v.is_floating_point()})  # position_ids
    torch.save(state, HERE / "ImageReward.pt")

    # a fresh model, loaded as ImageReward.load does, with the tiny image size its preprocessing uses
    model = upstream.ImageReward(med_config=str(HERE / "med_config.json"), device="cpu")
    missing, _ = model.load_state_dict(torch.load(HERE / "ImageReward.pt", map_location="cpu"), strict=False)
    assert not missing, missing
    model.eval()
    model.preprocess = upstream.transform(VISION["img_size"])
    tokenizer = model.blip.tokenizer
    assert len(tokenizer) == med["vocab_size"]

    rng = np.random.default_rng(SEED)
    (HERE / "images").mkdir(exist_ok=True)
    batch_names = [f"images/batch_{i}_{BATCH_SIZE[0]}x{BATCH_SIZE[1]}.png" for i in range(len(BATCH_PROMPTS))]
    single_names = [f"images/single_{i}_{w}x{h}.png" for i, (w, h) in enumerate(SINGLE_SIZES)]
    sizes = [BATCH_SIZE] * len(batch_names) + SINGLE_SIZES
    for name, (width, height) in zip(batch_names + single_names, sizes, strict=True):
        image(width, height, rng).save(HERE / name)
    batch = [Image.open(HERE / n).convert("RGB") for n in batch_names]
    single = [Image.open(HERE / n).convert("RGB") for n in single_names]

    with torch.no_grad():
        # the public API, one image at a time (ImageReward.score with a picture)
        batch_one_by_one = [model.score(p, im) for p, im in zip(BATCH_PROMPTS, batch, strict=True)]
        single_scores = [model.score(p, im) for p, im in zip(SINGLE_PROMPTS, single, strict=True)]
        # inference_rank: one prompt, several pictures
        ranking, rank_rewards = model.inference_rank(PROMPTS[1], batch)
        # the batched path (score_gard): a padded batch of mixed-length prompts and their images
        text = tokenizer(BATCH_PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = torch.stack([model.preprocess(im) for im in batch])
        batched = model.score_gard(text.input_ids, text.attention_mask, pixels).flatten()
        image_embeds = model.blip.visual_encoder(pixels)
        features = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                           encoder_hidden_states=image_embeds, return_dict=True
                                           ).last_hidden_state[:, 0]
    full_tokenizer = upstream_tokenizer(FULL_VOCAB)
    full_ids = full_tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35)["input_ids"]

    save_file({"batch_pixel_values": pixels.contiguous(), "batch_text_features": features.contiguous(),
               "single_pixel_values": torch.stack([model.preprocess(im) for im in single]).contiguous()},
              str(HERE / "golden_tensors.safetensors"))
    golden = {
        "made_by": "tests/data/imagereward/make_golden.py",
        "versions": {"image-reward": "1.5", "torch": torch.__version__, "transformers": transformers.__version__,
                     "timm": __import__("timm").__version__},
        "vision": VISION,
        "mean_std": [model.mean, model.std],
        "batch": {"images": batch_names, "prompts": BATCH_PROMPTS, "input_ids": text.input_ids.tolist(),
                  "attention_mask": text.attention_mask.tolist(), "scores": batched.tolist(),
                  "scores_one_by_one": batch_one_by_one},
        "single": {"images": single_names, "prompts": SINGLE_PROMPTS, "scores": single_scores},
        "inference_rank": {"prompt": PROMPTS[1], "images": batch_names, "ranking": ranking,
                           "rewards": rank_rewards},
        "bert_base_uncased": {"prompts": PROMPTS, "input_ids": full_ids, "vocab_size": len(full_tokenizer),
                              "enc_token_id": full_tokenizer.enc_token_id,
                              "bos_token_id": full_tokenizer.bos_token_id},
    }
    (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(json.dumps({k: golden[k] for k in ("batch", "single", "inference_rank")}, indent=1))


if __name__ == "__main__":
    main()
