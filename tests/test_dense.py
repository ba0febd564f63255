"""gptjax.dense: the Dense product whose weight gradient is laid out for XLA's CPU kernels gives
the gradients of the plain product, and its compiled weight gradient really avoids the dot form
that XLA's CPU backend leaves to its slow generic kernel."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import dense, sharding

DENSE_DIMS = lambda x: (((x.ndim - 1,), (0,)), ((), ()))  # noqa: E731


def _plain(x, w):
    return jax.lax.dot_general(x, w, DENSE_DIMS(x))


def _value_and_grads(matmul, x, w, r):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(matmul(x, w) * r), argnums=(0, 1)))(x, w)


# (x shape, (C, D)): narrower input (x transposed), narrower output (dy transposed), square, 2-D x
CASES = [((3, 5, 8), (8, 24)), ((3, 5, 24), (24, 8)), ((2, 7, 16), (16, 16)), ((11, 12), (12, 20))]


@pytest.mark.parametrize("x_shape,w_shape", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradients_match_the_plain_product(x_shape, w_shape):
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, w_shape))
    r = jnp.asarray(rng.standard_normal(x_shape[:-1] + w_shape[1:]), jnp.float32)
    value, (dx, dw) = _value_and_grads(dense.matmul_cpu_grads, x, w, r)
    ref_value, (ref_dx, ref_dw) = _value_and_grads(_plain, x, w, r)
    assert dx.shape == x.shape and dw.shape == w.shape
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(ref_dw)).max() > 1.0  # a real gradient, not zeros matching zeros


def test_bfloat16_gradients_keep_their_dtype_and_values():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 6, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((16, 48)), jnp.bfloat16)
    r = jnp.asarray(rng.standard_normal((4, 6, 48)), jnp.bfloat16)
    _, (dx, dw) = _value_and_grads(dense.matmul_cpu_grads, x, w, r)
    _, (ref_dx, ref_dw) = _value_and_grads(_plain, x, w, r)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref_dw, np.float32), rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref_dx, np.float32), rtol=2e-2, atol=5e-2)


def _weight_gradient_dots(matmul, C, D, M=384):
    x = jnp.ones((M, C), jnp.float32)
    w = jnp.ones((C, D), jnp.float32)
    hlo = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(matmul(jnp.cos(x), w))))).lower(w).compile().as_text()
    return re.findall(r"dot\([^\n]*?lhs_contracting_dims=\{(\d)\}", hlo)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA CPU layout property")
@pytest.mark.parametrize("C,D", [(128, 512), (512, 128)])
def test_cpu_weight_gradient_contracts_the_minor_dimension(C, D):
    """XLA's own gradient contracts the tokens as the left operand's major dimension (the form its
    CPU backend sends to Eigen); ours leaves only minor-dimension contractions (YNNPACK's)."""
    assert "0" in _weight_gradient_dots(_plain, C, D)
    ours = _weight_gradient_dots(dense.matmul_cpu_grads, C, D)
    assert ours and "0" not in ours


def test_dense_takes_the_custom_gradient_only_on_cpu(monkeypatch):
    x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))

    def uses_custom_vjp():
        jaxpr = jax.make_jaxpr(lambda x, w: dense.dense_dot_general(x, w, DENSE_DIMS(x)))(x, w)
        return "custom_vjp_call" in str(jaxpr)

    monkeypatch.setattr(dense.jax, "default_backend", lambda: "cpu")
    assert uses_custom_vjp()
    monkeypatch.setattr(dense.jax, "default_backend", lambda: "gpu")
    assert not uses_custom_vjp()


def test_tall_products_in_row_blocks_match_the_plain_product(monkeypatch):
    """Row blocks (taken from 4096 rows on, lowered here to 64) give the same values and
    gradients, and are really taken: the products run in scans over the blocks."""
    monkeypatch.setattr(dense, "CHUNK_MIN_ROWS", 64)
    monkeypatch.setattr(dense, "CHUNK_ROWS", 16)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 32, 24)), jnp.float32)  # 128 rows: 8 blocks
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((4, 32, 40)), jnp.float32)
    assert "scan" in str(jax.make_jaxpr(dense.matmul_cpu_grads)(x, w))
    # forward product and input gradient (contraction 40 <= 512) both in blocks
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(dense.matmul_cpu_grads(x, w) * r)))(x, w))
    assert grad_jaxpr.count("scan[") == 2
    np.testing.assert_allclose(jax.jit(dense.matmul_cpu_grads)(x, w), _plain(x, w), rtol=1e-5, atol=1e-5)
    value, (dx, dw) = _value_and_grads(dense.matmul_cpu_grads, x, w, r)
    ref_value, (ref_dx, ref_dw) = _value_and_grads(_plain, x, w, r)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(dense, "CHUNK_MIN_ROWS", 4096)
    x_fewer_rows = x[:3]  # a new shape, so traced afresh (JAX caches the trace per shape)
    assert "scan" not in str(jax.make_jaxpr(dense.matmul_cpu_grads)(x_fewer_rows, w))


def test_row_blocks_only_on_one_devices_arrays():
    """Under a partitioned mesh the arrays are global and split: no row blocks there; inside
    shard_map (Manual axes) each device holds its own rows."""
    auto, manual = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Manual
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",), axis_types=(auto,))):
        assert not sharding.traced_per_device()
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",), axis_types=(manual,))):
        assert sharding.traced_per_device()
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",), axis_types=(auto,))):
        assert sharding.traced_per_device()
