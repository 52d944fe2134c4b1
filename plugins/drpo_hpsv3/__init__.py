"""The ``hpsv3`` ranker: HPSv3 (MizzenAI), a Qwen2-VL-7B reward model of human preference, ported to current
transformers with numerical parity to the ``hpsv3`` package.

Weights: the asset ``hpsv3`` (``MizzenAI/HPSv3``'s ``HPSv3.safetensors``, 16.6 GB, upstream's key layout)
or ``checkpoint: path``; the config and tokenizer of ``base`` (``Qwen/Qwen2-VL-7B-Instruct``; its weights
are not downloaded). Options ``device`` (``cuda:1`` puts the 7B reward beside, not on, the generator's GPU),
``dtype`` (auto: bf16 backbone on CUDA; the head is float32) and ``batch_size``. The score is HPSv3's
``mu``, which the paper's tables print as is (registered ``units``: raw).

:mod:`drpo_hpsv3.processing` builds the inputs (images and chat text), :mod:`drpo_hpsv3.checkpoint` loads
the checkpoint (key remap, head), :mod:`drpo_hpsv3.ranker` runs the forward pass as upstream did.

Registration only: torch and transformers are imported inside the factory.
"""

from __future__ import annotations

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register, RegisterAsset
from drpo_core.interfaces import Ranker, Units
from drpo_hpsv3.options import HPSV3_ASSET, HPSv3Options


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    register("hpsv3", _hpsv3, options=HPSv3Options, units=Units(1),
             summary="HPSv3: human preference reward (mu) of a Qwen2-VL-7B fine-tune, image and prompt")


@hookimpl
def drpo_register_assets(register: RegisterAsset) -> None:
    register("hpsv3", **HPSV3_ASSET)


def _hpsv3(options: HPSv3Options, context: BuildContext) -> Ranker:
    from drpo_hpsv3.loading import build

    return build(options, context)
