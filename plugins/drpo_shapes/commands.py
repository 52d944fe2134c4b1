"""The toy world's commands: ``drpo toy pretrain`` reproduces the shipped base generator and
``drpo toy encoder`` the count-aware encoder of the feature space.

The base is trained by DrPO's own ``data`` drift source (drifting-model training): renders of the
prompt are the positives and the generator's own samples the repulsion, with no reference drift.
It sees every prompt of the grammar; DrPO then trains on half of them and is evaluated on the rest.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import torch

toy = typer.Typer(no_args_is_help=True, help="The toy shapes world.")

PRETRAIN_RECIPE: dict[str, Any] = {
    # seed 0 left a held-out prompt at 0/64; seed 2 draws each at least 2/64 (docs/toy-world.md). The shipped
    # file was trained with one thread (OMP_NUM_THREADS=1): other thread counts sum floats in another order
    "seed": 2,
    "generator": {"name": "shapes", "init": "random"},
    "rankers": ["shapes:counting"],
    # pixel and random-CNN keys only: the count-aware encoder is for DrPO (the first world's base had no encoder)
    "features": {"name": "shapes", "encoder": False},
    "source": {"kind": "data"},
    # the base sees every prompt of the grammar; DrPO later trains on prompts_train.jsonl only
    "prompts": {"path": "pkg://drpo_shapes/prompts.jsonl", "eval_path": "pkg://drpo_shapes/prompts_eval.jsonl"},
    "drift": {"ref_lambda": 0.0, "positive_weight": 1.0},  # drifting-model training: data weight 1
    "selection": {"candidates": 8, "positives": 7, "negatives": 1},  # 7 renders as positives
    "train": {"steps": 900, "prompts_per_step": 8, "lr": 2e-3, "schedule": "cosine"},
    "eval": {"seeds": "0-63"},
    "checkpoint": {"every": 100},
    "log": {"progress": True},
}


class RenderSampler:
    """Real samples of the toy world: fresh renders of the prompt, with miscounted captions.

    Like web captions, a fraction ``count_noise`` of the renders can show one object more or fewer
    than the prompt says (within 1-4): a base that miscounts. The shipped base uses none; see
    docs/toy-world.md for what a miscounting base did to DrPO's gain.
    """

    def __init__(self, count_noise: float = 0.0) -> None:
        self.count_noise = count_noise

    def sample(self, record: Any, n: int, seed: int) -> "torch.Tensor":
        import numpy as np

        from drpo_shapes.world import COUNT_WORDS, Scene, parse_prompt, render_batch

        scene = parse_prompt(record.text)
        rng = np.random.default_rng([seed, scene.count])
        scenes = []
        for _ in range(n):
            count = scene.count
            if rng.random() < self.count_noise:
                count = int(rng.choice([c for c in (count - 1, count + 1) if 1 <= c <= len(COUNT_WORDS)]))
            scenes.append(Scene(count, scene.color, scene.shape))
        return render_batch(scenes, [seed * 1000 + i for i in range(n)])


@toy.command()
def pretrain(
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = PRETRAIN_RECIPE["train"]["steps"],
    output_dir: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/toy-pretrain"),
    save: Annotated[Path | None, typer.Option(help="Where to write the base weights (safetensors).")] = None,
    count_noise: Annotated[float, typer.Option(min=0.0, max=1.0, help="Fraction of renders with a miscounted caption.")] = 0.0,
    assignments: Annotated[list[str] | None, typer.Option("--set", help="dotted.key=value")] = None,
) -> None:
    """Pretrain the toy generator from random weights with the data drift source."""
    from safetensors.torch import save_file

    from drpo_core.config import resolve_config
    from drpo_core.trainer import Trainer
    from drpo_shapes.generator import DEFAULT_WEIGHTS

    recipe = {**PRETRAIN_RECIPE, "output_dir": str(output_dir),
              "train": {**PRETRAIN_RECIPE["train"], "steps": steps}}
    trainer = Trainer(resolve_config(base=recipe, assignments=assignments), data_sampler=RenderSampler(count_noise))
    trainer.train()
    target = save or DEFAULT_WEIGHTS
    weights = {k: v.detach().cpu().contiguous() for k, v in trainer.generator.trainable_state_dict().items()}
    save_file(weights, str(target))
    typer.echo(f"wrote {target}")


@toy.command()
def encoder(
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1500,
    renders: Annotated[int, typer.Option(min=1, help="Size of the rendered training set.")] = 12000,
    save: Annotated[Path | None, typer.Option(help="Where to write the encoder weights (safetensors).")] = None,
) -> None:
    """Train the count-aware encoder of the feature space (features.encoder) on renders."""
    from safetensors.torch import save_file

    from drpo_shapes.encoder import ENCODER_WEIGHTS, heldout_accuracy, train_encoder

    model = train_encoder(steps=steps, renders=renders, log=typer.echo)
    accuracy = heldout_accuracy(model)
    typer.echo("held-out renders: " + ", ".join(f"{head} {value:.1%}" for head, value in accuracy.items()))
    target = save or ENCODER_WEIGHTS
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(target))
    typer.echo(f"wrote {target}")
