"""The train steps' matrix products on this CPU: each of XLA's CPU libraries against PyTorch's.

    taskset -c 0 python benchmarks/cpu_products.py [--out docs/bench/cpu_products.md]

Times the Dense products of nanoGPT's CPU recipe and of shakespeare_char, per device (the batch
split over 2 devices), in the three forms a train step runs (x @ W forward, dy @ W^T input
gradient, x^T dy weight gradient), with every library XLA's CPU backend can hand a dot to
(YNNPACK, its default; oneDNN; Eigen), each set by XLA's compiler options for that one compile,
and with PyTorch (MKL) on the same thread count. Each library and PyTorch runs in a process of its
own, one after the other. GFLOP/s, best of 5; run it under `taskset -c 0` for one core's rates,
and twice at once on two cores to see what the cores reach together.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gptjax.kernels import EIGEN_DOTS, ONEDNN_DOTS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

# (name, M, K, N, form): form "nn" x @ W, "nt" x @ W^T, "tn" x^T @ y; M = rows of one device's batch
SHAPES = [
    ("recipe c_attn x@W", 384, 128, 384, "nn"),
    ("recipe c_fc x@W", 384, 128, 512, "nn"),
    ("recipe mlp.c_proj x@W", 384, 512, 128, "nn"),
    ("recipe c_fc dy@W^T", 384, 512, 128, "nt"),
    ("recipe c_fc x^T@dy", 128, 384, 512, "tn"),
    ("shakespeare_char c_attn x@W", 8192, 384, 1152, "nn"),
    ("shakespeare_char c_fc x@W", 8192, 384, 1536, "nn"),
    ("shakespeare_char mlp.c_proj x@W", 8192, 1536, 384, "nn"),
    ("shakespeare_char c_fc dy@W^T", 8192, 1536, 384, "nt"),
    ("shakespeare_char c_fc x^T@dy", 384, 8192, 1536, "tn"),
    ("shakespeare_char mlp.c_proj x^T@dy", 1536, 8192, 384, "tn"),
]
# XLA's CPU compiler options that send the dots to each library (per compile)
LIBRARIES = {"YNNPACK": {}, "oneDNN": ONEDNN_DOTS, "Eigen": EIGEN_DOTS}
PRODUCTS = {"nn": lambda a, b: a @ b, "nt": lambda a, b: a @ b.T, "tn": lambda a, b: a.T @ b}


def operands(M: int, K: int, N: int, form: str):
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = {"nn": ((M, K), (K, N)), "nt": ((M, K), (N, K)), "tn": ((K, M), (K, N))}[form]
    return [rng.standard_normal(shape, np.float32) for shape in shapes]


def best_seconds(call, flops: int, rounds: int = 5) -> float:
    """Best time of one call over `rounds` timed loops of about 2 GFLOP each, after a warm-up."""
    for _ in range(3):
        call()
    n = max(3, int(2e9 / flops))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - start) / n)
    return best


def library_of(compiled) -> str:
    """Which library XLA handed the compiled dot to (a library can decline a form)."""
    text = compiled.as_text()
    return "oneDNN" if "onednn_fusion" in text else "YNNPACK" if "ynn_fusion" in text else "Eigen"


def time_xla(library: str) -> dict[str, list]:
    import jax
    import jax.numpy as jnp

    rates = {}
    for name, M, K, N, form in SHAPES:
        a, b = (jnp.asarray(x) for x in operands(M, K, N, form))
        compiled = jax.jit(PRODUCTS[form]).lower(a, b).compile(compiler_options=LIBRARIES[library] or None)
        seconds = best_seconds(lambda: compiled(a, b).block_until_ready(), 2 * M * K * N)
        rates[name] = [2 * M * K * N / seconds / 1e9, library_of(compiled)]
    return rates


def time_torch(threads: int) -> dict[str, list]:
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for name, M, K, N, form in SHAPES:
        a, b = (torch.from_numpy(x) for x in operands(M, K, N, form))
        rates[name] = [2 * M * K * N / best_seconds(lambda: PRODUCTS[form](a, b), 2 * M * K * N) / 1e9, "PyTorch"]
    return rates


def child(which: str) -> None:
    """One library's rates as JSON on stdout (run in a process of its own)."""
    threads = len(os.sched_getaffinity(0))
    print(json.dumps(time_torch(threads) if which == "PyTorch" else time_xla(which)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "cpu_products.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    from peers import host, publish

    columns = {}
    for which in [*LIBRARIES, "PyTorch"]:
        out = subprocess.run([sys.executable, __file__, "--child", which], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{which} failed: {out.stderr.strip().splitlines()[-1]}")
        columns[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{which}: done", file=sys.stderr)
    cores = len(os.sched_getaffinity(0))
    lines = [f"Host: {host()}; {cores} core(s) allowed; {time.strftime('%Y-%m-%d')}; command: python "
             "benchmarks/cpu_products.py; GFLOP/s, float32, best of 5; a library in brackets: XLA handed "
             "that form to it instead", "",
             "| product (M x K x N) | " + " | ".join(f"XLA {w}" for w in LIBRARIES) + f" | PyTorch (MKL), "
             f"{cores} thread(s) |", "|---|" + "---|" * (len(LIBRARIES) + 1)]
    for name, M, K, N, _ in SHAPES:
        cells = [f"{rate:.0f}" + ("" if used in (which, "PyTorch") else f" ({used})")
                 for which, (rate, used) in ((w, columns[w][name]) for w in columns)]
        lines.append(f"| {name} ({M} x {K} x {N}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
