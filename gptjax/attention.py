"""Attention written out in JAX: softmax attention under a mask, causal attention in query blocks
that never computes the masked blocks, and attention over a KV cache that reads only the prefix in
use.

XLA's CPU backend has no fused attention, so on CPU the (B, N, T, T) scores and the elementwise
softmax work on them are a large share of a step. Causal attention in query blocks computes
n(n+1)/2 of the n^2 score blocks. Measured on this repository's 2-core CPU host (A/B in one
process, docs/benchmarks.md): the shakespeare_char step (T 256) 10.1 -> 9.1 s with 4 blocks, GPT-2
124M (T 1024) 8.5 -> 7.3 s; 8 and 16 blocks were slower than 4 again, and at the CPU recipe's
T 64 (2 blocks) the step is unchanged.

Sampling reads the KV cache heads major, (B, N, S, H), in prefixes of 128 positions: GPT-2 124M
sampling 500 tokens on that host went from 27-28 to 40-43 tokens/s. Each alone gains less: the
(B, S, N, H) cache read in prefixes 35; heads major but read whole every step 24.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from gptjax.perf import cuda_major

Dropout = Callable[..., jax.Array]  # an nn.Dropout: (x, deterministic=...) -> x

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def fused_attention_impl(dtype, head_size: int, device: jax.Device) -> str:
    """The `implementation` of jax.nn.dot_product_attention that attention="auto" asks for off the
    CPU: cuDNN's fused flash attention on an NVIDIA GPU where cuDNN takes the shapes (bfloat16 or
    float16, head size a multiple of 8 up to 128, Ampere or newer), else XLA's. jax's own default
    (implementation=None) is XLA's everywhere, which materialises the (B, N, T, T) scores."""
    major = cuda_major(device)  # None off NVIDIA GPUs
    cudnn_takes_it = (major is not None and major >= 8 and jnp.dtype(dtype) in CUDNN_DTYPES
                      and head_size % 8 == 0 and head_size <= 128)
    return "cudnn" if cudnn_takes_it else "xla"


def fused_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, implementation: str, fall_back: bool = False):
    """Causal jax.nn.dot_product_attention. With fall_back (attention="auto"), a cuDNN that refuses
    the call when it is traced (too old a version, or shapes its kernels do not take) leaves it to
    XLA's attention, with a warning naming why, instead of failing the run."""
    try:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True,
                                            implementation=implementation)
    except (NotImplementedError, RuntimeError) as err:  # what jax's cuDNN checks raise
        if not (fall_back and implementation == "cudnn"):
            raise
        warnings.warn(f"cuDNN attention is not available here ({err}); using XLA's attention instead")
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, is_causal=True, implementation="xla")


