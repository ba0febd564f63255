"""gptjax.cpu, each piece against the plain JAX it replaces: the Dense product whose weight
gradient is laid out for XLA's CPU kernels (and its compiled weight gradient really avoids the dot
form XLA's CPU backend leaves to its slow generic kernel), causal attention in query blocks
(values, gradients, dropout, the blocks really skipped), and the host settings."""

import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import linen as nn

from _attention import causal_reference, qkv
from gptjax import cpu

DENSE_DIMS = lambda x: (((x.ndim - 1,), (0,)), ((), ()))  # noqa: E731


def _plain(x, w):
    return jax.lax.dot_general(x, w, DENSE_DIMS(x))


def _value_and_grads(matmul, x, w, r):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(matmul(x, w) * r), argnums=(0, 1)))(x, w)


# (x shape, (C, D)): narrower input (x transposed), narrower output (dy transposed), square, 2-D x
CASES = [((3, 5, 8), (8, 24)), ((3, 5, 24), (24, 8)), ((2, 7, 16), (16, 16)), ((11, 12), (12, 20))]


@pytest.mark.parametrize("transposed_copy", [True, False], ids=["copy", "as-is"])
@pytest.mark.parametrize("x_shape,w_shape", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradients_match_the_plain_product(x_shape, w_shape, transposed_copy):
    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, w_shape))
    r = jnp.asarray(rng.standard_normal(x_shape[:-1] + w_shape[1:]), jnp.float32)
    value, (dx, dw) = _value_and_grads(lambda x, w: cpu.matmul(x, w, False, transposed_copy), x, w, r)
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
    _, (dx, dw) = _value_and_grads(cpu.matmul, x, w, r)
    _, (ref_dx, ref_dw) = _value_and_grads(_plain, x, w, r)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref_dw, np.float32), rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref_dx, np.float32), rtol=2e-2, atol=5e-2)


def _weight_gradient_dots(matmul, C, D, M=384):
    x = jnp.ones((M, C), jnp.float32)  # an argument of the jitted function: XLA cannot fold it
    w = jnp.ones((C, D), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(matmul(jnp.cos(x), w))), argnums=1))
    return re.findall(r"dot\([^\n]*?lhs_contracting_dims=\{(\d)\}", grad.lower(x, w).compile().as_text())


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA CPU layout property")
@pytest.mark.parametrize("C,D", [(128, 512), (512, 128)])
def test_cpu_weight_gradient_contracts_the_minor_dimension(C, D):
    """XLA's own gradient contracts the tokens as the left operand's major dimension (the form its
    CPU backend sends to Eigen); ours leaves only minor-dimension contractions (YNNPACK's), unless
    asked to leave the weight gradient to Eigen as it is."""
    assert "0" in _weight_gradient_dots(_plain, C, D)
    ours = _weight_gradient_dots(cpu.matmul, C, D)
    assert ours and "0" not in ours
    assert "0" in _weight_gradient_dots(lambda x, w: cpu.matmul(x, w, False, False), C, D)


def test_dense_dot_general_takes_the_custom_gradient_for_dense_products_only():
    x, w = jnp.ones((2, 3, 4)), jnp.ones((4, 5))
    batched_w = jnp.ones((2, 4, 5))

    def uses_custom_vjp(w, dims):
        jaxpr = jax.make_jaxpr(lambda x, w: cpu.dense_dot_general(False)(x, w, dims))(x, w)
        return "custom_vjp_call" in str(jaxpr)

    assert uses_custom_vjp(w, DENSE_DIMS(x))
    assert not uses_custom_vjp(batched_w, (((2,), (1,)), ((0,), (0,))))  # a batched product: XLA's dot


def test_tall_products_in_row_blocks_match_the_plain_product(monkeypatch):
    """Row blocks (taken from 4096 rows on, lowered here to 64) give the same values and
    gradients, and are really taken: the products run in scans over the blocks."""
    blocked = lambda x, w: cpu.matmul(x, w, True)  # noqa: E731
    monkeypatch.setattr(cpu, "CHUNK_MIN_ROWS", 64)
    monkeypatch.setattr(cpu, "CHUNK_ROWS", 16)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 32, 24)), jnp.float32)  # 128 rows: 8 blocks
    w = jnp.asarray(rng.standard_normal((24, 40)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((4, 32, 40)), jnp.float32)
    assert "scan" in str(jax.make_jaxpr(blocked)(x, w))
    # forward product and input gradient (contraction 40 <= 512) both in blocks
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(blocked(x, w) * r)))(x, w))
    assert grad_jaxpr.count("scan[") == 2
    np.testing.assert_allclose(jax.jit(blocked)(x, w), _plain(x, w), rtol=1e-5, atol=1e-5)
    value, (dx, dw) = _value_and_grads(blocked, x, w, r)
    ref_value, (ref_dx, ref_dw) = _value_and_grads(_plain, x, w, r)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    assert "scan" not in str(jax.make_jaxpr(lambda x, w: cpu.matmul(x, w, False))(x, w))  # not asked for
    monkeypatch.setattr(cpu, "CHUNK_MIN_ROWS", 4096)
    x_fewer_rows = x[:3]  # a new shape, so traced afresh (JAX caches the trace per shape)
    assert "scan" not in str(jax.make_jaxpr(blocked)(x_fewer_rows, w))


