"""Autoregressive sampling: nanoGPT's `generate` on a KV cache, in one compiled loop.

Each call runs `_decode`, a `lax.while_loop` that samples one token per step (step t with key
fold_in(key, t)); `generate_stream` runs the same compiled loop chunk by chunk, carrying its state,
so streamed tokens are exactly `generate`'s. Both call the model's one forward (`GPT.__call__`)
with a KV cache.

Layout. Each row's context lives in `ctx_BxM` (M = prompt length + max_new_tokens) right-padded:
its prompt at 0..len_b-1, then its sampled tokens. Unequal prompts arrive left-padded with
`prompt_lengths` (the usual convention) and are moved to the start of their row, so a row's
tokens sit at the positions they would have alone; padding only ever follows a row's last token,
where the causal mask hides it. Equal rows share one cache position per step; unequal ones each
feed the cache at their own position (the cache's per-row `pos`).

Context longer than block_size, as nanoGPT: the model sees only the last block_size tokens, at
positions 0..block_size-1. While a row's context fits, a step feeds one token into the cache.
Past that, every token's position shifts by one per step, so no cached key/value stays valid: each
such step recomputes the cropped window from scratch (inside the same loop), exactly as nanoGPT
and as expensively. Prompts longer than block_size are cropped to their last block_size tokens up
front, which changes nothing since the model never sees more.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from gptjax.kernels import Kernels
from gptjax.kvcache import KVCache, init_cache
from gptjax.model import GPT, GPTConfig

# The cache's blocks (init_cache's key_bucket): at least MIN_BLOCK positions each (64 read faster
# than 128 at batch 8), and at most MAX_BLOCKS of them: the attention's switch compiles one branch
# per number of blocks read, so compile time grows with the square of their number (GPT-2's 1024
# positions in 16 blocks: a first call ~2.6x as long as in 8, for the same speed; docs/benchmarks.md)
MIN_BLOCK, MAX_BLOCKS = 64, 8


def default_key_bucket(cfg: GPTConfig) -> int:
    """The cache block size `generate` uses unless told: MIN_BLOCK, or block_size / MAX_BLOCKS."""
    return max(MIN_BLOCK, -(-cfg.block_size // MAX_BLOCKS))


@struct.dataclass
class Sampling:
    """How each token is picked from the logits: a pytree of traced values, so every setting
    reuses the compiled loop. None switches a filter off."""

    temperature: float | jax.Array = 1.0  # 0 means greedy (argmax)
    top_k: int | jax.Array | None = None  # keep the k most likely (ties at the k-th all kept: nanoGPT)
    top_p: float | jax.Array | None = None  # nucleus: the smallest set with probability >= top_p
    vocab_limit: int | jax.Array | None = None  # ids >= vocab_limit (padding) are never sampled


def default_vocab_limit(cfg: GPTConfig) -> int:
    """GPT-2's 50257 real tokens when the vocab is nanoGPT's padded 50304, else the whole vocab."""
    return 50257 if cfg.vocab_size == 50304 else cfg.vocab_size


def _kth_largest(x_BxV: jax.Array, k) -> jax.Array:
    """Each row's k-th largest value (B, 1), exactly, by building its bits from the top: 32 passes of
    compare-and-count. lax.top_k inside a compiled loop sorts the row on CPU, ~20x slower at V=50k."""
    bits_BxV = jax.lax.bitcast_convert_type(x_BxV.astype(jnp.float32), jnp.uint32)
    # an order-preserving map of float32 onto uint32: negatives get all bits flipped, others the sign
    u_BxV = jnp.where(bits_BxV >> 31 == 1, ~bits_BxV, bits_BxV | jnp.uint32(1 << 31))

    def set_bit(i, ans_Bx1):  # keep bit 31-i if at least k values are >= the answer with it set
        cand_Bx1 = ans_Bx1 | (jnp.uint32(1 << 31) >> i.astype(jnp.uint32))
        return jnp.where(jnp.sum(u_BxV >= cand_Bx1, -1, keepdims=True) >= k, cand_Bx1, ans_Bx1)

    ans_Bx1 = jax.lax.fori_loop(0, 32, set_bit, jnp.zeros((x_BxV.shape[0], 1), jnp.uint32))
    bits_Bx1 = jnp.where(ans_Bx1 >> 31 == 1, ans_Bx1 & jnp.uint32(0x7FFFFFFF), ~ans_Bx1)
    return jax.lax.bitcast_convert_type(bits_Bx1, jnp.float32)


def filter_logits(logits_BxV: jax.Array, s: Sampling) -> jax.Array:
    """Logits scaled by 1/temperature with everything outside vocab_limit, top-k and top-p at -inf
    (temperature must be > 0 here). Conds, not Python ifs: top_k and top_p are traced, and a filter
    that is off (top_k >= V, top_p = 1) costs nothing at run time."""
    V = logits_BxV.shape[-1]
    if s.vocab_limit is not None:
        logits_BxV = jnp.where(jnp.arange(V) < s.vocab_limit, logits_BxV, -jnp.inf)
    logits_BxV = logits_BxV / s.temperature

    def top_k(logits_BxV):
        return jnp.where(logits_BxV < _kth_largest(logits_BxV, s.top_k), -jnp.inf, logits_BxV)

    def nucleus(logits_BxV):
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # probability mass strictly before each token; the top token (mass 0) is always kept
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        before_BxV = before_BxV.at[:, 0].set(0.0)
        cutoff_Bx1 = jnp.min(jnp.where(before_BxV < s.top_p, sorted_BxV, jnp.inf), -1, keepdims=True)
        return jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)

    if s.top_k is not None:
        logits_BxV = jax.lax.cond(s.top_k < V, top_k, lambda x: x, logits_BxV)
    if s.top_p is not None:
        logits_BxV = jax.lax.cond(s.top_p < 1, nucleus, lambda x: x, logits_BxV)
    return logits_BxV


def sample_logits(logits_BxV: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """One token id per row (int32): argmax when temperature is 0, else a draw from filter_logits."""
    greedy = s.temperature == 0  # traced: greedy and sampled runs share one compilation
    logits_BxV = filter_logits(logits_BxV, s.replace(temperature=jnp.where(greedy, 1.0, s.temperature)))
    # a cond, so that greedy steps skip the draw: its noise over the vocabulary costs as much as
    # a large share of a decode step
    return jax.lax.cond(greedy, lambda: jnp.argmax(logits_BxV, -1),
                        lambda: jax.random.categorical(key, logits_BxV, axis=-1)).astype(jnp.int32)


def _window_logits(model: GPT, params, ctx_BxM, L_B, W: int, kv):
    """Logits after each row's first L_b tokens, seen as nanoGPT's cropped context: the last W (or
    all L_b) of them recomputed from scratch at positions 0..., the head applied only at each row's
    last token. Also returns the cache it filled, valid for the rows with L_b <= W, laid out as
    `kv` (a cache's arrays, whose values it does not read)."""
    start_B = jnp.maximum(L_B - W, 0)
    win_BxW = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (W,)))(ctx_BxM, start_B)
    cache = KVCache(kv=jax.tree_util.tree_map(jnp.zeros_like, kv))
    logits_BxV, cache = model.apply({"params": params}, win_BxW, cache=cache, logits_at=jnp.minimum(L_B, W) - 1)
    return logits_BxV, cache.kv