def _softmax_probs(logits, mask, scale, dropout: Dropout | None, deterministic: bool):
    logits = jnp.where(mask, logits * scale, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    return probs


def masked_attention(q_BxTxNxH, k_BxSxNxH, v_BxSxNxH, mask_TxS, dropout: Dropout | None = None,
                     deterministic: bool = True):
    """Softmax attention of T queries over S keys where mask_TxS is True; scores and softmax in
    float32."""
    scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
    logits_BxNxTxS = jnp.einsum(
        "btnh,bsnh->bnts", q_BxTxNxH, k_BxSxNxH, preferred_element_type=jnp.float32
    )
    probs_BxNxTxS = _softmax_probs(logits_BxNxTxS, mask_TxS, scale, dropout, deterministic)
    return jnp.einsum("bnts,bsnh->btnh", probs_BxNxTxS.astype(v_BxSxNxH.dtype), v_BxSxNxH)


def _attend_prefix(q_BxNxRxH, k_BxNxSxH, v_BxNxSxH, first, length: int, scale: float,
                   dropout: Dropout | None = None, deterministic: bool = True):
    """Heads-major causal attention of R queries at positions first..first+R-1 over the first
    `length` keys (those past each query's own position masked); scores and softmax in float32."""
    k_BxNxLxH, v_BxNxLxH = k_BxNxSxH[:, :, :length], v_BxNxSxH[:, :, :length]
    logits_BxNxRxL = jnp.einsum("bnrh,bnlh->bnrl", q_BxNxRxH, k_BxNxLxH, preferred_element_type=jnp.float32)
    mask_RxL = jnp.arange(length)[None, :] <= (first + jnp.arange(q_BxNxRxH.shape[2]))[:, None]
    probs_BxNxRxL = _softmax_probs(logits_BxNxRxL, mask_RxL, scale, dropout, deterministic)
    return jnp.einsum("bnrl,bnlh->bnrh", probs_BxNxRxL.astype(v_BxNxLxH.dtype), v_BxNxLxH)


def cpu_query_blocks(seq_len: int) -> int:
    """Query blocks for `blocked_causal_attention` on CPU: 4 (the fastest count measured at T 256
    and 1024), fewer for short sequences so a block keeps at least 32 rows (1: no blocking)."""
    return max(1, min(4, seq_len // 32))


def blocked_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, n_blocks: int,
                             dropout: Dropout | None = None, deterministic: bool = True):
    """Causal softmax attention with the T queries split into `n_blocks` consecutive blocks:
    block i attends to the keys up to its own last position only, so the score blocks above the
    diagonal, which the causal mask would zero, are never computed. Each block sees its whole row
    of visible keys, so the softmax is exactly that of `masked_attention` under a causal mask.

    Heads go major once, (B, N, T, H): each block's products are then contiguous batched matmuls
    and the key/value prefixes are slices rather than fresh transposes."""
    B, T, N, H = q_BxTxNxH.shape
    n_blocks = max(1, min(n_blocks, T))
    bounds = [T * i // n_blocks for i in range(n_blocks + 1)]
    scale = 1.0 / math.sqrt(H)
    q_BxNxTxH, k_BxNxTxH, v_BxNxTxH = (
        jnp.transpose(a, (0, 2, 1, 3)) for a in (q_BxTxNxH, k_BxTxNxH, v_BxTxNxH)
    )
    # the queries at positions start..stop-1 over the `stop` keys they may see
    outputs = [_attend_prefix(q_BxNxTxH[:, :, start:stop], k_BxNxTxH, v_BxNxTxH, start, stop, scale, dropout,
                              deterministic)
               for start, stop in zip(bounds[:-1], bounds[1:])]
    return jnp.transpose(jnp.concatenate(outputs, axis=2), (0, 2, 1, 3))


def cached_attention(q_BxTxNxH, k_BxNxSxH, v_BxNxSxH, pos, key_bucket: int = 0, reach=None):
    """Attention of T new queries at positions pos..pos+T-1 over a KV cache of S positions, heads
    major (the new keys already written); scores and softmax in float32. Cache rows past pos+T-1
    are later positions, hidden by the mask: with key_bucket > 0 only the first multiple of
    key_bucket rows covering pos+T-1 are read (a `lax.switch` over the S/key_bucket prefix lengths;
    pos may be traced), so a short context does not pay for the whole cache. The masked rows add
    exactly zero to the softmax either way. `reach` (default pos+T-1) is the last position the
    prefix must cover: under a vmap over rows, one unbatched bound for all of them keeps the switch a
    switch (a batched index would run every branch)."""
    T, S = q_BxTxNxH.shape[1], k_BxNxSxH.shape[2]
    scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
    q_BxNxTxH = jnp.transpose(q_BxTxNxH, (0, 2, 1, 3))

    def attend(length: int):  # (q, k, v, pos) -> the queries at pos.. over the first `length` keys
        return functools.partial(_attend_prefix, length=length, scale=scale)

    operands = (q_BxNxTxH, k_BxNxSxH, v_BxNxSxH, pos)
    if key_bucket <= 0 or key_bucket >= S:
        out_BxNxTxH = attend(S)(*operands)
    else:
        lengths = [*range(key_bucket, S, key_bucket), S]
        last = pos + T - 1 if reach is None else reach
        if isinstance(last, int):
            out_BxNxTxH = attend(lengths[min(last // key_bucket, len(lengths) - 1)])(*operands)
        else:
            index = jnp.minimum(last // key_bucket, len(lengths) - 1)
            out_BxNxTxH = jax.lax.switch(index, [attend(n) for n in lengths], *operands)
    return jnp.transpose(out_BxNxTxH, (0, 2, 1, 3))