# --- causal attention in query blocks ---


@pytest.mark.parametrize("T, n_blocks", [(16, 1), (16, 2), (16, 4), pytest.param(10, 4, marks=pytest.mark.slow), (12, 5),
                                         pytest.param(7, 7, marks=pytest.mark.slow)])
def test_blocked_matches_masked_softmax_values_and_gradients(T, n_blocks):
    """Equal and uneven blocks (T 10 in 4: 2, 3, 2, 3 rows), float32: rtol 1e-5."""
    q, k, v = qkv(2, T, 3, 8, seed=T + n_blocks)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)  # a non-uniform cotangent

    def loss(f):
        return lambda q, k, v: (f(q, k, v) * w).sum()

    with jax.default_matmul_precision("highest"):
        blocked = jax.jit(lambda q, k, v: cpu.blocked_causal_attention(q, k, v, n_blocks))
        out = blocked(q, k, v)
        grads = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
        ref_grads = jax.grad(loss(causal_reference), argnums=(0, 1, 2))(q, k, v)
    ref = causal_reference(q, k, v)
    assert np.abs(np.asarray(ref)).max() > 0.1
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert np.abs(np.asarray(r)).max() > 0.1
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B, N, T, l2_bytes, loops", [(2, 3, 16, 0, True), (1, 3, 16, 0, False), (2, 2, 8, 0, False),
                                                     (2, 3, 16, 1 << 20, False)],
                         ids=["groups", "heads-not-in-groups", "short", "scores-in-cache"])
def test_head_groups_match_masked_softmax(monkeypatch, B, N, T, l2_bytes, loops):
    """float32, rtol 1e-5; the length threshold lowered to 12 so a tiny sequence can loop, and
    the level-2 cache as large as told: 3 heads of one row, which do not pair up, 8 positions, or
    scores that fit in the cache take the blocks whole."""
    monkeypatch.setattr(cpu, "MIN_HEAD_GROUP_LENGTH", 12)
    monkeypatch.setattr(cpu, "l2_cache_bytes", lambda: l2_bytes)
    q, k, v = qkv(B, T, N, 8, seed=B + N)
    with jax.default_matmul_precision("highest"):
        f = lambda q, k, v: cpu.head_group_causal_attention(q, k, v, 4)  # noqa: E731
        out = jax.jit(f)(q, k, v)
    np.testing.assert_allclose(out, causal_reference(q, k, v), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out)).max() > 0.1
    assert ("scan" in str(jax.make_jaxpr(f)(q, k, v))) == loops


def test_l2_cache_size_as_linux_reports_it(tmp_path):
    for index, (level, kind, size) in enumerate([("1", "Data", "48K"), ("1", "Instruction", "32K"),
                                                 ("2", "Unified", "2048K"), ("3", "Unified", "266240K")]):
        (tmp_path / f"index{index}").mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (tmp_path / f"index{index}" / name).write_text(value + "\n")
    assert cpu.l2_cache_bytes(str(tmp_path)) == 2 << 20
    assert cpu.l2_cache_bytes(str(tmp_path / "absent")) == cpu.L2_BYTES_UNKNOWN


def test_blocks_really_skip_the_masked_score_blocks():
    """4 blocks of 4 queries: the score products cover 4+8+12+16 = 40 of 64 rows x keys."""
    q, k, v = qkv(1, 16, 2, 5)
    jaxpr = jax.make_jaxpr(lambda q, k, v: cpu.blocked_causal_attention(q, k, v, 4))(q, k, v)
    score_shapes = [eqn.outvars[0].aval.shape for eqn in jaxpr.eqns
                    if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] != 5]
    assert score_shapes == [(1, 2, 4, 4), (1, 2, 4, 8), (1, 2, 4, 12), (1, 2, 4, 16)]


