"""gptjax.attention: causal attention in query blocks against the plain masked softmax (values and
gradients), the block counts it is used with, and its place in the model on CPU; attention over a
KV cache read in prefixes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gptjax.attention import (
    blocked_causal_attention, cached_attention, cpu_query_blocks, fused_attention_impl, masked_attention,
)
from gptjax.model import GPT, GPTConfig, init_params


def qkv(B, T, N, H, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(k, (B, T, N, H), dtype) for k in keys]


def causal_reference(q, k, v):
    T = q.shape[1]
    with jax.default_matmul_precision("highest"):
        return masked_attention(q, k, v, jnp.tril(jnp.ones((T, T), bool)))


@pytest.mark.parametrize("T, n_blocks", [(16, 1), (16, 2), (16, 4), (10, 4), (12, 5), (7, 7)])
def test_blocked_matches_masked_softmax_values_and_gradients(T, n_blocks):
    """Equal and uneven blocks (T 10 in 4: 2, 3, 2, 3 rows), float32: rtol 1e-5."""
    q, k, v = qkv(2, T, 3, 8, seed=T + n_blocks)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)  # a non-uniform cotangent

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    with jax.default_matmul_precision("highest"):
        blocked = jax.jit(lambda q, k, v: blocked_causal_attention(q, k, v, n_blocks))
        out = blocked(q, k, v)
        grads = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
        ref_grads = jax.grad(loss(causal_reference), argnums=(0, 1, 2))(q, k, v)
    ref = causal_reference(q, k, v)
    assert np.abs(np.asarray(ref)).max() > 0.1
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert np.abs(np.asarray(r)).max() > 0.1
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_blocks_really_skip_the_masked_score_blocks():
    """4 blocks of 4 queries: the score products cover 4+8+12+16 = 40 of 64 rows x keys."""
    q, k, v = qkv(1, 16, 2, 5)
    jaxpr = jax.make_jaxpr(lambda q, k, v: blocked_causal_attention(q, k, v, 4))(q, k, v)
    score_shapes = [eqn.outvars[0].aval.shape for eqn in jaxpr.eqns
                    if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] != 5]
    assert score_shapes == [(1, 2, 4, 4), (1, 2, 4, 8), (1, 2, 4, 12), (1, 2, 4, 16)]


@pytest.mark.parametrize("T", [1, 3])
def test_cache_read_in_prefixes_equals_the_whole_cache(T):
    """A cache of 16 rows read in prefixes of 5 (lengths 5, 10, 15, 16): at every position, traced
    or static, the same values as attending over all 16 rows (the rows past pos+T-1 hold garbage
    here, which both must ignore). float32: rtol 1e-6."""
    q = qkv(2, T, 3, 8, seed=T)[0]
    k_BxSxNxH, v_BxSxNxH = qkv(2, 16, 3, 8, seed=10 + T)[1:]
    k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in (k_BxSxNxH, v_BxSxNxH))  # the cache is heads major
    whole = jax.jit(lambda q, k, v, pos: cached_attention(q, k, v, pos))
    prefixes = jax.jit(lambda q, k, v, pos: cached_attention(q, k, v, pos, key_bucket=5))
    for pos in range(0, 16 - T + 1):
        want = whole(q, k, v, pos)
        causal_TxS = jnp.arange(16)[None, :] <= (pos + jnp.arange(T))[:, None]
        np.testing.assert_allclose(want, masked_attention(q, k_BxSxNxH, v_BxSxNxH, causal_TxS), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(prefixes(q, k, v, pos), want, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cached_attention(q, k, v, pos, key_bucket=5), want, rtol=1e-6, atol=1e-6)
    # the garbage rows do matter without the mask: a wrong prefix would change the values
    assert not np.allclose(masked_attention(q, k_BxSxNxH, v_BxSxNxH, jnp.ones((T, 16), bool)), whole(q, k, v, 0))


def test_cache_prefixes_really_shorten_the_products():
    q = qkv(1, 1, 2, 4)[0]
    k, v = (jnp.transpose(a, (0, 2, 1, 3)) for a in qkv(1, 16, 2, 4, seed=1)[1:])
    jaxpr = jax.make_jaxpr(lambda q, k, v, pos: cached_attention(q, k, v, pos, key_bucket=5))(q, k, v, 3)
    (switch,) = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "cond"]
    key_lengths = [[eqn.outvars[0].aval.shape[-1] for eqn in branch.jaxpr.eqns if eqn.primitive.name == "dot_general"][0]
                   for branch in switch.params["branches"]]
    assert key_lengths == [5, 10, 15, 16]
    static = jax.make_jaxpr(lambda q, k, v: cached_attention(q, k, v, 7, key_bucket=5))(q, k, v)
    assert [e.outvars[0].aval.shape[-1] for e in static.eqns if e.primitive.name == "dot_general"][0] == 10


def test_bfloat16_keeps_float32_scores():
    q, k, v = qkv(2, 16, 2, 8, dtype=jnp.bfloat16)
    out = blocked_causal_attention(q, k, v, 2)
    assert out.dtype == jnp.bfloat16
    ref = causal_reference(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_cpu_query_blocks():
    assert [cpu_query_blocks(t) for t in (1, 16, 32, 64, 100, 128, 256, 1024)] == [1, 1, 1, 2, 3, 4, 4, 4]


class _DropoutAttention(nn.Module):
    n_blocks: int

    @nn.compact
    def __call__(self, q, k, v):
        return blocked_causal_attention(q, k, v, self.n_blocks, nn.Dropout(0.5), deterministic=False)


def test_dropout_in_blocks_is_keyed_and_keeps_the_expectation():
    """Attention dropout inside the blocks: reproducible per key, new masks per key, every block
    dropped independently, and an unbiased estimate of the attention without dropout."""
    q, k, v = qkv(8, 16, 2, 4, seed=3)
    module = _DropoutAttention(4)
    run = jax.jit(lambda key: module.apply({}, q, k, v, rngs={"dropout": key}))
    a, b, c = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    mean = np.mean([np.asarray(run(jax.random.PRNGKey(i))) for i in range(200)], axis=0)
    ref = np.asarray(causal_reference(q, k, v))
    assert np.abs(mean - ref).mean() < 0.1 * np.abs(ref).mean()


def test_model_uses_blocks_on_cpu_and_matches_plain_attention():
    """At T 64 the CPU model runs 2 query blocks; loss and gradients equal those of the plain
    masked softmax (attention='plain') within float32 reassociation."""
    from gptjax.step import loss_fn

    assert jax.default_backend() == "cpu"
    cfg = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 64), 0, 50)
    y = jnp.roll(x, -1, axis=1)
    jaxpr = jax.make_jaxpr(lambda p: GPT(cfg).apply({"params": p}, x))(params)
    assert str(jaxpr).count("concatenate") >= cfg.n_layer  # the blocks' outputs, per layer
    grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)
    with jax.default_matmul_precision("highest"):
        loss, grads = grad(params, GPT(cfg), x, y)
        ref_loss, ref_grads = grad(params, GPT(dataclasses.replace(cfg, attention="plain")), x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def fake_device(platform="gpu", version="cuda 12080", capability="9.0"):
    """A jax device as gptjax reads it: an H100 unless told otherwise."""
    from types import SimpleNamespace

    return SimpleNamespace(platform=platform, client=SimpleNamespace(platform_version=version),
                           compute_capability=capability)


@pytest.mark.parametrize("device, dtype, head_size, expected", [
    (fake_device(), jnp.bfloat16, 64, "cudnn"),  # H100, GPT-2's heads
    (fake_device(capability="8.0"), jnp.float16, 128, "cudnn"),  # A100
    (fake_device(), jnp.float32, 64, "xla"),  # cuDNN's flash attention is bf16/fp16 only
    (fake_device(), jnp.bfloat16, 12, "xla"),  # head size not a multiple of 8
    (fake_device(), jnp.bfloat16, 256, "xla"),  # above what every cuDNN GPU takes
    (fake_device(capability="7.0"), jnp.float16, 64, "xla"),  # V100: before Ampere
    (fake_device(version="rocm 6.2"), jnp.bfloat16, 64, "xla"),  # an AMD GPU: no cuDNN
    (fake_device(platform="tpu", version="PJRT C API"), jnp.bfloat16, 64, "xla"),
])
def test_fused_attention_impl_picks_cudnn_only_where_cudnn_takes_it(device, dtype, head_size, expected):
    assert fused_attention_impl(dtype, head_size, device) == expected


def test_auto_attention_off_the_cpu_asks_for_the_picked_kernel(monkeypatch):
    """jax.nn.dot_product_attention's own default is XLA's attention everywhere: off the CPU,
    attention='auto' passes the kernel fused_attention_impl picks for the layer's dtype."""
    from gptjax import model as model_lib

    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 50)
    asked = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, implementation="xla", **kwargs)  # this host has no cuDNN

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(model_lib, "fused_attention_impl",
                        lambda dtype, head_size, device: f"picked {jnp.dtype(dtype).name} {head_size}")
    for dtype in ("bfloat16", "float32"):
        GPT(dataclasses.replace(cfg, dtype=dtype)).apply({"params": params}, x)
    assert asked == ["picked bfloat16 16"] * 2 + ["picked float32 16"] * 2


def test_auto_attention_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
    """attention='auto' picked cuDNN but jax's cuDNN checks refuse the call (as with too old a
    cuDNN): the layer warns and computes XLA's attention. Asked for by name, the error stands."""
    from gptjax import model as model_lib

    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=32, dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 50)
    want = GPT(dataclasses.replace(cfg, attention="xla")).apply({"params": params}, x)
    real = jax.nn.dot_product_attention

    def cudnn_refuses(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            raise RuntimeError("JAX requires cuDNN >= 8.9.4 to use flash cross attention.")
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_refuses)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(model_lib, "fused_attention_impl", lambda dtype, head_size, device: "cudnn")
    with pytest.warns(UserWarning, match=r"cuDNN attention is not available here \(JAX requires cuDNN"):
        got = GPT(cfg).apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(RuntimeError, match="requires cuDNN"):
        GPT(dataclasses.replace(cfg, attention="cudnn")).apply({"params": params}, x)
