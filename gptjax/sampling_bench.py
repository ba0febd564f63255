"""Sampling speed, for `python -m gptjax.bench --sample=N`: gptjax's KV-cache `generate` against
full recomputation, nanoGPT's algorithm, both in gptjax (`generate_recompute`, also the reference
the KV cache is tested against) and in PyTorch (nanoGPT's own `generate`), and against
transformers' `generate` with its KV cache, at batch 1 and 8."""

from __future__ import annotations

import functools
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gptjax import kernels as kernels_lib
from gptjax.bench import Row, say
from gptjax.config import TrainConfig
from gptjax.generate import Sampling, _check, generate, generate_stream, sample_logits
from gptjax.kernels import Kernels
from gptjax.model import GPT, GPTConfig, init_params
from gptjax.torch_bench import torch_device, torch_setup


@functools.partial(jax.jit, static_argnames=("model",))
def _recompute_step(params, ctx_BxW, last, key, sampling: Sampling, *, model: GPT):
    logits_BxV = model.apply({"params": params}, ctx_BxW, logits_at=jnp.full((ctx_BxW.shape[0],), last))
    return sample_logits(logits_BxV, key, sampling)


def _bucket_width(L: int, bucket: int, block_size: int) -> int:
    return min(-(-L // bucket) * bucket, block_size)


def generate_recompute(
    params, cfg: GPTConfig, prompt_tokens, key, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, vocab_limit: int | None = None,
    bucket: int = 16, progress: bool = False, kernels: Kernels | None = None,
) -> np.ndarray:
    """nanoGPT's generate, the reference: every token from a full forward (no cache) over the
    context cropped to its last block_size tokens, one jitted call per token. Equal-length prompts
    only. The context is right-padded to a multiple of `bucket` so only ~block_size/bucket shapes
    compile; causal attention keeps the padding from reaching the last real token. progress: a
    progress bar on stderr."""
    _, _, sampling = _check(cfg, prompt_tokens, max_new_tokens, temperature, top_k, top_p, vocab_limit, None)
    model = GPT(cfg, kernels or Kernels())
    ctx_BxT = np.asarray(prompt_tokens, np.int32)  # uncropped, as nanoGPT's idx
    T0 = ctx_BxT.shape[1]
    for t in tqdm(range(max_new_tokens), desc="gptjax recompute", unit="tok", disable=not progress, file=sys.stderr):
        cond_BxL = ctx_BxT[:, -cfg.block_size:]
        L = cond_BxL.shape[1]
        win_BxW = np.pad(cond_BxL, ((0, 0), (0, _bucket_width(L, bucket, cfg.block_size) - L)))
        tok_B = _recompute_step(params, win_BxW, L - 1, jax.random.fold_in(key, t), sampling, model=model)
        ctx_BxT = np.concatenate([ctx_BxT, np.asarray(tok_B)[:, None]], axis=1)
    return ctx_BxT[:, T0:]


def median_seconds(run: Callable[[], object], rounds: int) -> float:
    """The median wall-clock seconds of `rounds` calls of run()."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def benchmark_sampling(cfg: GPTConfig, params, prompt_len: int, new_tokens: int, batch: int,
                       temperature: float = 0.8, top_k: int | None = 200, bucket: int = 16,
                       progress: Callable[[str], None] | None = None, recompute: bool = True,
                       rounds: int = 1) -> dict:
    """Tokens/s of `generate` (KV cache) and, with `recompute`, `generate_recompute` (nanoGPT)
    after compiling both (compile seconds reported apart), each the median of `rounds` runs.
    params=None: random weights (speed does not depend on them). progress: called with a line
    naming each phase, which also turns on progress bars."""
    say = progress or (lambda message: None)
    params = init_params(cfg, jax.random.PRNGKey(0)) if params is None else params
    kernels = kernels_lib.for_inference(cfg)
    model = GPT(cfg, kernels)
    prompt_BxT = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (batch, prompt_len), 0, cfg.vocab_size))
    key = jax.random.PRNGKey(2)
    kw = dict(temperature=temperature, top_k=top_k)

    say(f"sampling {new_tokens} tokens at batch {batch}: compiling gptjax's KV-cache loop")
    t0 = time.perf_counter()  # compile: the cached loop, run for the prefill and one cached step
    next(generate_stream(params, cfg, prompt_BxT, key, new_tokens, chunk_size=2, kernels=kernels, **kw))
    cache_compile_s = time.perf_counter() - t0
    say(f"sampling {new_tokens} tokens at batch {batch}: gptjax KV cache (one compiled loop), {rounds} rounds")
    cache_s = median_seconds(
        lambda: jax.block_until_ready(generate(params, cfg, prompt_BxT, key, new_tokens, kernels=kernels, **kw)), rounds)
    n = batch * new_tokens
    result = dict(cache_tokens_per_s=n / cache_s, cache_s=cache_s, cache_compile_s=cache_compile_s)
    if not recompute:
        return result
    t0 = time.perf_counter()  # the reference: once per context width it will meet
    _, _, sampling = _check(cfg, prompt_BxT, new_tokens, temperature, top_k, None, None, None)
    prompt_len = min(prompt_len, cfg.block_size)
    widths = sorted({_bucket_width(min(prompt_len + t, cfg.block_size), bucket, cfg.block_size)
                     for t in range(new_tokens)})
    for W in tqdm(widths, desc="compiling recompute widths", disable=progress is None, file=sys.stderr):
        ctx_BxW = np.zeros((batch, W), np.int32)
        jax.block_until_ready(_recompute_step(params, ctx_BxW, W - 1, key, sampling, model=model))
    recompute_compile_s = time.perf_counter() - t0
    say(f"sampling {new_tokens} tokens: gptjax full recomputation (nanoGPT's algorithm), {rounds} rounds")
    recompute_s = median_seconds(
        lambda: generate_recompute(params, cfg, prompt_BxT, key, new_tokens, bucket=bucket,
                                   progress=progress is not None, kernels=kernels, **kw), rounds)
    return {**result, "recompute_tokens_per_s": n / recompute_s, "speedup": recompute_s / cache_s,
            "recompute_s": recompute_s, "recompute_compile_s": recompute_compile_s}


def hf_generate(cfg: GPTConfig, batch: int, new_tokens: int, temperature: float = 0.8, top_k: int = 200,
                rounds: int = 1) -> dict:
    """Tokens/s of transformers' GPT2LMHeadModel.generate with its KV cache (PyTorch, CPU threads as
    it sets them), on a random model of cfg's size, sampling as gptjax's rows do; the median of
    `rounds` runs after a warm-up."""
    import torch
    import transformers

    hf_cfg = transformers.GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     n_positions=cfg.block_size, vocab_size=cfg.vocab_size, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    idx = torch.zeros((batch, 1), dtype=torch.long)
    kw = dict(do_sample=True, temperature=temperature, top_k=top_k, use_cache=True, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(idx, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        warm_s = time.perf_counter() - t0

        def run():
            out = model.generate(idx, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            assert out.shape == (batch, new_tokens + 1), out.shape

        dt = median_seconds(run, rounds)
    return dict(tokens_per_s=batch * new_tokens / dt, warm_s=warm_s)


def bench_sampling(cfg: TrainConfig, name: str, vocab_size: int, new_tokens: int, compare_torch: bool,
                   rounds: int = 1) -> list[Row]:
    """Tokens/s of generated tokens at batch 1: KV cache vs full recomputation (and PyTorch's); with
    compare_torch also at batch 8 against transformers' generate. Each row is the median of
    `rounds` runs, gptjax's all before PyTorch is imported."""
    model_cfg = cfg.model_config(vocab_size)
    params = init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
    result = benchmark_sampling(model_cfg, params, prompt_len=1, new_tokens=new_tokens, batch=1, progress=say,
                                rounds=rounds)
    rows = [
        Row("gptjax-sample-cache", name, 1e3 / result["cache_tokens_per_s"], result["cache_tokens_per_s"],
            float("nan"), result.get("cache_compile_s", float("nan"))),
        Row("gptjax-sample-recompute", name, 1e3 / result["recompute_tokens_per_s"],
            result["recompute_tokens_per_s"], float("nan"), result.get("recompute_compile_s", float("nan"))),
    ]
    if compare_torch:
        from gptjax import torch_ref

        batched = benchmark_sampling(model_cfg, params, prompt_len=1, new_tokens=new_tokens, batch=8, progress=say,
                                     recompute=False, rounds=rounds)
        rows.append(Row("gptjax-sample-cache-b8", name, 1e3 / batched["cache_tokens_per_s"],
                        batched["cache_tokens_per_s"], float("nan"), batched["cache_compile_s"]))
        for batch in (1, 8):
            say(f"sampling {new_tokens} tokens at batch {batch}: transformers' generate with its KV cache")
            hf = hf_generate(model_cfg, batch, new_tokens, rounds=rounds)
            rows.append(Row("hf-generate" + ("-b8" if batch == 8 else ""), name, 1e3 / hf["tokens_per_s"],
                            hf["tokens_per_s"], float("nan"), hf["warm_s"]))

        device = torch_device()
        torch, autocast = torch_setup(cfg, device)
        torch.manual_seed(cfg.seed)
        model = torch_ref.GPT(torch_ref.GPTConfig(
            block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)).eval().to(device)

        def nanogpt_generate():
            idx = torch.zeros((1, 1), dtype=torch.long, device=device)
            with tqdm(total=new_tokens, desc="torch recompute", unit="tok", file=sys.stderr) as bar:
                # in chunks for the progress bar: generate continues from the context it is given,
                # so this samples as one call would
                while bar.n < new_tokens:
                    chunk = min(max(new_tokens // 20, 1), new_tokens - bar.n)
                    idx = model.generate(idx, chunk, top_k=200)
                    bar.update(chunk)
            if device == "cuda":
                torch.cuda.synchronize()

        say(f"sampling {new_tokens} tokens: PyTorch (nanoGPT's generate, full recomputation), {rounds} rounds")
        with autocast:
            model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), 8)  # warm-up
            dt = median_seconds(nanogpt_generate, rounds) / new_tokens
        rows.append(Row("torch-sample-recompute", name, dt * 1e3, 1 / dt, float("nan"), 0.0))
    return rows
