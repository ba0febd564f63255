"""Time to quality: gptjax's modern recipe against nanoGPT's own CPU recipe, as whole processes.

    python benchmarks/modern_vs_nanogpt.py [--seeds 1337,1,2] [--nanogpt ../shared/nanogpt] \
        [--data_dir data/shakespeare_char] [--out docs/bench/modern_vs_nanogpt.md]

1. nanoGPT's README CPU recipe with nanoGPT's real train.py (`run_cpu_recipe.sh` in --nanogpt:
   2000 iterations), timed from outside.
2. `python -m gptjax.train shakespeare_char_cpu_modern --seed=S` for each seed, timed from outside
   (start-up, compilation, evaluations and saves included).
3. nanoGPT's recipe again, given the same wall clock: max_iters (= lr_decay_iters) scaled down to
   the mean gptjax wall clock (nanoGPT's train.py fixes its seed, so it runs once).
Every final model is then evaluated the same way, by gptjax on 200 validation batches of 12 x 64
(`--eval_only`), nanoGPT's `ckpt.pt` loaded as gptjax loads any nanoGPT checkpoint. Prints a
markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_BATCHES = 200


def _host() -> str:
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    import jax
    import torch

    return (f"{model} ({os.cpu_count()} cores); Python {platform.python_version()}, jax {jax.__version__}, "
            f"PyTorch {torch.__version__}")


def nanogpt_recipe(nanogpt: Path, data_dir: Path, out_dir: Path, iters: int = 2000) -> dict:
    flags = [f"--out_dir={out_dir}"]
    if iters != 2000:
        flags += [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}"]
    start = time.perf_counter()
    out = subprocess.run(["bash", str(nanogpt / "run_cpu_recipe.sh"), str(data_dir), *flags],
                         check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - start
    row = json.loads(out.strip().splitlines()[-1])
    return {"impl": f"nanoGPT train.py, {iters} iters", "wall_s": wall, "iters": iters,
            "val_loss_20": row["val_loss"], "ckpt": out_dir / "ckpt.pt"}


def gptjax_modern(data_dir: Path, out_dir: Path, seed: int) -> dict:
    cmd = [sys.executable, "-m", "gptjax.train", "shakespeare_char_cpu_modern", f"--seed={seed}",
           f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - start
    last = [json.loads(line) for line in open(out_dir / "metrics.jsonl") if "val_loss" in line][-1]
    return {"impl": f"gptjax modern, seed {seed}", "wall_s": wall, "iters": last["iter"],
            "val_loss_20": last["val_loss"], "run": out_dir}


def eval_200(init_from: Path, config: str, data_dir: Path) -> float:
    """Validation loss over EVAL_BATCHES batches, gptjax's evaluator, for a run or a ckpt.pt."""
    with tempfile.TemporaryDirectory() as scratch:
        # a nanoGPT checkpoint is evaluated into a scratch run, a gptjax run into itself
        nanogpt = init_from.suffix == ".pt"
        out_dir = Path(scratch) if nanogpt else init_from
        subprocess.run([sys.executable, "-m", "gptjax.train", config, f"--init_from={init_from if nanogpt else 'resume'}",
                        f"--out_dir={out_dir}", "--eval_only=True", f"--eval_iters={EVAL_BATCHES}",
                        f"--data_dir={data_dir}"],
                       check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=ROOT)
        return [json.loads(line) for line in open(out_dir / "metrics.jsonl") if "val_loss" in line][-1]["val_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--nanogpt", type=Path, default=ROOT.parent / "shared" / "nanogpt")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data" / "shakespeare_char")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "modern_vs_nanogpt.md")
    args = parser.parse_args()
    from gptjax.prepare import ensure_dataset

    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    ensure_dataset("shakespeare_char", args.data_dir, corpus if corpus.is_file() else None)
    data_dir = args.data_dir.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        full = nanogpt_recipe(args.nanogpt, data_dir, work / "nanogpt")
        full["val_loss_200"] = eval_200(full["ckpt"], "shakespeare_char_cpu", data_dir)
        rows.append(full)
        print(full, file=sys.stderr)
        ours = []
        for seed in (int(s) for s in args.seeds.split(",")):
            row = gptjax_modern(data_dir, work / f"gptjax-{seed}", seed)
            row["val_loss_200"] = eval_200(row["run"], "shakespeare_char_cpu_modern", data_dir)
            ours.append(row)
            print(row, file=sys.stderr)
        mean_wall = sum(r["wall_s"] for r in ours) / len(ours)
        equal = nanogpt_recipe(args.nanogpt, data_dir, work / "nanogpt-equal", round(2000 * mean_wall / full["wall_s"]))
        equal["val_loss_200"] = eval_200(equal["ckpt"], "shakespeare_char_cpu", data_dir)
        print(equal, file=sys.stderr)
        rows += ours + [equal]

    lines = [f"Host: {_host()}; {time.strftime('%Y-%m-%d')}; command: python benchmarks/modern_vs_nanogpt.py "
             f"--seeds {args.seeds}", "",
             "| run | iters | wall clock s | vs nanoGPT's recipe | val loss (20 batches, in-run) | "
             f"val loss ({EVAL_BATCHES} batches, after) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['iters']} | {r['wall_s']:.1f} | {r['wall_s'] / full['wall_s']:.0%} | "
                     f"{r['val_loss_20']:.4f} | {r['val_loss_200']:.4f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
