"""The ``imagereward`` ranker: ImageReward v1.0 (THUDM) ported onto transformers BLIP.

The ``image-reward`` package pins old timm and transformers and cannot sit beside this stack, so the ranker
loads its checkpoint into transformers' ``BlipVisionModel`` and ``BlipTextModel`` (:mod:`drpo_imagereward.model`:
the key renames, the sizes read from the checkpoint) and scores as ``ImageReward.score`` does:
``(mlp(text features) - 0.16717) / 1.03334``, roughly standard normal, higher is better. The paper's tables
print it x10 (its registered ``units``, which ``drpo eval`` reports in). ``tests/data/imagereward/make_golden.py`` checks it
against the original package's classes.

* weights: ``model`` is a hub id (default ``THUDM/ImageReward``) or a local directory holding ``ImageReward.pt``
  and ``med_config.json`` (the hub layout);
* prompts: BERT WordPiece on bert-base-uncased's vocabulary, shipped with the plugin (Apache-2.0, from
  google-research/bert), so nothing is downloaded for the tokenizer; [CLS] first, padded and cut to 35 tokens;
* ``batch_size``, ``dtype`` (backbone; ``auto``: the run's mixed precision on CUDA) and ``device`` (it can sit
  on another GPU: ``device: cuda:1``); the head and the scores are float32.

Registration only: torch and transformers are imported inside the factory.
"""

from __future__ import annotations

from drpo_core import hookimpl
from drpo_core.context import BuildContext
from drpo_core.hookspecs import Register
from drpo_core.interfaces import Ranker, Units
from drpo_imagereward.options import ImageRewardOptions


@hookimpl
def drpo_register_rankers(register: Register[Ranker]) -> None:
    register("imagereward", _imagereward, options=ImageRewardOptions, aliases=("image_reward",), units=Units(10),
             summary="ImageReward v1.0: BLIP ViT-L + cross-attending BERT with a reward head (about -2 to 2)")


def _imagereward(options: ImageRewardOptions, context: BuildContext) -> Ranker:
    from drpo_imagereward import ranker

    return ranker.build("imagereward", options, context)
