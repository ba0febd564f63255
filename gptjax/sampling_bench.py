"""Sampling speed, for `python -m gptjax.bench --sample=N`: gptjax's KV-cache `generate` against
full recomputation, nanoGPT's algorithm, both in gptjax (`generate_recompute`, also the reference
the KV cache is tested against) and in PyTorch (nanoGPT's own `generate`), and against
transformers' `generate` with its KV cache, at batch 1 and 8."""

from __future__ import annotations

import functools
import sys
import time
from typing import Callable, NamedTuple

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


def alternating_runs(runs: dict[str, Callable[[], object]], rounds: int,
                     before: Callable[[str, int], None] = lambda name, r: None) -> dict[str, list[float]]:
    """The wall-clock seconds of each run in each of `rounds` rounds in which the runs take turns
    (in reverse order every other round), so that the host's drift during a benchmark falls on
    each of them alike. before(name, round): called before each run."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            before(name, r)
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def alternating_seconds(runs: dict[str, Callable[[], object]], rounds: int,
                        before: Callable[[str, int], None] = lambda name, r: None) -> dict[str, float]:
    """The median of each run's seconds in `alternating_runs`."""
    return {name: float(np.median(s)) for name, s in alternating_runs(runs, rounds, before).items()}


class Timed(NamedTuple):
    """One row's run, ready to be timed: compiled or warmed up already."""

    run: Callable[[], object]
    warm_s: float  # seconds its compilation or warm-up took
    label: str  # what it times, for the progress lines
    batch: int


def _gptjax_runs(cfg: GPTConfig, params, batch: int, prompt_len: int, new_tokens: int, recompute: bool,
                 say: Callable[[str], None], progress: bool, temperature: float = 0.8, top_k: int | None = 200,
                 bucket: int = 16) -> dict[str, Timed]:
    """{'cache': `generate` on the KV cache[, 'recompute': `generate_recompute`]} on one random
    prompt, each compiled first: the cache for its prefill and a cached step, the recomputation for
    every context width it will meet. progress: progress bars for the token-by-token loop."""
    kernels = kernels_lib.for_inference(cfg)
    prompt_BxT = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (batch, prompt_len), 0, cfg.vocab_size))
    key = jax.random.PRNGKey(2)
    kw = dict(temperature=temperature, top_k=top_k)
    label = f"sampling {new_tokens} tokens at batch {batch}: gptjax KV cache (one compiled loop)"
    say(f"{label}: compiling")
    t0 = time.perf_counter()
    next(generate_stream(params, cfg, prompt_BxT, key, new_tokens, chunk_size=2, kernels=kernels, **kw))
    runs = {"cache": Timed(
        lambda: jax.block_until_ready(generate(params, cfg, prompt_BxT, key, new_tokens, kernels=kernels, **kw)),
        time.perf_counter() - t0, label, batch)}
    if not recompute:
        return runs
    label = f"sampling {new_tokens} tokens: gptjax full recomputation (nanoGPT's algorithm)"
    say(f"{label}: compiling")
    t0 = time.perf_counter()
    _, _, sampling = _check(cfg, prompt_BxT, new_tokens, temperature, top_k, None, None, None)
    model = GPT(cfg, kernels)
    first = min(prompt_len, cfg.block_size)
    widths = sorted({_bucket_width(min(first + t, cfg.block_size), bucket, cfg.block_size) for t in range(new_tokens)})
    for W in tqdm(widths, desc="compiling recompute widths", disable=not progress, file=sys.stderr):
        ctx_BxW = np.zeros((batch, W), np.int32)
        jax.block_until_ready(_recompute_step(params, ctx_BxW, W - 1, key, sampling, model=model))
    runs["recompute"] = Timed(
        lambda: generate_recompute(params, cfg, prompt_BxT, key, new_tokens, bucket=bucket, progress=progress,
                                   kernels=kernels, **kw), time.perf_counter() - t0, label, batch)
    return runs


def _time_in_turns(timed: dict[str, Timed], rounds: int, say: Callable[[str], None]) -> dict[str, float]:
    """alternating_seconds of the runs, each named on the progress line as it starts."""
    return alternating_seconds({name: t.run for name, t in timed.items()}, rounds,
                               lambda name, r: say(f"{timed[name].label}, round {r + 1}/{rounds}"))


