"""GPT-2 in Flax linen, mirroring nanoGPT's model.py module for module.

Shape letters used in names and comments throughout gptjax:
  B  batch               T  query length (tokens in this call)
  S  key/value length    C  n_embd (model width)
  N  n_head              H  head size (C // N)
  V  vocab_size          F  MLP hidden width (4 * C)

Parameter names follow GPT-2 (`wte wpe h_0.. ln_1 attn c_attn c_proj ln_2 mlp c_fc ln_f`) and
Dense kernels are stored (in, out) like HF's Conv1D, so weight import/export is a rename (plus a
transpose for nanoGPT's nn.Linear layout).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import sharding
from gptjax.attention import (
    blocked_causal_attention, cached_attention, cpu_query_blocks, fused_attention_impl, fused_causal_attention,
    masked_attention,
)
from gptjax.dense import dense_dot_general

ACTIVATIONS = ("gelu", "gelu_tanh")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "plain", "blocked")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters; defaults are nanoGPT's (GPT-2 124M with the vocab padded to 50304)."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Dense and LayerNorm, as GPT-2; False is a bit better and faster
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    activation: str = "gelu"  # "gelu": exact erf (nanoGPT); "gelu_tanh": HF GPT-2's gelu_new
    layer_norm_eps: float = 1e-5
    # "auto": cuDNN flash attention on a GPU that takes it, else XLA's; on CPU "blocked"
    # (causal attention in query blocks, gptjax.attention). "plain": the softmax written out.
    attention: str = "auto"
    remat: str = "none"  # rematerialise each block in the backward pass: "full" or "dots" (keep matmuls)
    scan_layers: bool = False  # one scanned block (params under 'h' with a leading layer axis): fast compile

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "choose n_embd as a multiple of n_head"
            )
        for name, value, allowed in (
            ("activation", self.activation, ACTIVATIONS),
            ("attention", self.attention, ATTENTION_IMPLS),
            ("remat", self.remat, REMAT_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of ('float32', 'bfloat16', 'float16')")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


# GPT-2's published sizes; vocab 50257 and bias on, as the released checkpoints are.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    """GPTConfig for a released GPT-2 size (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
    fields = dict(block_size=1024, vocab_size=50257, bias=True, activation="gelu_tanh")
    fields.update(PRESETS[name])
    fields.update(overrides)
    return GPTConfig(**fields)


def _dense(features: int, cfg: GPTConfig, std: float, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dot_general=dense_dot_general,
        use_bias=cfg.bias,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(stddev=std),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    # Flax computes LayerNorm statistics in float32 even for bf16 inputs.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        use_bias=cfg.bias,
        dtype=cfg.compute_dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _proj_std(cfg: GPTConfig) -> float:
    # GPT-2 paper: scale residual projections by 1/sqrt(number of residual layers).
    return 0.02 / math.sqrt(2 * cfg.n_layer)


def gelu(x, approximate: bool):
    """GELU; the exact one as PyTorch's nn.GELU computes it, x/2 (1 + erf(x/sqrt 2)). (jax.nn.gelu
    goes through erfc, which XLA's CPU backend evaluates ~2.5x slower.)"""
    if approximate:
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class CausalSelfAttention(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool = True, cache=None, pos=None, key_bucket: int = 0,
                 reach=None):
        """Causal self-attention. With `cache` ({'k','v'}: (B, N, S, H)), the T new tokens sit at
        positions pos..pos+T-1 of the cache; they are written into it and attend to all earlier
        ones (reading the cache in prefixes of key_bucket rows up to `reach`, see `cached_attention`). Returns
        (y, new_cache); new_cache is None without a cache."""
        cfg = self.config
        B, T, C = x_BxTxC.shape
        N, H = cfg.n_head, cfg.head_size
        qkv_BxTx3C = _dense(3 * C, cfg, 0.02, "c_attn")(x_BxTxC)
        q_BxTxC, k_BxTxC, v_BxTxC = jnp.split(qkv_BxTx3C, 3, axis=-1)
        q_BxTxNxH = q_BxTxC.reshape(B, T, N, H)
        k_BxTxNxH = k_BxTxC.reshape(B, T, N, H)
        v_BxTxNxH = v_BxTxC.reshape(B, T, N, H)
        attn_dropout = nn.Dropout(cfg.dropout)
        use_attn_dropout = cfg.dropout > 0 and not deterministic

        new_cache = None
        if cache is not None:
            if use_attn_dropout:
                raise ValueError("the KV-cache forward is for inference: call it with deterministic=True")
            k_BxNxSxH, v_BxNxSxH = (
                jax.lax.dynamic_update_slice(cache[name], new_BxTxNxH.transpose(0, 2, 1, 3).astype(cache[name].dtype),
                                             (0, 0, pos, 0))
                for name, new_BxTxNxH in (("k", k_BxTxNxH), ("v", v_BxTxNxH))
            )
            new_cache = {"k": k_BxNxSxH, "v": v_BxNxSxH}
            y_BxTxNxH = cached_attention(
                q_BxTxNxH, k_BxNxSxH.astype(q_BxTxNxH.dtype), v_BxNxSxH.astype(q_BxTxNxH.dtype), pos, key_bucket,
                reach,
            )
        elif cfg.attention == "blocked" or (cfg.attention == "auto" and jax.default_backend() == "cpu"):
            # XLA's CPU backend has no fused attention: skip the masked score blocks instead
            y_BxTxNxH = blocked_causal_attention(
                q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, cpu_query_blocks(T),
                attn_dropout if use_attn_dropout else None, deterministic,
            )
        elif cfg.attention == "plain" or use_attn_dropout:
            mask_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
            y_BxTxNxH = masked_attention(
                q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask_TxT, attn_dropout, deterministic
            )
        else:
            impl = cfg.attention
            if impl == "auto":
                impl = fused_attention_impl(q_BxTxNxH.dtype, H, jax.devices()[0])
            y_BxTxNxH = fused_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, impl,
                                               fall_back=cfg.attention == "auto")
        y_BxTxC = y_BxTxNxH.reshape(B, T, C)
        y_BxTxC = _dense(C, cfg, _proj_std(cfg), "c_proj")(y_BxTxC)
        y_BxTxC = nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)
        return y_BxTxC, new_cache


