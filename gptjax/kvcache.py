"""The KV cache of sampling: each layer's keys and values, heads major and in blocks of positions.

Each head's keys are contiguous rows the attention's products read in place (heads major,
(B, N, S, H)); the S positions are held in blocks, each its own array, so that a short context
reads only the blocks it reaches (`attention.cached_attention`), each in place: XLA's CPU
products copy a prefix sliced from one array before reading it (docs/benchmarks.md, Log).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

if TYPE_CHECKING:
    from gptjax.model import GPTConfig


@struct.dataclass
class KVCache:
    """The keys and values of earlier positions, and where a forward's T new tokens go.

    kv: per layer {'k', 'v'}, each a tuple of blocks (B, N, S_j, H) that hold the cache's S
      positions in order. Heads major, so each head's keys are contiguous rows the products read
      in place; in blocks, so a short context reads only the blocks it reaches, each in place (a
      prefix sliced from one array is copied before every product: `attention.cached_attention`).
      Under scan_layers one such dict whose blocks have a leading layer axis (L, B, N, S_j, H).
      Made by `init_cache`.
    pos: the position of the first new token, a scalar or one per row (B,); may be traced."""

    kv: Any
    pos: Any = 0


def init_cache(cfg: GPTConfig, batch_size: int, length: int | None = None, dtype=None,
               key_bucket: int = 0) -> KVCache:
    """An empty KV cache of `length` positions (default block_size) for `GPT.__call__`, in blocks
    of key_bucket positions (the last one shorter where they do not divide; 0: one block)."""
    S = length or cfg.block_size
    bucket = key_bucket if 0 < key_bucket < S else S
    lead = (cfg.n_layer,) if cfg.scan_layers else ()
    dtype = dtype or cfg.compute_dtype

    def blocks():
        return tuple(jnp.zeros((*lead, batch_size, cfg.n_head, min(bucket, S - start), cfg.head_size), dtype)
                     for start in range(0, S, bucket))

    if cfg.scan_layers:
        return KVCache(kv={"k": blocks(), "v": blocks()})
    return KVCache(kv=[{"k": blocks(), "v": blocks()} for _ in range(cfg.n_layer)])


def _write_row(blocks, new_NxTxH, pos):
    """The blocks (N, S_j, H) of one row's cache (or of every row, with a leading B) with the T
    new rows written at pos."""
    axis = new_NxTxH.ndim - 2
    sizes = [block.shape[axis] for block in blocks]
    if len(blocks) == 1:
        return (jax.lax.dynamic_update_slice_in_dim(blocks[0], new_NxTxH, pos, axis),)
    if new_NxTxH.shape[axis] > 1:  # a prompt or a recomputed window: once through one whole copy
        whole = jax.lax.dynamic_update_slice_in_dim(jnp.concatenate(blocks, axis), new_NxTxH, pos, axis)
        return tuple(jnp.split(whole, np.cumsum(sizes)[:-1], axis))
    # one token, written in place: its own block takes it, every other block its own row back
    written, start = [], 0
    for block, size in zip(blocks, sizes):
        at = jnp.clip(pos - start, 0, size - 1)
        mine = (pos >= start) & (pos < start + size)
        row = jnp.where(mine, new_NxTxH, jax.lax.dynamic_slice_in_dim(block, at, 1, axis))
        written.append(jax.lax.dynamic_update_slice_in_dim(block, row, at, axis))
        start += size
    return tuple(written)


def write(blocks, new_BxNxTxH, pos):
    """The cache's blocks with the T new rows written at pos (a scalar, or one position per row)."""
    new_BxNxTxH = new_BxNxTxH.astype(blocks[0].dtype)
    if jnp.ndim(pos) == 0:
        return _write_row(blocks, new_BxNxTxH, pos)
    return jax.vmap(_write_row)(blocks, new_BxNxTxH, pos)
