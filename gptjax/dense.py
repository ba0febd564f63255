"""The Dense layers' matrix product, shaped on CPU for the XLA matmul kernels that run fastest.

A Dense layer's weight gradient is x^T dy, a product over the tokens: (M, C)^T (M, D) -> (C, D)
with M = B*T. XLA writes it as a dot contracting the major dimension of both operands, and its
CPU backend hands such a dot to a generic Eigen kernel instead of YNNPACK, which takes only dots
whose left operand contracts its minor dimension. Measured on this repository's 2-core CPU host
(docs/benchmarks.md) the Eigen kernel runs the CPU recipe's weight gradients at 42-61 GFLOP/s
against 70-80 for YNNPACK, and they were 11.8 of the 40 ms a device spends on a step.

So on CPU the backward pass here transposes one operand into a real (minor-contracting) copy
first. XLA folds a plain transpose straight back into the dot's dimension numbers, hence the
optimization barriers. The narrower operand is the one copied: transposing the 4C-wide MLP
activation costs ~1.4 ms per layer (XLA fuses it with the GELU and walks it with a 2 KB stride),
transposing the C-wide gradient ~0.08 ms.

A tall product with a short contraction (M >= 4096 rows, K <= 512: at the shakespeare_char size,
8192 rows per device, the forward c_attn, c_fc and attn.c_proj and the input gradients of both
c_proj) runs at ~50-55 GFLOP/s as one YNNPACK call and at ~62-76 in blocks of 256 rows, so on one
device's arrays it is computed block by block (7% of the whole shakespeare_char step).

Elsewhere (GPU, TPU) the plain product is used: their matmul libraries take either operand
transposed as it is, and tile tall products themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax import sharding


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """A drop-in `dot_general` for `nn.Dense`: x (..., C) times kernel (C, D), through
    `matmul_cpu_grads` on CPU."""
    dense_dims = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (jax.default_backend() == "cpu" and rhs.ndim == 2 and dimension_numbers == dense_dims
            and precision is None and preferred_element_type is None):
        return matmul_cpu_grads(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def _matmul(x_NxK, w, w_contracting: int = 0):
    """x (..., K) times w over x's last axis and w's axis `w_contracting` (0: w is (K, D),
    1: w is (D, K), i.e. x @ w.T)."""
    return jax.lax.dot_general(x_NxK, w, (((x_NxK.ndim - 1,), (w_contracting,)), ((), ())))


# Row blocks for tall products with a short contraction (module docstring).
CHUNK_ROWS = 256
CHUNK_MIN_ROWS = 4096
CHUNK_MAX_CONTRACTION = 512


def _cpu_matmul(x_NxK, w, w_contracting: int = 0):
    """_matmul, in row blocks when x is tall and the contraction short (module docstring). Only on
    one device's arrays: a loop over blocks of a partitioned axis would gather it onto every
    device."""
    K = x_NxK.shape[-1]
    x_MxK = x_NxK.reshape(-1, K)
    M = x_MxK.shape[0]
    if (M < CHUNK_MIN_ROWS or M % CHUNK_ROWS or K > CHUNK_MAX_CONTRACTION
            or not sharding.traced_per_device()):
        return _matmul(x_NxK, w, w_contracting)
    blocks_GxRxK = x_MxK.reshape(M // CHUNK_ROWS, CHUNK_ROWS, K)
    y_GxRxD = jax.lax.map(lambda x_RxK: _matmul(x_RxK, w, w_contracting), blocks_GxRxK)
    return y_GxRxD.reshape(x_NxK.shape[:-1] + (w.shape[1 - w_contracting],))


@jax.custom_vjp
def matmul_cpu_grads(x_NxC, w_CxD):
    """x @ w over x's last axis (any leading shape N), tall products in row blocks; its gradients
    are those of x @ w, the weight gradient computed in the layout XLA's fast CPU kernels take
    (module docstring)."""
    return _cpu_matmul(x_NxC, w_CxD)


def _forward(x_NxC, w_CxD):
    return _cpu_matmul(x_NxC, w_CxD), (x_NxC, w_CxD)


def _backward(residuals, dy_NxD):
    x_NxC, w_CxD = residuals
    dx_NxC = _cpu_matmul(dy_NxD, w_CxD, w_contracting=1)
    C, D = w_CxD.shape
    x_MxC, dy_MxD = x_NxC.reshape(-1, C), dy_NxD.reshape(-1, D)
    barrier = jax.lax.optimization_barrier
    if C <= D:
        dw_CxD = jnp.matmul(barrier(x_MxC.T), dy_MxD)
    else:
        dw_CxD = barrier(jnp.matmul(barrier(dy_MxD.T), x_MxC)).T
    return dx_NxC, dw_CxD


matmul_cpu_grads.defvjp(_forward, _backward)
