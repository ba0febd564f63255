"""Wall-clock and final val loss of a whole training run: gptjax vs nanoGPT's loop in PyTorch.

    python benchmarks/train_vs_nanogpt.py [CONFIG] [--key=value ...] [--out FILE]

Runs `python -m gptjax.train CONFIG ...` as a user would (a subprocess, compile time included),
then, also in a subprocess timed from outside, nanoGPT's train.py loop in PyTorch on the same
data, config and machine: nanoGPT's model
(gptjax.torch_ref), get_batch from the memmaps, AdamW with nanoGPT's parameter groups, its
learning-rate schedule, gradient clipping, and estimate_loss every eval_interval. Prints a table
and writes it (markdown) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gptjax import config as config_lib
from gptjax.data import load_meta
from gptjax.prepare import ensure_dataset
from gptjax.torch_ref import nanogpt_lr


def run_gptjax(argv: list[str], out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "gptjax.train", *argv, f"--out_dir={out_dir}"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    evals = [json.loads(l) for l in open(Path(out_dir) / "metrics.jsonl") if "val_loss" in l]
    return {"impl": "gptjax", "wall_s": wall, "val_loss": evals[-1]["val_loss"], "iter": evals[-1]["iter"],
            "command": " ".join(["python -m gptjax.train", *argv])}


def run_nanogpt_torch(cfg: config_lib.TrainConfig, vocab_size: int) -> dict:
    """nanoGPT's train.py main loop on CPU (float32, no compile, no DDP), as its README's CPU recipe."""
    import torch

    from gptjax import torch_ref

    torch.manual_seed(cfg.seed)
    data_dir = cfg.resolved_data_dir

    def get_batch(split):
        data = np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + cfg.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
        return x, y

    model = torch_ref.GPT(torch_ref.GPTConfig(
        block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    X, Y = get_batch("train")
    iter_num, val_loss = 0, math.nan
    while True:
        lr = nanogpt_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg.eval_interval == 0:
            val_loss = estimate_loss()["val"]
        if iter_num >= cfg.max_iters:
            break
        for _ in range(cfg.gradient_accumulation_steps):
            _, loss = model(X, Y)
            loss = loss / cfg.gradient_accumulation_steps
            X, Y = get_batch("train")
            loss.backward()
        if cfg.grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % cfg.log_interval == 0:
            loss.item()  # nanoGPT reads the loss every log_interval: a sync point
        iter_num += 1
    return {"impl": "nanoGPT loop, PyTorch eager", "val_loss": val_loss, "iter": iter_num, "command": "(its own process, same config)"}


def run_nanogpt_subprocess(argv: list[str]) -> dict:
    """The PyTorch loop in its own process, timed from outside like the gptjax run: interpreter
    start, imports and data loading count for both."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--torch-loop-only", *argv], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/train_vs_nanogpt.md")
    parser.add_argument("--torch-loop-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args, rest = parser.parse_known_args(argv)
    rest = rest or ["shakespeare_char_cpu"]
    cfg = config_lib.parse_args(rest)
    ensure_dataset(cfg.dataset, cfg.resolved_data_dir, cfg.data_input or None)
    meta = load_meta(cfg.resolved_data_dir)
    vocab_size = cfg.vocab_size or (meta["vocab_size"] if meta else 50304)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.torch_loop_only:  # the child below: print the result for the parent
        print(json.dumps(run_nanogpt_torch(cfg, vocab_size)))
        return 0
    out_dir = f"/tmp/gptjax-bench-{os.getpid()}"
    rows = [run_gptjax(rest, out_dir), run_nanogpt_subprocess(sys.argv[1:] if argv is None else argv)]
    lines = ["| impl | wall-clock s | val loss | at iter |", "|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['wall_s']:.1f} | {r['val_loss']:.4f} | {r['iter']} |" for r in rows]
    lines.append(f"\nnanoGPT-loop wall / gptjax wall: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x")
    lines.append(f"command: python benchmarks/train_vs_nanogpt.py {' '.join(rest)}")
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