class _State(NamedTuple):
    t: jax.Array  # tokens sampled so far (the same for every row)
    ctx_BxM: jax.Array  # prompt then sampled tokens, right-padded per row
    len_B: jax.Array  # prompt length per row
    out_BxN: jax.Array  # the sampled tokens; stop_token (or 0) after a row stops
    done_B: jax.Array  # the row has emitted stop_token
    kv: object  # the KV cache's arrays (KVCache.kv)


def _cache_length(cfg: GPTConfig, M: int) -> int:
    """The cache of a loop whose contexts reach M - 1 tokens: as long as they get, or a whole block
    once they outgrow it (the recomputed windows fill it). Its zeros, copies and writes then cost
    what the generation needs, not block_size positions."""
    return min(M, cfg.block_size)


def _start(cfg: GPTConfig, prompt_BxT: np.ndarray, len_B: np.ndarray, max_new_tokens: int, stop,
           key_bucket: int) -> _State:
    """The loop's initial state: left-padded prompts moved to the start of each row's context."""
    B, T = prompt_BxT.shape
    M = T + max_new_tokens
    ctx_BxM = np.zeros((B, M), np.int32)
    for b, n in enumerate(len_B):
        ctx_BxM[b, :n] = prompt_BxT[b, T - n :]
    return _State(
        t=jnp.int32(0),
        ctx_BxM=jnp.asarray(ctx_BxM),
        len_B=jnp.asarray(len_B),
        out_BxN=jnp.full((B, max_new_tokens), max(stop, 0), jnp.int32),
        done_B=jnp.zeros((B,), bool),
        kv=init_cache(cfg, B, length=_cache_length(cfg, M), key_bucket=key_bucket).kv,
    )


