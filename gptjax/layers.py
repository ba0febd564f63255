"""The layers GPT's modules are built from: Dense, the norms, the MLP activations and rotary
position embeddings. GPT-2's own pieces are the defaults; the others are the "modern recipe"
options of GPTConfig (as modded-nanogpt and nanochat define them), each one config field.

Shape letters as in gptjax.model.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import cpu
from gptjax.kernels import Kernels

ACTIVATIONS = ("gelu", "gelu_tanh", "relu2")
NORMS = ("layernorm", "rmsnorm")
POS_EMBEDDINGS = ("learned", "rotary")


def dense(features: int, cfg, kernels: Kernels, std: float, name: str) -> nn.Dense:
    """A Dense layer, kernel (in, out) as HF's Conv1D, initialised N(0, std) (std 0: zeros)."""
    extra = {} if kernels.matmul == "xla" else {
        "dot_general": cpu.dense_dot_general(kernels.row_blocks, kernels.transposed_copy)}
    return nn.Dense(
        features,
        use_bias=cfg.bias,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(stddev=std) if std else nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        name=name,
        **extra,
    )


def norm(cfg, name: str) -> nn.Module:
    """GPT-2's LayerNorm (scale, and a bias when cfg.bias), or RMSNorm without parameters (modded-
    nanogpt's and nanochat's F.rms_norm). Flax computes the statistics in float32 for bf16 inputs."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=cfg.layer_norm_eps, use_scale=False, dtype=cfg.compute_dtype, name=name)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                        param_dtype=jnp.float32, name=name)


def rms_normalize(x, eps: float):
    """x / rms(x) over the last axis, in float32, without parameters (QK-norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def proj_std(cfg) -> float:
    """Init std of the residual projections (c_proj): GPT-2's 0.02/sqrt(2 n_layer), or 0 with
    zero_init_proj (modded-nanogpt: each block starts as the identity)."""
    return 0.0 if cfg.zero_init_proj else 0.02 / math.sqrt(2 * cfg.n_layer)


def gelu(x, approximate: bool):
    """GELU; the exact one as PyTorch's nn.GELU computes it, x/2 (1 + erf(x/sqrt 2)) (jax.nn.gelu
    goes through erfc, which XLA's CPU backend evaluates more slowly)."""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def activation(x, name: str):
    """The MLP's nonlinearity: exact GELU (nanoGPT), tanh GELU (HF's gelu_new) or ReLU²."""
    if name == "relu2":
        return jnp.square(jax.nn.relu(x))
    return gelu(x, approximate=name == "gelu_tanh")


def rotary_angles(positions, head_size: int, theta: float):
    """(cos, sin) of rotary embeddings, each (..., T, H/2), for positions (T,) or (B, T): pair i of
    each head turns by position * theta^(-2i/H)."""
    inv_freq = theta ** (-jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size)
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x_BxTxNxH, cos, sin):
    """Rotate the pairs (x[i], x[i + H/2]) of every head by the angles of its position (the split-
    half layout of modded-nanogpt, nanochat and HF's LLaMA); cos/sin (T, H/2) or (B, T, H/2)."""
    cos, sin = cos[..., None, :], sin[..., None, :]  # a head axis: (.., T, 1, H/2)
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)
