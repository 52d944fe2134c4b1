"""Regenerate the HPSv3 golden data with the ORIGINAL hpsv3 package (never imported by the tests).

What it runs is upstream's own code, unmodified: ``hpsv3.HPSv3RewardInferencer`` (its ``__init__``, which
calls ``hpsv3.train.create_model_and_processor``: ``AutoProcessor`` with right padding, the ``<|Reward|>``
special token, ``Qwen2VLRewardModelBT.from_pretrained``, ``resize_token_embeddings``, the float32 head,
``load_state_dict(strict=True)``; then ``prepare_batch`` and ``reward``) on a tiny Qwen2-VL with seeded
random weights instead of Qwen2-VL-7B. Only packages needed for training are stubbed (deepspeed, trl, peft,
datasets, fire, matplotlib, pandas, tensorboard), plus torchvision, which the inference path never calls for
PIL images (``fetch_image`` resizes PIL pictures with PIL) and which cannot be installed beside a CPU torch.
The one addition is in the bf16 run: a pre-hook casts the head's input to float32, which is what upstream's
``torch.autocast("cuda", float32)`` does on a GPU and does not do on the CPU (:func:`bf16_rewards`).

Environment (throwaway, not the project's), with upstream's pin ``transformers==4.45.2``::

    python3.11 -m venv venv && venv/bin/pip install torch==2.13.0
    venv/bin/pip install transformers==4.45.2 accelerate safetensors pillow numpy omegaconf pyyaml requests tqdm
    pip download hpsv3==1.0.0 --no-deps --no-binary :all: && tar xzf hpsv3-1.0.0.tar.gz
    PYTHONPATH=hpsv3-1.0.0 venv/bin/python tests/data/hpsv3/make_golden.py

It writes, next to itself: ``base/`` (the tiny Qwen2-VL config, a small byte-level BPE tokenizer with
Qwen2's pre-tokenizer and special tokens, Qwen2-VL's image-processor config and chat template: what the
ranker reads from ``Qwen/Qwen2-VL-7B-Instruct``), ``hpsv3_tiny.safetensors`` (the reward model's state
dict in upstream's transformers-4.45 key layout, bf16 backbone and float32 head, like ``MizzenAI/HPSv3``'s
``HPSv3.safetensors``; the vision tower has one head of width 80, so its rotary frequencies are the 7B's),
``images/``, ``golden.json`` (prompts, token ids, (mu, sigma) batched and one by one) and
``golden_tensors.safetensors`` (pixel-value checks).
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).parent
SEED = 7
PROMPTS = [
    "a red fox",
    "a watercolor painting of a lighthouse on a cliff at dawn, soft pastel colors, gulls in the sky",
    "two cats",
    "cute chibi anime cartoon fox, smiling wagging tail with a small cartoon heart above sticker",
]
#: (height, width): square and not, smaller and larger than 448x448, all resized by upstream to 200704 pixels
IMAGE_SIZES = [(64, 64), (72, 96), (100, 60), (480, 512)]
#: Qwen2-VL-7B-Instruct's chat template (its chat_template.json)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
#: Qwen2-VL's special tokens, in its order
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN2_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


class _Stub(types.ModuleType):
    """A module whose every attribute is a fresh class (subclassable, callable)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


def import_upstream_with_stubs() -> None:
    """Import hpsv3 with the stubs in place, then take them away again (accelerate and transformers look
    packages up later; they must find none)."""
    names = stub_training_only_packages()
    import hpsv3.train  # noqa: F401
    from hpsv3 import HPSv3RewardInferencer  # noqa: F401

    for name in names:
        sys.modules.pop(name, None)


