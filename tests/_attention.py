"""Attention inputs and the causal reference shared by the attention tests."""

import jax
import jax.numpy as jnp

from gptjax.attention import masked_attention


def qkv(B, T, N, H, seed=0, dtype=jnp.float32):
    """Random queries, keys and values, each (B, T, N, H)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (B, T, N, H), dtype) for k in keys]


def causal_reference(q, k, v):
    """Causal attention as the masked softmax written out, products at full float32 precision."""
    T = q.shape[1]
    with jax.default_matmul_precision("highest"):
        return masked_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool)))
