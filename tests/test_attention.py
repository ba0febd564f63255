"""gptjax.attention: attention over a KV cache held in blocks, with one position for every row or
one per row, against the plain masked softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _attention import qkv
from gptjax.attention import cached_attention, masked_attention


def blocks(cache_BxNxSxH, size):
    """The cache split into blocks of `size` positions along S, the last one shorter."""
    return tuple(cache_BxNxSxH[:, :, i:i + size] for i in range(0, cache_BxNxSxH.shape[2], size))


@pytest.mark.parametrize("T", [1, 3])
def test_cache_read_in_blocks_equals_the_whole_cache(T):
    """A cache of 16 rows in blocks of 5 (5, 5, 5, 1): at every position, traced or static, the
    same values as attending over all 16 rows in one block (the rows past pos+T-1 hold garbage
    here, which both must ignore). float32: rtol 1e-6."""
    q = qkv(2, T, 3, 8, seed=T)[0]
    k_BxSxNxH, v_BxSxNxH = qkv(2, 16, 3, 8, seed=10 + T)[1:]
    k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k_BxSxNxH, v_BxSxNxH))  # the cache is heads major
    whole = jax.jit(lambda q, k, v, pos: cached_attention(q, (k,), (v,), pos))
    in_blocks = jax.jit(lambda q, k, v, pos: cached_attention(q, blocks(k, 5), blocks(v, 5), pos))
    for pos in range(0, 16 - T + 1):
        want = whole(q, k, v, pos)
        causal_TxS = jnp.arange(16)[None, :] <= (pos + jnp.arange(T))[:, None]
        np.testing.assert_allclose(want, masked_attention(q, k_BxSxNxH, v_BxSxNxH, causal_TxS), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(in_blocks(q, k, v, pos), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cached_attention(q, blocks(k, 5), blocks(v, 5), pos), want, rtol=1e-6, atol=1e-6)
    # the garbage rows do matter without the mask: a wrong set of blocks would change the values
    assert not np.allclose(masked_attention(q, k_BxSxNxH, v_BxSxNxH, jnp.ones((T, 16), bool)), whole(q, k, v, 0))


def test_cache_blocks_past_the_position_are_not_read():
    q = qkv(1, 1, 2, 4)[0]
    k, v = (blocks(jnp.transpose(a, (0, 2, 1, 3)), 5) for a in qkv(1, 16, 2, 4, seed=1)[1:])
    jaxpr = jax.make_jaxpr(lambda q, k, v, pos: cached_attention(q, k, v, pos))(q, k, v, 3)
    (switch,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]

    def rows_read(eqns):  # the cache rows of each product's second operand: keys, then values
        return [e.invars[1].aval.shape[2] for e in eqns if e.primitive.name == "dot_general"]

    assert [rows_read(branch.jaxpr.eqns) for branch in switch.params["branches"]] == [
        [5] * 2, [5, 5] * 2, [5, 5, 5] * 2, [5, 5, 5, 1] * 2]
    static = jax.make_jaxpr(lambda q, k, v: cached_attention(q, k, v, 7))(q, k, v)
    assert rows_read(static.eqns) == [5, 5] * 2
    # the blocks go to the products as they are, not sliced or joined first
    blocks_in = set(static.jaxpr.invars[1:])
    assert all(e.invars[1] in blocks_in for e in static.eqns if e.primitive.name == "dot_general")


def test_cache_with_a_position_per_row_equals_each_row_alone():
    """Rows at their own positions (3, 9 and 15 of 16) in one call, the cache in blocks of 5: each
    row as if attended alone at its position, and its garbage rows past it ignored."""
    q = qkv(3, 1, 2, 8, seed=4)[0]
    k_BxSxNxH, v_BxSxNxH = qkv(3, 16, 2, 8, seed=5)[1:]
    k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k_BxSxNxH, v_BxSxNxH))
    pos_B = jnp.array([3, 9, 15])
    got = jax.jit(lambda q, k, v, pos: cached_attention(q, blocks(k, 5), blocks(v, 5), pos))(q, k, v, pos_B)
    for b, pos in enumerate([3, 9, 15]):
        alone = cached_attention(q[b:b + 1], (k[b:b + 1],), (v[b:b + 1],), pos)
        np.testing.assert_allclose(got[b:b + 1], alone, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got[0], cached_attention(q[:1], (k[:1],), (v[:1],), 15)[0])  # the positions matter