def stub_training_only_packages() -> list[str]:
    # transformers and torch's dynamo look up which packages exist when first imported: before the stubs
    import torch._dynamo  # noqa: F401
    import transformers.trainer  # noqa: F401

    names = ["deepspeed", "trl", "peft", "datasets", "fire", "matplotlib", "matplotlib.pyplot",
                 "matplotlib.patches", "pandas", "torch.utils.tensorboard", "torchvision", "torchvision.io",
                 "torchvision.transforms", "torchvision.transforms.functional", "flash_attn"]
    for name in names:
        sys.modules[name] = _Stub(name)
    sys.modules["trl"].get_quantization_config = lambda config: None  # no 4/8-bit quantisation
    sys.modules["trl"].get_kbit_device_map = lambda: None
    sys.modules["torchvision"].io = sys.modules["torchvision.io"]
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    del sys.modules["flash_attn"]  # upstream falls back to SDPA when it is missing
    return names


def build_tokenizer(directory: Path) -> None:
    """A small byte-level BPE with Qwen2's normaliser, pre-tokeniser and decoder, trained on the prompt text."""
    from hpsv3.dataset.data_collator_qwen import INSTRUCTION, prompt_with_special_token
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [INSTRUCTION, prompt_with_special_token, "You are a helpful assistant.", *PROMPTS] * 3
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      unk_token=None, bos_token=None, model_max_length=32768)
    wrapped.add_special_tokens({"additional_special_tokens": SPECIALS[1:]} | {"pad_token": SPECIALS[0]})
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2))


def build_base(directory: Path) -> None:
    """The tiny Qwen2-VL (4.45 layout, seeded random weights), its processor and tokenizer."""
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    build_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer) + 40,  # padded, like Qwen2-VL's 152064 for 151657 tokens
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.1,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=False,
        vision_config={"depth": 2, "embed_dim": 80, "hidden_size": 32, "num_heads": 1, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=None,
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(directory / "with-weights")  # upstream's from_pretrained needs weights; not kept
    config.save_pretrained(directory)
    # Qwen2-VL-7B-Instruct's preprocessor_config.json values
    processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2,
                                      merge_size=2)
    for target in (directory, directory / "with-weights"):
        processor.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


