"""THUDM's ImageReward at a tiny size, served by the reference server from the package's own venv.

The real ``image-reward`` package, its own classes and preprocessing, with random weights and small widths
(no download): its BLIP ViT-L/16 becomes a 2-layer, 32-wide ViT, its BERT text encoder one layer (the
reward head keeps its 768 inputs), its ``bert-base-uncased`` tokenizer a local word list. ``nox -s
image_reward_server`` installs image-reward's old stack in its own venv and runs this file, which serves
``tiny_image_reward:scorer`` with serve.py and checks the answers over HTTP (count, ids, finite, equal to
the model called in process, 401 without the token). Needs no drpo.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "red", "blue",
         "square", "two", "apples", "on", "table"]


def _tiny_parts(folder: Path) -> Path:
    """Patch ImageReward's ViT and tokenizer builders to tiny local ones; returns the tiny med_config."""
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")

    def tiny_vit(vit, image_size, *args, **kwargs):
        return VisionTransformer(img_size=image_size, patch_size=16, embed_dim=32, depth=2, num_heads=4), 32

    def local_tokenizer():  # init_tokenizer's steps on a local vocabulary instead of bert-base-uncased
        tokenizer = BertTokenizer(vocab_file=str(vocab))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    blip_pretrain.create_vit, blip_pretrain.init_tokenizer = tiny_vit, local_tokenizer
    config = folder / "med_config.json"
    config.write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768, "num_hidden_layers": 1,
        "num_attention_heads": 12, "intermediate_size": 64, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 64, "type_vocab_size": 2,
        "vocab_size": len(WORDS) + 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "add_cross_attention": True, "encoder_width": 32,
    }))
    return config


def scorer(model=None, device="cpu"):
    """serve.py's scorer factory: a tiny ImageReward with seed-0 random weights."""
    import importlib

    import torch

    reward_class = importlib.import_module("ImageReward.ImageReward").ImageReward  # the package's own class

    folder = Path(tempfile.mkdtemp(prefix="tiny-image-reward-"))
    torch.manual_seed(0)
    reward = reward_class(med_config=str(_tiny_parts(folder)), device=device)
    # the head's own init (std 1/769 through five layers) makes every reward -mean/std to 1e-10: widen it so
    # the tiny rewards tell images apart
    for layer in reward.mlp.modules():
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
    reward = reward.to(device).eval()

    def score(images, prompts, metadata):
        with torch.no_grad():
            return [float(reward.score(prompt, image.to_pil())) for image, prompt in zip(images, prompts, strict=True)]
    return score


def _post(url, body, token):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + "/v1/score", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def main():
    import ImageReward
    import numpy as np
    import torch
    import transformers

    sys.path.insert(0, str(HERE))
    from serve import Image

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url, token = f"http://127.0.0.1:{port}", "tiny-token"
    env = {**os.environ, "TINY_TOKEN": token, "PYTHONPATH": str(HERE)}
    server = subprocess.Popen([sys.executable, str(HERE / "serve.py"), "--scorer", "tiny_image_reward:scorer",
                               "--port", str(port), "--token-env", "TINY_TOKEN"], env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(url + "/v1/health", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the reference server did not come up")
                time.sleep(0.2)
        pixels = np.random.default_rng(0).integers(0, 256, size=(4, 3, 64, 64), dtype=np.uint8)
        prompts = ["a photo of the cat", "a red square", "two apples on the table", "a blue dog"]
        body = {"id": "tiny-1", "images": {"dtype": "uint8", "shape": list(pixels.shape),
                                           "data": base64.b64encode(pixels.tobytes()).decode()},
                "prompts": prompts, "metadata": [None] * 4}
        status, answer = _post(url, body, token)
        assert status == 200 and answer["id"] == "tiny-1" and len(answer["scores"]) == 4, answer
        assert all(isinstance(s, float) for s in answer["scores"]), answer
        assert len(set(answer["scores"])) == 4, answer  # the tiny model tells the images apart
        local = scorer()([Image(p.tobytes(), 3, 64, 64) for p in pixels], prompts, [None] * 4)
        assert answer["scores"] == local, (answer["scores"], local)
        assert _post(url, body, None)[0] == 401 and _post(url, body, "wrong")[0] == 401
        print(f"image-reward {getattr(ImageReward, '__version__', '1.5')} (transformers {transformers.__version__}, "
              f"torch {torch.__version__}) served a tiny ImageReward from its own venv: scores {answer['scores']}, "
              "equal to the model in process; 401 without or with a wrong token")
    finally:
        server.kill()
        server.wait(30)


if __name__ == "__main__":
    main()
