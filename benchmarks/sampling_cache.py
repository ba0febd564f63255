"""Tokens/s of KV-cache sampling (`gptjax.generate.generate`) for each cache block size, in
alternating rounds in one process (random weights: the speed does not depend on them).

    python benchmarks/sampling_cache.py [--model gpt2|shakespeare_char] [--new-tokens 500]
        [--buckets 0,64,128,256] [--rounds 2] [--out FILE]

A bucket of 0 holds the cache in one block, read whole every step; B > 0 holds it in blocks of B
positions, of which each step reads those up to the one that holds its position
(`gptjax.kvcache`, `gptjax.attention.cached_attention`). Prints a table and writes it
(markdown) to --out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from gptjax import generate as G
from gptjax.model import GPTConfig, init_params

MODELS = {
    "gpt2": GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768),
    "shakespeare_char": GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384),
}


def tokens_per_s(params, cfg: GPTConfig, bucket: int, new_tokens: int) -> float:
    prompt = np.zeros((1, 1), np.int32)
    start = time.perf_counter()
    jax.block_until_ready(G.generate(params, cfg, prompt, jax.random.PRNGKey(0), new_tokens,
                                     temperature=0.8, top_k=200, key_bucket=bucket))
    return new_tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--buckets", default="0,64,128,256", help="comma-separated block sizes (0: the whole cache in one block)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args()
    cfg = MODELS[args.model]
    buckets = [int(b) for b in args.buckets.split(",")]
    params = init_params(cfg, jax.random.PRNGKey(0))
    for bucket in buckets:  # compile every variant (shapes depend on new_tokens) before timing any
        tokens_per_s(params, cfg, bucket, args.new_tokens)
    rates = {b: [] for b in buckets}
    for _ in range(args.rounds):
        for bucket in buckets:
            rates[bucket].append(tokens_per_s(params, cfg, bucket, args.new_tokens))
    lines = [f"{args.model}, {args.new_tokens} new tokens, batch 1, {jax.devices()[0].device_kind}",
             "", "| cache block (rows) | tokens/s per round | median |", "|---|---|---|"]
    for bucket, r in rates.items():
        name = "whole cache" if bucket == 0 else str(bucket) + (" (default)" if bucket == G.default_key_bucket(cfg) else "")
        lines.append(f"| {name} | {' / '.join(f'{x:.1f}' for x in r)} | {statistics.median(r):.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