def upstream_config(base: Path, out: Path, bf16: bool = False) -> Path:
    """Upstream's HPSv3_7B.yaml, pointed at the tiny base, on the CPU with SDPA; float32, or bf16 as upstream
    runs on GPUs."""
    import hpsv3
    import yaml

    config = yaml.safe_load((Path(hpsv3.__file__).parent / "config" / "HPSv3_7B.yaml").read_text())
    config.update(model_name_or_path=str(base), bf16=bf16, torch_dtype="bfloat16" if bf16 else "float32",
                  disable_flash_attn2=True, report_to="none", output_dir=str(out / "output"),
                  dataloader_num_workers=0)
    path = out / ("tiny-bf16.yaml" if bf16 else "tiny.yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def bf16_rewards(base: Path, scratch: Path, images: list[str]) -> torch.Tensor:
    """The batched rewards of upstream's bf16 model (``training_args.bf16``: backbone and its rotary buffers
    cast to bf16, the head float32). Upstream computes the head under ``torch.autocast("cuda", float32)``,
    which on a GPU casts the bf16 hidden states to float32 for the head's matmuls; on the CPU that autocast
    does nothing, so a pre-hook does the same cast here."""
    from hpsv3 import HPSv3RewardInferencer

    inferencer = HPSv3RewardInferencer(config_path=str(upstream_config(base / "with-weights", scratch, bf16=True)),
                                       checkpoint_path=str(HERE / "hpsv3_tiny.safetensors"), device="cpu")
    assert next(inferencer.model.model.parameters()).dtype == torch.bfloat16
    assert next(inferencer.model.rm_head.parameters()).dtype == torch.float32
    inferencer.model.rm_head.register_forward_pre_hook(lambda module, args: tuple(a.float() for a in args))
    with torch.no_grad():
        return inferencer.reward(images, PROMPTS)


def make_images() -> list[Path]:
    generator = np.random.default_rng(SEED)
    paths = []
    (HERE / "images").mkdir(exist_ok=True)
    for index, (height, width) in enumerate(IMAGE_SIZES):
        coarse = generator.random((3, 4, 4)).astype(np.float32)
        picture = Image.fromarray((coarse.transpose(1, 2, 0) * 255).astype(np.uint8)).resize((width, height),
                                                                                             Image.BILINEAR)
        noise = generator.integers(-3, 4, (height, width, 3))  # some texture, small files
        array = np.clip(np.asarray(picture).astype(int) + noise, 0, 255).astype(np.uint8)
        path = HERE / "images" / f"image{index}.png"
        Image.fromarray(array).save(path, optimize=True)
        paths.append(path)
    return paths


def main() -> None:
    import_upstream_with_stubs()
    import safetensors.torch
    from hpsv3 import HPSv3RewardInferencer
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import (
        DataConfig,
        ModelConfig,
        PEFTLoraConfig,
        TrainingConfig,
        parse_args_with_yaml,
    )

    torch.set_num_threads(1)
    base = HERE / "base"
    base.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        build_base(base)
        yaml_path = upstream_config(base / "with-weights", Path(scratch))
        # the reward model as upstream creates it before training (head initialised from the seed), saved in
        # the layout of HPSv3.safetensors
        (_, training, model_config, lora), _ = parse_args_with_yaml(
            (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(yaml_path), is_train=False)
        torch.manual_seed(SEED + 1)
        model, _, _ = create_model_and_processor(model_config=model_config, peft_lora_config=lora,
                                                 training_args=training)
        with torch.no_grad():  # a head of std 0.1 everywhere, so the scores spread
            for parameter in model.rm_head.parameters():
                parameter.normal_(0, 0.3 if parameter.dim() > 1 else 0.1)
        # as HPSv3.safetensors: the backbone in bf16, the head in float32 (also halves the file)
        state = {key: value.to(torch.float32 if key.startswith("rm_head.") else torch.bfloat16).contiguous()
                 for key, value in model.state_dict().items()}
        safetensors.torch.save_file(state, HERE / "hpsv3_tiny.safetensors")
        del model
        import shutil

        shutil.rmtree(base / "with-weights" / "output", ignore_errors=True)

        inferencer = HPSv3RewardInferencer(config_path=str(yaml_path), checkpoint_path=str(HERE / "hpsv3_tiny.safetensors"),
                                           device="cpu")
        images = [str(p) for p in make_images()]
        with torch.no_grad():
            batch = inferencer.prepare_batch(images, PROMPTS)
            batched = inferencer.reward(images, PROMPTS)
            single = torch.cat([inferencer.reward([image], [prompt]) for image, prompt in zip(images, PROMPTS, strict=True)])
            # the same image under every prompt, and every image under one prompt
            crossed = torch.stack([inferencer.reward([images[0]] * len(PROMPTS), PROMPTS)[:, 0],
                                   inferencer.reward(images, [PROMPTS[1]] * len(images))[:, 0]])
        bf16 = bf16_rewards(base, Path(scratch), images)
        shutil.rmtree(base / "with-weights")

    pixels = batch["pixel_values"]
    golden = {
        "prompts": PROMPTS,
        "images": [Path(p).name for p in images],
        "reward_token_id": int(inferencer.processor.tokenizer.convert_tokens_to_ids("<|Reward|>")),
        "padding_side": inferencer.processor.tokenizer.padding_side,
        "input_ids": [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)],
        "padded_length": int(batch["input_ids"].shape[1]),
        "image_grid_thw": batch["image_grid_thw"].tolist(),
        "batched": batched.tolist(),
        "single": single.tolist(),
        "same_image_every_prompt": crossed[0].tolist(),
        "every_image_one_prompt": crossed[1].tolist(),
        "bf16_batched": bf16.tolist(),
        "versions": {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
                     "hpsv3": "1.0.0"},
    }
    # one key a line: the token ids stay 4 lines, not 4,000
    (HERE / "golden.json").write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in golden.items())
                                      + "\n}\n")
    safetensors.torch.save_file({"pixel_row_sums": pixels.sum(dim=1).contiguous(),
                                 "pixel_rows": pixels[::97].contiguous()}, HERE / "golden_tensors.safetensors")
    print(json.dumps({k: golden[k] for k in ("batched", "single", "padded_length")}, indent=1))
    print("lengths", [len(r) for r in golden["input_ids"]])


if __name__ == "__main__":
    main()