def test_bfloat16_keeps_float32_scores():
    q, k, v = qkv(2, 16, 2, 8, dtype=jnp.bfloat16)
    out = cpu.blocked_causal_attention(q, k, v, 2)
    assert out.dtype == jnp.bfloat16
    ref = causal_reference(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_query_blocks():
    assert [cpu.query_blocks(t) for t in (1, 16, 32, 64, 100, 128, 256, 1024)] == [1, 1, 1, 2, 3, 4, 4, 4]


class _DropoutAttention(nn.Module):
    n_blocks: int

    @nn.compact
    def __call__(self, q, k, v):
        return cpu.blocked_causal_attention(q, k, v, self.n_blocks, nn.Dropout(0.5), deterministic=False)


@pytest.mark.slow
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


# --- host settings ---


@pytest.mark.parametrize("limit, batch, expected", [("2", 12, 2), ("8", 12, 6), ("4", 7, 1), ("1", 64, 1)])
def test_cpu_split_divides_the_batch(monkeypatch, limit, batch, expected):
    monkeypatch.setenv("XLA_FLAGS", "")  # setenv (not delenv of a missing key) restores it afterwards
    monkeypatch.setenv("GPTJAX_CPU_DEVICES", limit)
    assert cpu.split_devices(batch) == expected
    flags = cpu.os.environ.get("XLA_FLAGS", "")
    assert (f"device_count={expected}" in flags) == (expected > 1)


@pytest.mark.parametrize("dp, fsdp, expected", [(2, 1, 2), (1, 2, 2), (4, 1, 4), (1, 1, 1), (-1, 2, 2)])
def test_cpu_split_gives_a_sized_mesh_its_devices(monkeypatch, dp, fsdp, expected):
    """--dp/--fsdp on a CPU-only host: the split makes the devices the mesh asks for."""
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("GPTJAX_CPU_DEVICES", raising=False)
    monkeypatch.setattr(cpu, "_backend_started", lambda: False)
    monkeypatch.setattr(cpu, "_accelerator_installed", lambda: False)
    monkeypatch.setattr(cpu.os, "sched_getaffinity", lambda pid: {0, 1})  # two cores
    assert cpu.split_devices(12, dp=dp, fsdp=fsdp) == expected


def test_cpu_split_respects_user_flags_and_a_started_backend(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert cpu.split_devices(12) == 1
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.delenv("GPTJAX_CPU_DEVICES", raising=False)
    import jax

    jax.devices()  # the backend is up in this process: changing flags now would do nothing
    assert cpu.split_devices(12) == 1
    assert "XLA_FLAGS" not in cpu.os.environ


_REUSE_PROBE = """
import resource, sys
import numpy as np
from gptjax import cpu
applied = cpu.keep_freed_memory(2**30) if sys.argv[1] == "1" else False
def fill():  # a fresh 128 MB block, written through, then freed, as XLA does each step
    np.ones(32 * 2**20, np.float32).sum()
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    fill()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning is for Linux with glibc")
def test_keep_freed_memory_reuses_big_blocks_without_page_faults():
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0", "JAX_PLATFORMS": "cpu"}
    env.pop("GPTJAX_KEEP_MEMORY", None)
    pages = 5 * 128 * 2**20 // 4096

    def probe(tuned: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE, tuned], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        return out[0], int(out[1])

    applied, faults = probe("1")
    assert applied == "True"
    assert faults < 0.02 * pages, f"{faults} page faults for {pages} pages of reused memory"
    _, untuned_faults = probe("0")  # glibc's default: each big block is a fresh mmap
    assert untuned_faults > 10 * max(faults, 100)


_ARENA_PROBE = """
import resource, sys, threading
import numpy as np
from gptjax import cpu
# nanoGPT's CPU recipe over 2 devices: 0.8 MB activations, under glibc's largest mmap threshold
applied = cpu.keep_freed_memory(cpu.largest_activation_bytes(12, 64, 128, 4, n_devices=2))
def step():  # a step's buffers on one of XLA's pool threads: many 1 MB blocks, written, then freed
    blocks = [np.ones(2**18, np.float32) for _ in range(24)]
    return sum(float(b[-1]) for b in blocks)
def run(out):
    kept = [np.ones(2**18, np.float32) for _ in range(62)]  # older blocks that fill the thread arena's heap
    step(); step()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        step()
    out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
out = []
worker = threading.Thread(target=run, args=(out,))
worker.start()
worker.join()
print(applied, out[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc tuning is for Linux with glibc")
def test_keep_freed_memory_keeps_a_full_thread_arenas_step_buffers():
    """The two-speed step (docs/benchmarks.md, "Two speeds in one host"): where older blocks fill a
    thread arena's heap, glibc puts each step's buffers in a new heap and unmaps it once they are
    freed, so every step faults its pages in again; kept memory is reused."""
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0", "JAX_PLATFORMS": "cpu"}
    pages = 10 * 24 * 2**20 // 4096

    def probe(keep: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _ARENA_PROBE], env={**env, "GPTJAX_KEEP_MEMORY": keep},
                             check=True, capture_output=True, text=True).stdout.split()
        return out[0], int(out[1])

    applied, faults = probe("")
    assert applied == "True"
    assert faults < 0.02 * pages, f"{faults} page faults for {pages} pages of reused memory"
    applied, untuned_faults = probe("0")  # glibc's default
    assert applied == "False" and untuned_faults > 10 * max(faults, 100), untuned_faults


def test_activation_size_and_the_off_switch(monkeypatch):
    # nanoGPT's CPU recipe over 2 devices: 0.8 MB buffers, one arena per thread
    assert cpu.largest_activation_bytes(batch_size=12, block_size=64, n_embd=128, n_head=4, n_devices=2) == 4 * 6 * 64 * 512
    # shakespeare_char: (32, 6, 256, 256) attention scores per device, 50 MB: one arena for all threads
    big = cpu.largest_activation_bytes(batch_size=64, block_size=256, n_embd=384, n_head=6, n_devices=2)
    assert big == 4 * 32 * 6 * 256 * 256 > cpu._GLIBC_MMAP_THRESHOLD_MAX
    monkeypatch.setenv("GPTJAX_KEEP_MEMORY", "0")
    assert cpu.keep_freed_memory(big) is False