def benchmark_sampling(cfg: GPTConfig, params, prompt_len: int, new_tokens: int, batch: int,
                       temperature: float = 0.8, top_k: int | None = 200, bucket: int = 16,
                       progress: Callable[[str], None] | None = None, recompute: bool = True,
                       rounds: int = 1) -> dict:
    """Tokens/s of `generate` (KV cache) and, with `recompute`, `generate_recompute` (nanoGPT)
    after compiling both (compile seconds reported apart), each the median of `rounds` runs taken
    in turns. params=None: random weights (speed does not depend on them). progress: called with a
    line naming each phase, which also turns on progress bars."""
    say = progress or (lambda message: None)
    params = init_params(cfg, jax.random.PRNGKey(0)) if params is None else params
    runs = _gptjax_runs(cfg, params, batch, prompt_len, new_tokens, recompute, say, progress is not None,
                        temperature, top_k, bucket)
    seconds = _time_in_turns(runs, rounds, say)
    n = batch * new_tokens
    result = dict(cache_tokens_per_s=n / seconds["cache"], cache_s=seconds["cache"],
                  cache_compile_s=runs["cache"].warm_s)
    if recompute:
        result.update(recompute_tokens_per_s=n / seconds["recompute"], recompute_s=seconds["recompute"],
                      recompute_compile_s=runs["recompute"].warm_s, speedup=seconds["recompute"] / seconds["cache"])
    return result


def _hf_run(cfg: GPTConfig, batch: int, new_tokens: int, say: Callable[[str], None], temperature: float = 0.8,
            top_k: int = 200) -> Timed:
    """transformers' GPT2LMHeadModel.generate with its KV cache (PyTorch, CPU threads as it sets
    them) on a random model of cfg's size, sampling as gptjax's rows do, warmed up."""
    label = f"sampling {new_tokens} tokens at batch {batch}: transformers' generate with its KV cache"
    say(f"{label}: warming up")
    import torch
    import transformers

    hf_cfg = transformers.GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     n_positions=cfg.block_size, vocab_size=cfg.vocab_size, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    idx = torch.zeros((batch, 1), dtype=torch.long)
    kw = dict(do_sample=True, temperature=temperature, top_k=top_k, use_cache=True, pad_token_id=0)

    def run(max_new_tokens=new_tokens):
        with torch.inference_mode():
            out = model.generate(idx, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
        assert out.shape == (batch, max_new_tokens + 1), out.shape

    t0 = time.perf_counter()
    run(8)
    return Timed(run, time.perf_counter() - t0, label, batch)


def _nanogpt_run(cfg: TrainConfig, vocab_size: int, new_tokens: int, say: Callable[[str], None]) -> Timed:
    """nanoGPT's own `generate` (full recomputation) at batch 1, warmed up."""
    from gptjax import torch_ref

    label = f"sampling {new_tokens} tokens: PyTorch (nanoGPT's generate, full recomputation)"
    say(f"{label}: warming up")

    device = torch_device()
    torch, autocast = torch_setup(cfg, device)
    torch.manual_seed(cfg.seed)
    model = torch_ref.GPT(torch_ref.GPTConfig(
        block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, dropout=0.0, bias=cfg.bias)).eval().to(device)

    def run():
        idx = torch.zeros((1, 1), dtype=torch.long, device=device)
        with autocast, tqdm(total=new_tokens, desc="torch recompute", unit="tok", file=sys.stderr) as bar:
            # in chunks for the progress bar: generate continues from the context it is given, so
            # this samples as one call would
            while bar.n < new_tokens:
                chunk = min(max(new_tokens // 20, 1), new_tokens - bar.n)
                idx = model.generate(idx, chunk, top_k=200)
                bar.update(chunk)
        if device == "cuda":
            torch.cuda.synchronize()

    with autocast:
        model.generate(torch.zeros((1, 1), dtype=torch.long, device=device), 8)  # warm-up
    return Timed(run, 0.0, label, 1)


def bench_sampling(cfg: TrainConfig, name: str, vocab_size: int, new_tokens: int, compare_torch: bool,
                   rounds: int = 1) -> list[Row]:
    """Tokens/s of generated tokens at batch 1: KV cache vs full recomputation (and PyTorch's); with
    compare_torch also at batch 8 against transformers' generate. Every run is compiled or warmed
    up first, then all take turns for `rounds` rounds; each row is the median of its runs."""
    model_cfg = cfg.model_config(vocab_size)
    params = init_params(model_cfg, jax.random.PRNGKey(cfg.seed))
    one = _gptjax_runs(model_cfg, params, 1, 1, new_tokens, True, say, progress=True)
    timed = {"gptjax-sample-cache": one["cache"], "gptjax-sample-recompute": one["recompute"]}
    if compare_torch:
        timed["gptjax-sample-cache-b8"] = _gptjax_runs(model_cfg, params, 8, 1, new_tokens, False, say, True)["cache"]
        timed["hf-generate"] = _hf_run(model_cfg, 1, new_tokens, say)
        timed["hf-generate-b8"] = _hf_run(model_cfg, 8, new_tokens, say)
        timed["torch-sample-recompute"] = _nanogpt_run(cfg, vocab_size, new_tokens, say)
    seconds = _time_in_turns(timed, rounds, say)
    rows = []
    for impl, t in timed.items():
        tokens_per_s = t.batch * new_tokens / seconds[impl]
        rows.append(Row(impl, name, 1e3 / tokens_per_s, tokens_per_s, float("nan"), t.warm_s))
    return rows
