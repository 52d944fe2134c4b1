"""What CI cannot check beside torch 2.13 CPU: run by hand, never by CI, in make_golden.py's environment.

1. ``backend: open_clip`` (open_clip itself) and the default transformers backend, both on the golden images
   (with torchvision installed, where transformers would pick its torchvision image processors): each
   must give open_clip's golden scores, and their differentiable paths must agree.
2. Tokens: a transformers ``CLIPTokenizer`` built from open_clip's own BPE file, after
   ``open_clip_clean`` (with ftfy, and with its stand-in), must give open_clip's tokenizer's ids.

From the repository root, after make_golden.py's setup::

    "$TMPDIR/oc/bin/pip" install pydantic pluggy pyyaml typer rich
    "$TMPDIR/oc/bin/python" tests/data/hpsv2/check_by_hand.py

Last run (open_clip 3.3.0, torch 2.14.1, transformers 5.24.0): transformers 7.5e-8 and open_clip 4.5e-8
from the golden scores, differentiable paths equal; tokens 12 of 12 prompts, with ftfy and without.
"""

from __future__ import annotations

import builtins
import gzip
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2] / part) for part in (".", "plugins", "cli")]

from drpo_clip_rankers import _hps  # noqa: E402
from drpo_clip_rankers.hpsv2 import open_clip_clean  # noqa: E402
from drpo_clip_rankers.options import HPSv2Options  # noqa: E402
from drpo_core.context import BuildContext  # noqa: E402
from drpo_diffusers.testing import make_tiny_tokenizer  # noqa: E402

PROMPTS = ["A photo of a cat", "Two dogs, playing; in THE snow!", "an astronaut riding a horse on mars, 4k",
           "café crème brûlée", "salt &amp; pepper", "rock\u2019n\u2019roll \u201cquotes\u201d", "x" * 300,
           "  spaced\tout\nlines  ", "emoji \U0001f431 test", "\u00c5ngstr\u00f6m \ufb01 ligature",
           "\uff26\uff35\uff2c\uff2c\u3000\uff57\uff49\uff44\uff54\uff48", "e\u0301 combining"]


def check_backends() -> None:
    golden = json.loads((HERE / "golden.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny-ViT-H-14.json").write_text(json.dumps(golden["open_clip_config"]))
        open_clip.add_model_config(tmp)
        tokenizer = Path(tmp) / "tokenizer"
        make_tiny_tokenizer().save_pretrained(tokenizer)
        common = dict(checkpoint=str(HERE / "open_clip_tiny.safetensors"), tokenizer=str(tokenizer),
                      vision_head_width=20, text_head_width=16)
        ours = _hps("hpsv2")(HPSv2Options(**common), BuildContext())
        theirs = _hps("hpsv2")(HPSv2Options(**common, backend="open_clip", open_clip_model="tiny-ViT-H-14"),
                               BuildContext())
    ids = dict(zip(golden["prompts"], golden["input_ids"], strict=True))
    # open_clip's tokenizer has its 49408-token vocabulary; the tiny model reads the golden ids
    theirs.tokenizer = lambda prompts: torch.stack([torch.nn.functional.pad(torch.tensor(ids[p]), (0, 77 - len(ids[p])))
                                                    for p in prompts])
    worst = {"transformers": 0.0, "open_clip": 0.0, "differentiable paths": 0.0}
    for row, name in enumerate(golden["images"]):
        image = torch.from_numpy(np.array(Image.open(HERE / name).convert("RGB"))).permute(2, 0, 1).float() / 255
        images = image[None].expand(len(golden["prompts"]), -1, -1, -1)
        expected = torch.tensor(golden["scores"][row])
        for key, ranker in (("transformers", ours), ("open_clip", theirs)):
            scores = ranker.score(images, golden["prompts"], [None] * len(images))
            worst[key] = max(worst[key], float((scores - expected).abs().max()))
        difference = theirs.score_differentiable(images, golden["prompts"]) - ours.score_differentiable(
            images, golden["prompts"])
        worst["differentiable paths"] = max(worst["differentiable paths"], float(difference.abs().max()))
    print("largest differences from open_clip's golden scores:", worst)


def check_tokens() -> None:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        ours = CLIPTokenizer(str(Path(tmp, "vocab.json")), str(Path(tmp, "merges.txt")), model_max_length=77)
    theirs = open_clip.get_tokenizer("ViT-H-14")
    real_import = builtins.__import__

    def without_ftfy(name: str, *args: object, **kwargs: object) -> object:
        if name == "ftfy":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    for label in ("with ftfy", "without ftfy"):
        if label == "without ftfy":
            builtins.__import__ = without_ftfy
        same = 0
        for prompt in PROMPTS:
            expected = theirs([prompt])[0]
            expected = expected[: int((expected != 0).sum())].tolist()
            got = ours(open_clip_clean(prompt), truncation=True, max_length=77)["input_ids"]
            same += got == expected
            if got != expected:
                print(f"  {prompt!r}: {got[:12]} != {expected[:12]}")
        print(f"tokens {label}: {same} of {len(PROMPTS)} prompts as open_clip's")
    builtins.__import__ = real_import


if __name__ == "__main__":
    print(f"open_clip {open_clip.__version__}, torch {torch.__version__}")
    check_backends()
    check_tokens()
