"""Attention written out in JAX: softmax attention under a mask, attention over a KV cache that
reads only the blocks in use, and jax.nn.dot_product_attention's fused kernels with a fallback.

Sampling reads the KV cache heads major, (B, N, S, H), held in blocks of a fixed number of
positions (`kvcache.init_cache`'s key_bucket): each head's keys are contiguous rows the products
read in place, and a short context reads only the blocks it reaches (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


def attend_prefix(q_BxNxRxH, k_blocks, v_blocks, first, scale: float, dropout: Dropout | None = None,
                  deterministic: bool = True):
    """Heads-major causal attention of R queries at positions first..first+R-1 over the keys of
    k_blocks in order (each (B, N, S_j, H), read whole; those past each query's own position
    masked); scores and softmax in float32. `first` is a scalar, or one position per row (B,)."""
    scores = [jnp.einsum("bnrh,bnlh->bnrl", q_BxNxRxH, k, preferred_element_type=jnp.float32) for k in k_blocks]
    logits_BxNxRxL = scores[0] if len(scores) == 1 else jnp.concatenate(scores, -1)
    length = logits_BxNxRxL.shape[-1]
    # each query's own position: (R, 1), or (B, 1, R, 1) when every row starts at its own `first`
    first = jnp.asarray(first)
    at = (first[:, None, None, None] if first.ndim else first) + jnp.arange(q_BxNxRxH.shape[2])[:, None]
    mask = jnp.arange(length) <= at
    probs_BxNxRxL = _softmax_probs(logits_BxNxRxL, mask, scale, dropout, deterministic)
    ends = np.cumsum([v.shape[2] for v in v_blocks])
    probs = [probs_BxNxRxL] if len(v_blocks) == 1 else jnp.split(probs_BxNxRxL, ends[:-1], axis=-1)
    outputs = [jnp.einsum("bnrl,bnlh->bnrh", p.astype(v.dtype), v) for p, v in zip(probs, v_blocks)]
    return functools.reduce(jnp.add, outputs)


def cached_attention(q_BxTxNxH, k_blocks, v_blocks, pos):
    """Attention of T new queries at positions pos..pos+T-1 over a KV cache held in blocks of
    consecutive positions (each (B, N, S_j, H), heads major; the new keys already written); scores
    and softmax in float32. `pos` is a scalar or one position per row (B,), and may be traced.
    Only the blocks up to the one holding the furthest row's last position are read, each in place
    (a `lax.switch` over how many), so a short context does not pay for the whole cache. Their
    rows past a row's last position are later positions, hidden by the mask: they add exactly zero
    to the softmax."""
    T = q_BxTxNxH.shape[1]
    scale = 1.0 / math.sqrt(q_BxTxNxH.shape[-1])
    q_BxNxTxH = jnp.transpose(q_BxTxNxH, (0, 2, 1, 3))
    ends = np.cumsum([k.shape[2] for k in k_blocks])

    def attend(n_blocks: int):  # (q, k blocks, v blocks, pos) -> the queries at pos.. over the first n blocks
        return lambda q, ks, vs, pos: attend_prefix(q, ks[:n_blocks], vs[:n_blocks], pos, scale)

    operands = (q_BxNxTxH, tuple(k_blocks), tuple(v_blocks), pos)
    if len(ends) == 1:
        out_BxNxTxH = attend(1)(*operands)
    elif isinstance(pos, int):
        out_BxNxTxH = attend(min(int(np.sum(ends <= pos + T - 1)), len(ends) - 1) + 1)(*operands)
    else:  # one unbatched index for every row keeps the switch a switch
        index = jnp.minimum(jnp.sum(ends <= jnp.max(pos) + T - 1), len(ends) - 1)
        out_BxNxTxH = jax.lax.switch(index, [attend(n) for n in range(1, len(ends) + 1)], *operands)
    return jnp.transpose(out_BxNxTxH, (0, 2, 1, 3))
