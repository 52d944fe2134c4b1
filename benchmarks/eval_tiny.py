"""Wall time of `drpo eval` end to end on tiny models: a tiny SD-Turbo run (random LoRA weights) against its base,
scored by the paper's four rankers (tiny CLIP weights, the tiny HPSv2 test checkpoint), through the real ``drpo``
console script (interpreter start, imports, model loading, generation, scoring, the table and the JSON).

    python benchmarks/eval_tiny.py                    # 8 prompts x seeds 42-46 (80 images), 3 repeats
    python benchmarks/eval_tiny.py --prompts 32 --repeats 1 --threads 2

Prints the median wall time of the command, the time the report itself measured (generation and scoring,
both sides), and that per (prompt, seed) pair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the command (OMP_NUM_THREADS)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from drpo_clip_rankers.testing import build_tiny_rankers
    from drpo_diffusers.testing import build_tiny_pipelines, make_tiny_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipelines, tiny = build_tiny_pipelines(root / "pipelines"), build_tiny_rankers(root / "rankers")
        prompts = [f"a photo of the thing number {i}" for i in range(args.prompts)]
        run = make_tiny_run(root / "work", pipelines["sd"], prompts)
        options = {
            "pickscore": {"model": tiny["clip"], "processor": tiny["clip"]},
            "clip": {"model": tiny["clip"]},
            "aesthetic": {"model": tiny["clip"], "head": tiny["head"]},
            "hpsv2": {"checkpoint": REPO / "tests/data/hpsv2/open_clip_tiny.safetensors",
                      "tokenizer": tiny["tokenizer"], "vision_head_width": 20, "text_head_width": 16},
        }
        flags = [f"--set=rankers.{name}.{key}={value}" for name, found in options.items() for key, value in found.items()]
        drpo = Path(sys.executable).with_name("drpo")
        command = [str(drpo), "eval", str(run), "--prompts", str(run.parent / "prompts.txt"), "--device", "cpu",
                   "--json", str(root / "report.json"), *flags]
        walls, inside = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            walls.append(time.perf_counter() - start)
            inside.append(json.loads((root / "report.json").read_text())["seconds"])
    pairs = args.prompts * 5
    print(f"drpo eval, tiny SD-Turbo run vs base, 4 rankers, {args.prompts} prompts x 5 seeds = {pairs} pairs "
          f"({2 * pairs} images), CPU, {args.threads} thread(s), {args.repeats} repeats")
    print(f"  command wall time (median): {statistics.median(walls):.2f} s")
    print(f"  generation + scoring (report's seconds, median): {statistics.median(inside):.2f} s "
          f"= {1000 * statistics.median(inside) / pairs:.1f} ms per (prompt, seed) pair")


if __name__ == "__main__":
    main()
