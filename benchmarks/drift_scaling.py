"""Time and peak memory of the drift field versus the number of particles N and their dimension D.

Measures ``DriftEstimator.targets`` (preference + reference fields, laplacian kernel, radii 0.02/0.05/0.2)
followed by ``loss`` and its backward to the features, for one prompt (B = 1) with N generated particles,
N/3 positives, N/3 negatives and N reference particles. The feature network is not included.

    python benchmarks/drift_scaling.py            # full grid N in {100..5000} x D in {64..2048}
    python benchmarks/drift_scaling.py --quick    # N in {100, 1000, 5000} x D in {64, 512, 2048}

Every row runs in a fresh subprocess so that its peak memory can be read: on CPU the increase of the
peak resident set size (``getrusage`` ``ru_maxrss``) during the first forward+backward, on CUDA
``torch.cuda.max_memory_allocated`` above what was allocated before. Time is the median of the following
repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

FULL_N = (100, 500, 1000, 2000, 5000)
FULL_D = (64, 256, 1024, 2048)
QUICK_N = (100, 1000, 5000)
QUICK_D = (64, 512, 2048)
# The paper's SD-Turbo setting: K = 24 candidates, M = 8 anchors each side, latent-MAE layer4 keys with
# T particles per image (8x8 map: mean/std 1, 2x2 patches 16, 4x4 patches 4); stage-4 width D = 512 assumed.
PAPER_K, PAPER_M, PAPER_D = 24, 8, 512
PAPER_KEYS = {"layer4_mean": 1, "layer4_std": 1, "layer4_mean_2": 16, "layer4_std_2": 16,
              "layer4_mean_4": 4, "layer4_std_4": 4}


def grid_config(N: int, D: int) -> dict:
    return {"D": D, "keys": {"x": {"N": N, "P": N // 3, "M": N // 3}}}


def paper_config() -> dict:
    keys = {k: {"N": PAPER_K * T, "P": PAPER_M * T, "M": PAPER_M * T} for k, T in PAPER_KEYS.items()}
    return {"D": PAPER_D, "keys": keys}


def estimated_bytes(config: dict) -> int:
    """Rough peak: ~8 live float32 (N, J) matrices of the reference field (J = 3N), plus the features."""
    D = config["D"]
    return max(8 * 4 * k["N"] * 3 * k["N"] + 4 * 8 * k["N"] * D for k in config["keys"].values())


def measure(config: dict, repeats: int, device: str, threads: int) -> dict:
    """Runs inside the subprocess: peak memory of the first run, median time of the next ``repeats``."""
    import torch

    from drpo_core.drift import DriftEstimator
    from drpo_kernels.kernels import laplacian

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    D = config["D"]

    def features(n):
        return torch.randn(1, n, D, generator=g).to(device)

    generated = {k: features(c["N"]).requires_grad_(True) for k, c in config["keys"].items()}
    positives = {k: features(c["P"]) for k, c in config["keys"].items()}
    negatives = {k: features(c["M"]) for k, c in config["keys"].items()}
    reference = {k: features(c["N"]) for k, c in config["keys"].items()}
    estimator = DriftEstimator(laplacian)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        targets = estimator.targets(generated, positives, negatives, reference)
        estimator.loss(generated, targets)["total"].sum().backward()
        sync()

    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak / 2**20}


def run_row(config: dict, args) -> dict:
    command = [sys.executable, __file__, "--one", json.dumps(config), "--repeats", str(args.repeats),
               "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid (corners and middle), 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 3, quick 2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared CPU, spinning OpenMP threads distort timings)")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip rows estimated above this")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one is not None:
        print(json.dumps(measure(json.loads(args.one), args.repeats, args.device, args.threads)))
        return

    ns, ds = (QUICK_N, QUICK_D) if args.quick else (FULL_N, FULL_D)
    rows = [(f"grid N={N} D={D}", grid_config(N, D)) for N in ns for D in ds]
    rows.append(("paper: K=24, 6 latent-MAE keys, M=8, D=512", paper_config()))
    memory = ("peak RSS increase, getrusage" if args.device == "cpu"
              else "torch.cuda.max_memory_allocated increase")
    print(f"drift field: targets (pref + ref) + loss + backward, B=1, laplacian, 3 radii; device={args.device}, "
          f"threads={args.threads}; time = median of {args.repeats} after one warm-up run; "
          f"memory = {memory} during the warm-up run (fresh subprocess per row); "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'setting':<46} {'N (gen)':>8} {'P=M':>6} {'D':>5} {'time ms':>10} {'peak MB':>9}")
    for name, config in rows:
        keys = config["keys"].values()
        N, P = sum(k["N"] for k in keys), sum(k["P"] for k in keys)
        head = f"{name:<46} {N:>8} {P:>6} {config['D']:>5}"
        if estimated_bytes(config) > args.max_gb * 2**30:
            print(f"{head} {'skipped':>10} {'>' + str(args.max_gb) + ' GB':>9}")
            continue
        result = run_row(config, args)
        print(f"{head} {result['ms']:>10.1f} {result['peak_mb']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
