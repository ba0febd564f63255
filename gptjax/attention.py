"""Attention written out in JAX: softmax attention under a mask, attention over a KV cache that
reads only the prefix in use, and jax.nn.dot_product_attention's fused kernels with a fallback.

Sampling reads the KV cache heads major, (B, N, S, H), in prefixes of a fixed number of positions
(`cached_attention`'s key_bucket): each head's keys are contiguous rows the products read in
place, and a short context does not pay for the whole cache (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

Dropout = Callable[..., jax.Array]  # an nn.Dropout: (x, deterministic=...) -> x


def fused_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, implementation: str, fall_back: bool = False):
    """Causal jax.nn.dot_product_attention. With fall_back, a cuDNN that refuses the call when it
    is traced (too old a version, or shapes its kernels do not take) leaves it to XLA's attention,
    with a warning naming why, instead of failing the run."""
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


def attend_prefix(q_BxNxRxH, k_BxNxSxH, v_BxNxSxH, first, length: int, scale: float,
                  dropout: Dropout | None = None, deterministic: bool = True):
    """Heads-major causal attention of R queries at positions first..first+R-1 over the first
    `length` keys (those past each query's own position masked); scores and softmax in float32.
    `first` is a scalar, or one position per row (B,)."""
    k_BxNxLxH, v_BxNxLxH = k_BxNxSxH[:, :, :length], v_BxNxSxH[:, :, :length]
    logits_BxNxRxL = jnp.einsum("bnrh,bnlh->bnrl", q_BxNxRxH, k_BxNxLxH, preferred_element_type=jnp.float32)
    # each query's own position: (R, 1), or (B, 1, R, 1) when every row starts at its own `first`
    first = jnp.asarray(first)
    at = (first[:, None, None, None] if first.ndim else first) + jnp.arange(q_BxNxRxH.shape[2])[:, None]
    mask = jnp.arange(length) <= at
    probs_BxNxRxL = _softmax_probs(logits_BxNxRxL, mask, scale, dropout, deterministic)
    return jnp.einsum("bnrl,bnlh->bnrh", probs_BxNxRxL.astype(v_BxNxLxH.dtype), v_BxNxLxH)


def cached_attention(q_BxTxNxH, k_BxNxSxH, v_BxNxSxH, pos, key_bucket: int = 0):
    """Attention of T new queries at positions pos..pos+T-1 over a KV cache of S positions, heads
    major (the new keys already written); scores and softmax in float32. `pos` is a scalar or one
    position per row (B,), and may be traced. Cache rows past a row's last position are later
    positions, hidden by the mask: with key_bucket > 0 only the first multiple of key_bucket rows
    covering the furthest row's last position are read (a `lax.switch` over the S/key_bucket prefix
    lengths), so a short context does not pay for the whole cache. The masked rows add exactly
    zero to the softmax either way."""
    T, S = q_BxTxNxH.shape[1], k_BxNxSxH.shape[2]
    scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
    q_BxNxTxH = jnp.transpose(q_BxTxNxH, (0, 2, 1, 3))

    def attend(length: int):  # (q, k, v, pos) -> the queries at pos.. over the first `length` keys
        return functools.partial(attend_prefix, length=length, scale=scale)

    operands = (q_BxNxTxH, k_BxNxSxH, v_BxNxSxH, pos)
    if key_bucket <= 0 or key_bucket >= S:
        out_BxNxTxH = attend(S)(*operands)
    else:
        lengths = [*range(key_bucket, S, key_bucket), S]
        if isinstance(pos, int):
            out_BxNxTxH = attend(lengths[min((pos + T - 1) // key_bucket, len(lengths) - 1)])(*operands)
        else:  # one unbatched index for every row keeps the switch a switch
            index = jnp.minimum((jnp.max(pos) + T - 1) // key_bucket, len(lengths) - 1)
            out_BxNxTxH = jax.lax.switch(index, [attend(n) for n in lengths], *operands)
    return jnp.transpose(out_BxNxTxH, (0, 2, 1, 3))
