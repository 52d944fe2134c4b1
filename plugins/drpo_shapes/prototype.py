"""Throwaway prototype: pretrain the shapes generator by data drift, measure counting accuracy,
then a short online DrPO finetune. Replaced by ``drpo train`` once the loop exists.

    python -m drpo_shapes.prototype --pretrain-steps 700 --finetune-steps 300 --save
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import time

import torch

from drpo_core.drift import drift_loss
from drpo_kernels.kernels import laplacian
from drpo_shapes.features import ShapesFeatures
from drpo_shapes.generator import DEFAULT_WEIGHTS, ShapesGenerator
from drpo_shapes.rankers import ShapesCountingRanker
from drpo_shapes.world import all_prompts, parse_prompt, prompt_metadata, render_batch


def grouped(features: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    """(B*K, T, D) -> (B, K*T, D): one particle set per prompt."""
    return {k: v.reshape(groups, -1, v.shape[-1]) for k, v in features.items()}


def noise_for(seed: int, count: int, shape) -> torch.Tensor:
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(gen, ranker, prompts, per_prompt=16, seed=12345):
    repeated = [p for p in prompts for _ in range(per_prompt)]
    noise = noise_for(seed, len(repeated), gen.noise_shape)
    scores = torch.cat([
        ranker.score(gen.decode(gen.sample(repeated[i:i + 128], noise[i:i + 128])), repeated[i:i + 128],
                     [None] * len(repeated[i:i + 128]))
        for i in range(0, len(repeated), 128)
    ])
    by_prompt = scores.view(len(prompts), per_prompt).mean(1)
    report = {"all": scores.mean().item(), "min_prompt": by_prompt.min().item(),
              "zero_prompts": int((by_prompt == 0).sum())}
    for attr in ("count", "shape", "color"):
        acc = collections.defaultdict(list)
        for p, a in zip(prompts, by_prompt.tolist(), strict=True):
            acc[getattr(parse_prompt(p), attr)].append(a)
        report.update({f"{attr}={k}": sum(v) / len(v) for k, v in acc.items()})
    return report


def fmt(report):
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items())


def pretrain(gen, feats, prompts, steps, batch_prompts, k, lr, seconds, state_path=None):
    """Data drift: real renders of the prompt attract, the generator's own samples repel.

    With ``state_path`` the run is resumable: re-running continues where the time limit stopped it.
    """
    opt = torch.optim.Adam(gen.trainable_parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    first = 0
    if state_path and os.path.exists(state_path):
        state = torch.load(state_path)
        gen.net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        first = state["step"]
        random.setstate(state["random"])
        torch.set_rng_state(state["torch"])
        print(f"resumed at step {first}")
    start = time.time()
    step = first - 1
    for step in range(first, steps):
        batch = random.sample(prompts, batch_prompts)
        repeated = [p for p in batch for _ in range(k)]
        real = render_batch(repeated, [random.randrange(10**9) for _ in repeated])
        x = gen.sample(repeated, torch.randn(len(repeated), *gen.noise_shape))
        gen_f, real_f = grouped(feats.features(x), batch_prompts), grouped(feats.features(real), batch_prompts)
        loss = 0.0
        for key, xf in gen_f.items():
            empty = xf.new_zeros(batch_prompts, 0, xf.shape[-1])
            key_loss, _ = drift_loss(xf, real_f[key], empty, kernel=laplacian, positive_weight=1.0,
                                     negative_weight=1.0)
            loss = loss + key_loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"pretrain {step} loss={loss.item():.2f} {(time.time() - start) / (step + 1 - first):.2f}s/step",
                  flush=True)
        if time.time() - start > seconds and step + 1 < steps:
            print(f"pretrain stopped by time at step {step}")
            break
    if state_path:
        torch.save({"net": gen.net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step + 1, "random": random.getstate(), "torch": torch.get_rng_state()}, state_path)
    return (time.time() - start) / max(1, step + 1 - first), step + 1 >= steps


def pick(indices, n):
    return [random.choice(indices) for _ in range(n)] if len(indices) < n else random.sample(indices, n)


def finetune(gen, feats, ranker, prompts, steps, batch_prompts, k, lr, ref_lambda, n_anchor, seconds, shuffle):
    opt = torch.optim.Adam(gen.trainable_parameters(), lr=lr)
    start = time.time()
    skipped = 0
    for step in range(steps):
        batch = random.sample(prompts, batch_prompts)
        repeated = [p for p in batch for _ in range(k)]
        noise = torch.randn(len(repeated), *gen.noise_shape)
        with torch.no_grad():  # rollout: candidates without grad, ranked by the black-box checker
            images = gen.decode(gen.sample(repeated, noise))
            scores = ranker.score(images, repeated, [prompt_metadata(p) for p in repeated])
            ref_images = gen.reference(repeated, noise)
        if shuffle:
            scores = scores[torch.randperm(len(scores))]
        keep, pos_idx, neg_idx = [], [], []
        for b in range(batch_prompts):
            group = scores[b * k:(b + 1) * k]
            good = [b * k + i for i in range(k) if group[i] > 0.5]
            bad = [b * k + i for i in range(k) if group[i] <= 0.5]
            if good and bad:
                keep.append(b)
                pos_idx += pick(good, n_anchor)
                neg_idx += pick(bad, n_anchor)
        skipped += batch_prompts - len(keep)
        if not keep:
            continue
        rows = [b * k + i for b in keep for i in range(k)]
        x = gen.sample([repeated[r] for r in rows], noise[rows])
        nb = len(keep)
        with torch.no_grad():
            pos_f = grouped(feats.features(images[pos_idx]), nb)
            neg_f = grouped(feats.features(images[neg_idx]), nb)
            ref_f = grouped(feats.features(ref_images[rows]), nb)
        gen_f = grouped(feats.features(gen.decode(x)), nb)
        loss = 0.0
        for key, xf in gen_f.items():
            pref, _ = drift_loss(xf, pos_f[key], neg_f[key], kernel=laplacian)
            loss = loss + pref.mean()
            if ref_lambda:
                ref, _ = drift_loss(xf, ref_f[key], xf.detach(), kernel=laplacian, mask_negative_self=True)
                loss = loss + ref_lambda * ref.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(f"finetune {step} loss={loss.item():.2f} batch_acc={scores.mean():.3f} "
                  f"{(time.time() - start) / (step + 1):.2f}s/step skipped={skipped}", flush=True)
        if time.time() - start > seconds:
            print(f"finetune stopped by time at step {step}")
            break
    return (time.time() - start) / (step + 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-steps", type=int, default=700)
    parser.add_argument("--finetune-steps", type=int, default=0)
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ft-lr", type=float, default=3e-4)
    parser.add_argument("--ref-lambda", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=290)
    parser.add_argument("--init", default="random")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--shuffle", action="store_true", help="random ranking (control)")
    parser.add_argument("--save", default=None, help="path for the pretrained weights ('default': the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--state", default=None, help="resumable pretraining state (.pt)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = ShapesGenerator(weights=args.weights, init=args.init, seed=args.seed)
    feats, ranker, prompts = ShapesFeatures(), ShapesCountingRanker(), all_prompts()
    if args.pretrain_steps:
        sps, done = pretrain(gen, feats, prompts, args.pretrain_steps, args.batch_prompts, args.k, args.lr,
                             args.seconds, args.state)
        print(f"pretrain {sps:.2f} s/step")
        if args.save and done:
            from safetensors.torch import save_file

            save_file(gen.trainable_state_dict(), str(DEFAULT_WEIGHTS if args.save == "default" else args.save))
        if args.save and done:
            gen = ShapesGenerator(weights=DEFAULT_WEIGHTS if args.save == "default" else args.save)
    print("eval before finetune:", fmt(evaluate(gen, ranker, prompts)), flush=True)
    if args.finetune_steps:
        sps = finetune(gen, feats, ranker, prompts, args.finetune_steps, args.batch_prompts, args.k, args.ft_lr,
                       args.ref_lambda, 4, args.seconds, args.shuffle)
        print(f"finetune {sps:.2f} s/step")
        print("eval after finetune:", fmt(evaluate(gen, ranker, prompts)), flush=True)


if __name__ == "__main__":
    main()