# the state donated: the loop then updates the cache in place instead of first copying it
@functools.partial(jax.jit, static_argnames=("model", "ragged"), donate_argnames=("state",))
def _decode(params, state: _State, key, end, sampling: Sampling, stop, *, model: GPT, ragged: bool) -> _State:
    """Sample tokens state.t..end-1, stopping early once every row has emitted `stop` (-1: never).
    `end` is traced so streaming chunks reuse this compilation. ragged: unequal prompt lengths.

    Step 0 (the prefill) and the steps whose context is longer than block_size recompute the
    (cropped) window from scratch; the others feed one token into the cache."""
    bs = model.config.block_size
    M, N = state.ctx_BxM.shape[1], state.out_BxN.shape[1]
    # the longest context sampled from is M - 1. If that fits, the window is just the prompt;
    # if not, the prefill computes a whole block too, one extra window step among many, so that
    # one compiled forward serves both
    W = bs if M - 1 > bs else M - N

    def step(state: _State) -> _State:
        L_B = state.len_B + state.t  # context length each row samples from this step

        def recompute(kv):
            return _window_logits(model, params, state.ctx_BxM, L_B, W, kv)

        def incremental(kv):
            tok_B = jnp.take_along_axis(state.ctx_BxM, (L_B - 1)[:, None], axis=1)[:, 0]
            # finished rows may be past the cache; clamp so they compute finite garbage
            pos_B = jnp.minimum(L_B - 1, _cache_length(model.config, M) - 1)
            cache = KVCache(kv=kv, pos=pos_B if ragged else pos_B[0])
            logits_BxV, cache = model.apply({"params": params}, tok_B[:, None], cache=cache, logits_at=jnp.zeros_like(tok_B))
            return logits_BxV, cache.kv

        # past the block every position shifts each step: no cached key/value stays valid
        full = (state.t == 0) | jnp.any(~state.done_B & (L_B > bs))
        logits_BxV, kv = jax.lax.cond(full, recompute, incremental, state.kv)

        tok_B = sample_logits(logits_BxV, jax.random.fold_in(key, state.t), sampling)
        tok_B = jnp.where(state.done_B, jnp.maximum(stop, 0), tok_B)
        rows_B = jnp.arange(tok_B.shape[0])
        return _State(
            t=state.t + 1,
            ctx_BxM=state.ctx_BxM.at[rows_B, L_B].set(tok_B),
            len_B=state.len_B,
            out_BxN=state.out_BxN.at[:, state.t].set(tok_B),
            done_B=state.done_B | (tok_B == stop),
            kv=kv,
        )

    def running(state: _State):
        return (state.t < end) & ~jnp.all(state.done_B)

    return jax.lax.while_loop(running, step, state)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, prefix: str = "") -> None:
    """Validate the sampling settings; `prefix` ('--' for the CLI) names them as the caller spells them."""
    if not temperature >= 0:  # NaN too
        raise ValueError(f"{prefix}temperature={temperature} must be a number >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{prefix}top_k={top_k} must be >= 1 (or no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{prefix}top_p={top_p} must be in (0, 1]")


def _check(cfg, prompt_tokens, max_new_tokens, temperature, top_k, top_p, vocab_limit, prompt_lengths,
           stop_token=None):
    """Validated (prompt_BxT int32 cropped to block_size, len_B, Sampling)."""
    prompt_BxT = np.asarray(prompt_tokens)
    if prompt_BxT.ndim != 2 or prompt_BxT.shape[1] == 0 or not np.issubdtype(prompt_BxT.dtype, np.integer):
        raise ValueError("prompt_tokens must be a non-empty (batch, length) integer array, "
                         f"got {prompt_BxT.dtype} of shape {prompt_BxT.shape}")
    B, T = prompt_BxT.shape
    len_B = np.full((B,), T) if prompt_lengths is None else np.asarray(prompt_lengths).reshape(-1)
    if (len_B.shape != (B,) or not np.issubdtype(len_B.dtype, np.integer) or len_B.min() < 1
            or len_B.max() > T):
        raise ValueError(f"prompt_lengths must hold {B} lengths in [1, {T}], got {prompt_lengths}")
    real = prompt_BxT[np.arange(T)[None] >= (T - len_B)[:, None]]  # the tokens left of the padding
    if real.min() < 0 or real.max() >= cfg.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}), got {real.min()}..{real.max()}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    vocab_limit = default_vocab_limit(cfg) if vocab_limit is None else int(vocab_limit)
    if not 1 <= vocab_limit <= cfg.vocab_size:
        raise ValueError(f"vocab_limit={vocab_limit} must be in [1, vocab_size={cfg.vocab_size}]")
    check_sampling(temperature, top_k, top_p)
    if stop_token is not None and not 0 <= stop_token < cfg.vocab_size:
        raise ValueError(f"stop_token={stop_token} must be a token id in [0, {cfg.vocab_size})")
    sampling = Sampling(  # every field set, so all settings share one compiled loop
        temperature=float(temperature),
        top_k=vocab_limit if top_k is None else min(int(top_k), vocab_limit),  # nanoGPT caps it too
        top_p=1.0 if top_p is None else float(top_p),
        vocab_limit=vocab_limit,
    )
    # the model never sees more than block_size tokens, so longer prompts lose nothing by cropping
    bs = cfg.block_size
    return prompt_BxT[:, -bs:].astype(np.int32), np.minimum(len_B, bs).astype(np.int32), sampling


