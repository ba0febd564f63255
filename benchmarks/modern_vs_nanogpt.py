"""Time to quality: gptjax's modern recipe against nanoGPT's own CPU recipe, as whole processes.

    python benchmarks/modern_vs_nanogpt.py [--seeds 1337,1,2] [--nanogpt ../shared/nanogpt] \
        [--data_dir data/shakespeare_char] [--out docs/bench/modern_vs_nanogpt.md]

1. nanoGPT's README CPU recipe with nanoGPT's real train.py (from --nanogpt: 2000 iterations),
   timed from outside (`peers.nanogpt_cpu_recipe`).
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
import sys
import tempfile
import time
from pathlib import Path

from peers import (EVAL_BATCHES, eval_200, gptjax_recipe, host, nanogpt_cpu_recipe, peer_arguments, publish,
                   shakespeare_char)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1337,1,2")
    peer_arguments(parser, "modern_vs_nanogpt.md")
    args = parser.parse_args()
    data_dir = shakespeare_char(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        full = nanogpt_cpu_recipe(args.nanogpt, data_dir, work / "nanogpt")
        full["val_loss_200"] = eval_200(full["ckpt"], "shakespeare_char_cpu", data_dir)
        rows.append(full)
        print(full, file=sys.stderr)
        ours = []
        for seed in (int(s) for s in args.seeds.split(",")):
            row = gptjax_recipe("shakespeare_char_cpu_modern", data_dir, work / f"gptjax-{seed}", f"--seed={seed}")
            row["val_loss_200"] = eval_200(row["run"], "shakespeare_char_cpu_modern", data_dir)
            ours.append(row)
            print(row, file=sys.stderr)
        mean_wall = sum(r["wall_s"] for r in ours) / len(ours)
        equal = nanogpt_cpu_recipe(args.nanogpt, data_dir, work / "nanogpt-equal", round(2000 * mean_wall / full["wall_s"]))
        equal["val_loss_200"] = eval_200(equal["ckpt"], "shakespeare_char_cpu", data_dir)
        print(equal, file=sys.stderr)
        rows += ours + [equal]

    lines = [f"Host: {host()}; {time.strftime('%Y-%m-%d')}; command: python benchmarks/modern_vs_nanogpt.py "
             f"--seeds {args.seeds}", "",
             "| run | iters | wall clock s | vs nanoGPT's recipe | val loss (20 batches, in-run) | "
             f"val loss ({EVAL_BATCHES} batches, after) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['iters']} | {r['wall_s']:.1f} | {r['wall_s'] / full['wall_s']:.0%} | "
                     f"{r['val_loss_20']:.4f} | {r['val_loss_200']:.4f} |")
    table = "\n".join(lines)
    publish(table, args.out)


if __name__ == "__main__":
    main()