class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool = True):
        cfg = self.config
        h_BxTxF = _dense(4 * cfg.n_embd, cfg, 0.02, "c_fc")(x_BxTxC)
        h_BxTxF = gelu(h_BxTxF, approximate=cfg.activation == "gelu_tanh")
        y_BxTxC = _dense(cfg.n_embd, cfg, _proj_std(cfg), "c_proj")(h_BxTxF)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool = True, cache=None, pos=None, key_bucket: int = 0,
                 reach=None):
        cfg = self.config
        # Pin activations to the batch split, or XLA copies the fsdp weight layout into them.
        x_BxTxC = sharding.constrain_batch(x_BxTxC)
        y_BxTxC, new_cache = CausalSelfAttention(cfg, name="attn")(
            _layer_norm(cfg, "ln_1")(x_BxTxC), deterministic, cache, pos, key_bucket, reach
        )
        x_BxTxC = x_BxTxC + y_BxTxC
        x_BxTxC = x_BxTxC + MLP(cfg, name="mlp")(_layer_norm(cfg, "ln_2")(x_BxTxC), deterministic)
        return x_BxTxC, new_cache


def _remat_block(cfg: GPTConfig):
    if cfg.remat == "none":
        return Block
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # deterministic (arg 2, counting self) decides the graph, so it must be static. (GPT.decode,
    # whose key_bucket must be static too, refuses remat.)
    return nn.remat(Block, policy=policy, static_argnums=(2,))