def generate_stream(
    params, cfg: GPTConfig, prompt_tokens, key, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
    vocab_limit: int | None = None, prompt_lengths=None, chunk_size: int = 32, key_bucket: int | None = None,
    kernels: Kernels | None = None,
) -> Iterator[np.ndarray]:
    """`generate`, yielding the tokens (B, k) as numpy arrays every chunk_size steps (after all rows
    stop, the remaining chunks are padding). The same compiled loop runs chunk by chunk carrying
    its state, so the tokens are exactly `generate`'s. Arguments are checked at the call."""
    prompt_BxT, len_B, sampling = _check(cfg, prompt_tokens, max_new_tokens, temperature, top_k, top_p,
                                         vocab_limit, prompt_lengths, stop_token)
    key_bucket = default_key_bucket(cfg) if key_bucket is None else key_bucket
    if not isinstance(key_bucket, int) or key_bucket < 0:
        raise ValueError(f"key_bucket={key_bucket!r}: give a whole number of cache rows >= 0 (0: the whole cache in one block)")
    if not isinstance(chunk_size, (int, np.integer)) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: give a whole number of tokens >= 1")
    stop = -1 if stop_token is None else stop_token
    state = _start(cfg, prompt_BxT, len_B, max_new_tokens, stop, key_bucket)
    model = GPT(cfg, kernels or Kernels())
    static = dict(model=model, ragged=bool((len_B != len_B[0]).any()))

    def chunks():
        nonlocal state
        for start in range(0, max_new_tokens, chunk_size):
            end = min(start + chunk_size, max_new_tokens)
            state = _decode(params, state, key, jnp.int32(end), sampling, jnp.int32(stop), **static)
            yield np.asarray(state.out_BxN[:, start:end])

    return chunks()


def generate(
    params, cfg: GPTConfig, prompt_tokens, key, max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
    vocab_limit: int | None = None, prompt_lengths=None, key_bucket: int | None = None,
    kernels: Kernels | None = None,
) -> jax.Array:
    """Sample max_new_tokens tokens after each prompt row on the KV cache: int32 (B, max_new_tokens).

    prompt_tokens (B, T): equal-length prompts, or left-padded ones with prompt_lengths (B,).
    temperature 0 is greedy; top_k / top_p filter as nanoGPT / nucleus sampling; vocab_limit
    (default `default_vocab_limit(cfg)`) keeps padded vocabulary ids from being sampled. With
    stop_token a row ends when it samples it and is stop_token from then on; the loop ends when all
    rows have. Step t samples with fold_in(key, t): the same key gives the same tokens. Contexts
    longer than block_size are cropped to their last block_size tokens, as nanoGPT; such steps
    recompute that window instead of using the cache (see the module docstring). key_bucket only
    sets speed: the cache is held in blocks of that many positions, of which each step reads those
    its context reaches (default `default_key_bucket(cfg)`; 0: one block, the whole cache).
    kernels: how the model runs (`kernels.for_inference`; default plain XLA).
    """
    chunks = generate_stream(
        params, cfg, prompt_tokens, key, max_new_tokens, temperature, top_k, top_p, stop_token,
        vocab_limit, prompt_lengths, chunk_size=max_new_tokens, key_bucket=key_bucket, kernels=kernels,
    )
    return jnp.asarray(next(chunks))
