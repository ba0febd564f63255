"""The README's main job against nanoGPT's own train.py: whole processes, wall clock and final loss.

    python benchmarks/train_vs_nanogpt.py [--rounds 2] [--nanogpt ../shared/nanogpt] \
        [--data_dir data/shakespeare_char] [--out docs/bench/train_vs_nanogpt.md]

Each round runs `python -m gptjax.train shakespeare_char_cpu` and nanoGPT's unmodified train.py on
its README's CPU recipe (the same model, data and schedule; `peers.nanogpt_cpu_recipe`), in
alternating order, each timed from outside: interpreter start, imports, data loading, compilation,
evaluations and saves count for both. gptjax's compilation cache starts empty, so round 1 compiles
everything (a user's first run) and later rounds start from the programs it kept (every run after);
the host's measured choices (`python -m gptjax.bench shakespeare_char_cpu --vocab_size=65 --tune`'s
record, if one was made) are carried over, and each row names the dot library its run took.
Each row also splits its wall clock: the median of the run's logged step times, and what the
run spent besides `iters` steps at that median (start-up, compilation, evaluations, saves, and the
steps slower than the median). Both final models are then evaluated the same way, by gptjax on 200
validation batches. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from peers import (EVAL_BATCHES, eval_200, gptjax_recipe, host, nanogpt_cpu_recipe, peer_arguments, publish,
                   shakespeare_char)


def table(rows: list[dict], command: str) -> str:
    base = [r for r in rows if r["impl"].startswith("nanoGPT")]
    mean_nanogpt = sum(r["wall_s"] for r in base) / len(base)
    lines = [f"Host: {host()}; {time.strftime('%Y-%m-%d')}; command: {command}", "",
             "| round | run | iters | wall clock s | nanoGPT's mean wall / this | median step ms | "
             "wall - iters x median step s | val loss (20 batches, in-run) | "
             f"val loss ({EVAL_BATCHES} batches, after) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['round']} | {r['impl']} | {r['iters']} | {r['wall_s']:.1f} | "
                     f"{mean_nanogpt / r['wall_s']:.2f}x | {r['step_ms']:.1f} | "
                     f"{r['wall_s'] - r['iters'] * r['step_ms'] / 1e3:.1f} | {r['val_loss_20']:.4f} | {r['val_loss_200']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    peer_arguments(parser, "train_vs_nanogpt.md")
    args = parser.parse_args()
    data_dir = shakespeare_char(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for k in range(args.rounds):
            runs = [lambda: nanogpt_cpu_recipe(args.nanogpt, data_dir, work / f"nanogpt-{k}"),
                    lambda: gptjax_recipe("shakespeare_char_cpu", data_dir, work / f"gptjax-{k}", cache_dir=work / "cache")]
            for run in runs if k % 2 else runs[::-1]:  # alternate which goes first
                row = run()
                row["round"] = k + 1
                if "run" in row:
                    row["impl"] += " (compilation cache " + ("empty)" if k == 0 else "from round 1)")
                row["val_loss_200"] = eval_200(row.get("ckpt") or row["run"], "shakespeare_char_cpu", data_dir)
                rows.append(row)
                print(row, file=sys.stderr)
    text = table(rows, f"python benchmarks/train_vs_nanogpt.py --rounds {args.rounds}")
    publish(text, args.out)


if __name__ == "__main__":
    main()