class _ScanBody(nn.Module):
    """Block as a scan body: (carry=x, broadcast deterministic) -> (x, no output)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool):
        block = _remat_block(self.config)(self.config, name="block")
        x_BxTxC, _ = block(x_BxTxC, deterministic)
        return x_BxTxC, None


def _scanned_blocks(cfg: GPTConfig) -> nn.Module:
    # flax passes broadcast arguments through untraced, so `deterministic` stays a Python bool.
    scanned = nn.scan(
        _ScanBody,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=cfg.n_layer,
    )
    return scanned(cfg, name="h")


def stack_layers(params: dict, n_layer: int) -> dict:
    """Per-layer params (h_0 .. h_{L-1}) -> the scan layout (h/block with a leading L axis)."""
    layers = [params[f"h_{i}"] for i in range(n_layer)]
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
    return out


def unstack_layers(params: dict) -> dict:
    """The scan layout -> per-layer params, as GPT-2 names them (for import/export and decode)."""
    stacked = params["h"]["block"]
    n_layer = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "h"}
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
    return out


class GPT(nn.Module):
    """GPT-2. `__call__(idx)` returns float32 logits (B, T, V); `decode` runs on a KV cache."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        embed = dict(
            embedding_init=nn.initializers.normal(stddev=0.02),
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
        )
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, **embed)
        self.wpe = nn.Embed(cfg.block_size, cfg.n_embd, **embed)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.scan_layers:
            self.h_scan = _scanned_blocks(cfg)
        else:
            block = _remat_block(cfg)
            self.h = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def _logits(self, x_BxTxC):
        # The head is tied to wte; logits come out in float32 whatever the compute dtype.
        wte_VxC = self.wte.embedding.astype(self.config.compute_dtype)
        return jnp.einsum("btc,vc->btv", x_BxTxC, wte_VxC, preferred_element_type=jnp.float32)

    def __call__(self, idx_BxT, deterministic: bool = True):
        T = idx_BxT.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {T}: block_size is only {self.config.block_size}"
            )
        x_BxTxC = self.wte(idx_BxT) + self.wpe(jnp.arange(T))[None]
        x_BxTxC = self.drop(x_BxTxC, deterministic=deterministic)
        if self.config.scan_layers:
            x_BxTxC, _ = self.h_scan(x_BxTxC, deterministic)
        else:
            for block in self.h:
                x_BxTxC, _ = block(x_BxTxC, deterministic)
        return self._logits(self.ln_f(x_BxTxC))

    def decode(self, idx_BxT, cache, pos, key_bucket: int = 0, reach=None):
        """Forward T new tokens at positions pos..pos+T-1 on a KV cache (see `init_cache`).

        Returns (logits (B, T, V) float32, new_cache). pos may be a traced scalar; the caller
        keeps pos + T <= cache length (= block_size). key_bucket > 0 reads the cache in prefixes
        of that many rows up to position `reach` (default pos+T-1; see `cached_attention`)."""
        if self.config.scan_layers:
            raise ValueError("decode needs per-layer parameters: use unstack_layers(params) and "
                             "a config with scan_layers=False")
        if self.config.remat != "none":
            raise ValueError(f"decode is for inference: use a config with remat='none' (not {self.config.remat!r}); "
                             "the parameters are the same")
        T = idx_BxT.shape[1]
        positions_T = pos + jnp.arange(T)
        x_BxTxC = self.wte(idx_BxT) + self.wpe(positions_T)[None]
        new_cache = []
        for block, layer_cache in zip(self.h, cache):
            x_BxTxC, layer_cache = block(x_BxTxC, True, layer_cache, pos, key_bucket, reach)
            new_cache.append(layer_cache)
        return self._logits(self.ln_f(x_BxTxC)), new_cache


def init_cache(cfg: GPTConfig, batch_size: int, length: int | None = None, dtype=None):
    """Empty KV cache for `GPT.decode`: per layer {'k','v'} of shape (B, N, S, H), heads major so
    each head's keys and values are contiguous rows the attention products read in place."""
    S = length or cfg.block_size
    shape = (batch_size, cfg.n_head, S, cfg.head_size)
    dtype = dtype or cfg.compute_dtype
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]


@functools.partial(jax.jit, static_argnums=0)  # eager init dispatches hundreds of tiny ops
def init_params(cfg: GPTConfig, key: jax.Array) -> dict:
    """nanoGPT-initialised parameters (the `params` collection, without the outer wrapper)."""
    idx_1xT = jnp.zeros((1, min(cfg.block_size, 8)), dtype=jnp.int32)
    return GPT(cfg).init(key, idx_1xT)["params"]


def num_params(params, non_embedding: bool = True) -> int:
    """Parameter count as nanoGPT's get_num_params: the position embedding is left out by
    default; the token embedding counts because it is also the output head."""
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if non_embedding:
        total -= params["wpe"]["embedding"].size
    return int(total)


def flops_per_token(cfg: GPTConfig, n_params: int, seq_len: int | None = None) -> int:
    """Training FLOPs per token, nanoGPT's estimate_mfu: 6N + 12*L*H*Q*T (PaLM appendix B)."""
    T = seq_len or cfg.block_size
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T


def crop_block_size(params, cfg: GPTConfig, block_size: int):
    """Shrink the context, as nanoGPT's crop_block_size (e.g. to fine-tune GPT-2 at 256)."""
    if block_size > cfg.block_size:
        raise ValueError(f"cannot crop block_size {cfg.block_size} up to {block_size}")
    params = dict(params)
    params["wpe"] = {"embedding": params["wpe"]["embedding"][:block_size]}
    return params, dataclasses.replace(cfg, block_size=block_size)
