"""GPT-2 in Flax linen, mirroring nanoGPT's model.py module for module.

Shape letters used in names and comments throughout gptjax:
  B  batch               T  query length (tokens in this call)
  S  key/value length    C  n_embd (model width)
  N  n_head              H  head size (C // N)
  V  vocab_size          F  MLP hidden width (4 * C)
  L  n_layer

Parameter names follow GPT-2 (`wte wpe h_0.. ln_1 attn c_attn c_proj ln_2 mlp c_fc ln_f`) and
Dense kernels are stored (in, out) like HF's Conv1D, so weight import/export is a rename (plus a
transpose for nanoGPT's nn.Linear layout). The modern recipe's options (rotary, RMSNorm, QK-norm,
ReLU², an untied `lm_head`, zero-initialised projections, logit soft-capping; gptjax.layers) are
GPTConfig fields whose defaults are GPT-2's. How the model runs on the hardware at hand (attention,
Dense product, activation layout) is not decided here: it comes in as a `Kernels` record.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax import cpu
from gptjax.attention import cached_attention, fused_causal_attention, masked_attention
from gptjax.kernels import Kernels
from gptjax.kvcache import KVCache, write
from gptjax.layers import (ACTIVATIONS, NORMS, POS_EMBEDDINGS, activation, apply_rotary, dense, norm, proj_std,
                           rms_normalize, rotary_angles)

# GPTConfig fields that say how a model is computed or initialised, not what its weights are: a run
# may set them on weights it loads
RUN_SETTINGS = ("dropout", "dtype", "remat", "scan_layers", "zero_init_proj")
# The fields of the modern recipe, with GPT-2's values: a model with any other value has no GPT-2
# (HF or nanoGPT) equivalent
GPT2_ARCHITECTURE = dict(pos_embedding="learned", norm="layernorm", qk_norm=False, tie_embeddings=True,
                         logit_softcap=0.0)
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Model hyper-parameters; defaults are nanoGPT's (GPT-2 124M with the vocab padded to 50304).
    TrainConfig takes these fields as its own, so they are declared and checked here only."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Dense and LayerNorm, as GPT-2; False is a bit better and faster
    dtype: str = "float32"  # compute dtype; parameters always stay float32
    activation: str = "gelu"  # "gelu": exact erf (nanoGPT); "gelu_tanh": HF GPT-2's gelu_new; "relu2": ReLU²
    layer_norm_eps: float = 1e-5  # epsilon of every norm
    # the modern recipe (modded-nanogpt, nanochat); the defaults are GPT-2's
    pos_embedding: str = "learned"  # "learned": GPT-2's wpe table; "rotary": rotary q and k, no wpe
    rope_theta: float = 10000.0  # rotary base: pair i turns by position * rope_theta^(-2i/head_size)
    norm: str = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm" (without parameters)
    qk_norm: bool = False  # RMSNorm (without parameters) on each head's queries and keys
    tie_embeddings: bool = True  # the output head is wte (GPT-2); False: its own lm_head
    zero_init_proj: bool = False  # every c_proj starts at zero, so each block starts as the identity
    logit_softcap: float = 0.0  # > 0: logits squashed to cap * tanh(logits / cap)
    remat: str = "none"  # rematerialise each block in the backward pass: "full" or "dots" (keep matmuls)
    scan_layers: bool = False  # one block scanned over the layers: fast compiles for deep models

    def __post_init__(self):
        problems = self.model_problems()
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def model_problems(self, unresolved: tuple[str, ...] = ()) -> list[str]:
        """What is wrong with the model fields; `unresolved` names fields that may still hold a
        placeholder decided later (TrainConfig: vocab_size 0, dtype 'auto')."""
        problems = []
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if value <= 0 and not (name in unresolved and value == 0):
                problems.append(f"{name}={value} must be positive")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                            "choose n_embd as a multiple of n_head")
        dtypes = (("auto",) if "dtype" in unresolved else ()) + DTYPES
        for name, allowed in (("activation", ACTIVATIONS), ("remat", REMAT_POLICIES), ("dtype", dtypes),
                              ("pos_embedding", POS_EMBEDDINGS), ("norm", NORMS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} must be one of {', '.join(map(repr, allowed))}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if not self.layer_norm_eps > 0:
            problems.append(f"layer_norm_eps={self.layer_norm_eps} must be positive")
        if self.pos_embedding == "rotary" and self.n_head > 0 and self.head_size % 2:
            problems.append(f"pos_embedding='rotary' turns pairs of a head's channels, and head_size="
                            f"{self.head_size} (n_embd / n_head) is odd: choose an even head size")
        if not self.rope_theta > 0:
            problems.append(f"rope_theta={self.rope_theta} must be positive")
        if not self.logit_softcap >= 0:
            problems.append(f"logit_softcap={self.logit_softcap} must be positive, or 0 for none")
        return problems

    @classmethod
    def from_fields(cls, source, **overrides) -> "GPTConfig":
        """The GPTConfig of a dict (checkpoint metadata, a run's config.json) or of an object with
        these fields (a TrainConfig), with `overrides`; keys that are not the model's are left out."""
        get = source.get if isinstance(source, dict) else lambda name, default: getattr(source, name, default)
        missing = object()
        values = {f.name: get(f.name, missing) for f in dataclasses.fields(GPTConfig)}
        values.update(overrides)
        return GPTConfig(**{k: v for k, v in values.items() if v is not missing})

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def not_gpt2(self) -> list[str]:
        """The modern-recipe settings of this model that GPT-2's formats (HF, nanoGPT) cannot hold."""
        changed = [f"{k}={getattr(self, k)!r}" for k, v in GPT2_ARCHITECTURE.items() if getattr(self, k) != v]
        return changed + ([f"activation={self.activation!r}"] if self.activation == "relu2" else [])


# GPT-2's published sizes; the released checkpoints have vocab 50257 and biases.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class CausalSelfAttention(nn.Module):
    config: GPTConfig
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool = True, cache: KVCache | None = None, rotary=None):
        """Causal self-attention; with a cache (this layer's kv), the new tokens' keys and values
        are written into it and they attend to every earlier position. rotary: the (cos, sin) of
        the tokens' positions (pos_embedding='rotary'). Returns (y, new kv or None)."""
        cfg, kernels = self.config, self.kernels
        B, T, C = x_BxTxC.shape
        N, H = cfg.n_head, cfg.head_size
        qkv_BxTx3C = dense(3 * C, cfg, kernels, 0.02, "c_attn")(x_BxTxC)
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH = (a.reshape(B, T, N, H) for a in jnp.split(qkv_BxTx3C, 3, axis=-1))
        if cfg.qk_norm:
            q_BxTxNxH, k_BxTxNxH = (rms_normalize(a, cfg.layer_norm_eps) for a in (q_BxTxNxH, k_BxTxNxH))
        if rotary is not None:  # after the norm: the rotation keeps each head's rms as it is
            q_BxTxNxH, k_BxTxNxH = (apply_rotary(a, *rotary) for a in (q_BxTxNxH, k_BxTxNxH))
        attn_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and not deterministic else None

        new_kv = None
        if cache is not None:
            new_kv = {name: write(cache.kv[name], new_BxTxNxH.transpose(0, 2, 1, 3), cache.pos)
                      for name, new_BxTxNxH in (("k", k_BxTxNxH), ("v", v_BxTxNxH))}
            k_blocks, v_blocks = (tuple(b.astype(q_BxTxNxH.dtype) for b in new_kv[name]) for name in ("k", "v"))
            y_BxTxNxH = cached_attention(q_BxTxNxH, k_blocks, v_blocks, cache.pos)
        elif kernels.attention in ("blocked", "head_groups"):
            attend = cpu.blocked_causal_attention if kernels.attention == "blocked" else cpu.head_group_causal_attention
            y_BxTxNxH = attend(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, None, attn_dropout, deterministic)
        elif kernels.attention == "plain" or attn_dropout is not None:  # the fused kernels have no dropout
            mask_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
            y_BxTxNxH = masked_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, mask_TxT, attn_dropout, deterministic)
        else:
            y_BxTxNxH = fused_causal_attention(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, kernels.attention,
                                               fall_back=kernels.cudnn_fallback)
        y_BxTxC = dense(C, cfg, kernels, proj_std(cfg), "c_proj")(y_BxTxNxH.reshape(B, T, C))
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic), new_kv


class MLP(nn.Module):
    config: GPTConfig
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool = True):
        cfg = self.config
        h_BxTxF = dense(4 * cfg.n_embd, cfg, self.kernels, 0.02, "c_fc")(x_BxTxC)
        h_BxTxF = activation(h_BxTxF, cfg.activation)
        y_BxTxC = dense(cfg.n_embd, cfg, self.kernels, proj_std(cfg), "c_proj")(h_BxTxF)
        return nn.Dropout(cfg.dropout)(y_BxTxC, deterministic=deterministic)


class Block(nn.Module):
    config: GPTConfig
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_BxTxC, deterministic: bool = True, cache: KVCache | None = None, rotary=None):
        cfg = self.config
        x_BxTxC = self.kernels.pin_batch(x_BxTxC)
        y_BxTxC, new_kv = CausalSelfAttention(cfg, self.kernels, name="attn")(
            norm(cfg, "ln_1")(x_BxTxC), deterministic, cache, rotary)
        x_BxTxC = x_BxTxC + y_BxTxC
        x_BxTxC = x_BxTxC + MLP(cfg, self.kernels, name="mlp")(norm(cfg, "ln_2")(x_BxTxC), deterministic)
        return x_BxTxC, new_kv


def _block_class(cfg: GPTConfig, caching: bool):
    """Block, rematerialised in the backward pass as cfg.remat asks; a cached forward (inference)
    never is, and the parameters are the same either way."""
    if cfg.remat == "none" or caching:
        return Block
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # deterministic (arg 2, counting self) decides the graph, so it must be static
    return nn.remat(Block, policy=policy, static_argnums=(2,))


class _ScanBody(nn.Module):
    """Block as a scan body: x carried, this layer's kv scanned, the cache's settings, the rotary
    angles and deterministic broadcast."""

    config: GPTConfig
    kernels: Kernels

    @nn.compact
    def __call__(self, x_BxTxC, layer_kv, cache: KVCache | None, rotary, deterministic: bool):
        block = _block_class(self.config, cache is not None)(self.config, self.kernels, name="block")
        return block(x_BxTxC, deterministic, None if cache is None else cache.replace(kv=layer_kv), rotary)


class GPT(nn.Module):
    """GPT-2: one forward for training, evaluation, prefill and cached decoding.

    `kernels` (gptjax.kernels, chosen at set-up for the devices in use) says how it runs; the
    default is plain XLA, correct everywhere."""

    config: GPTConfig
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, idx_BxT, deterministic: bool = True, cache: KVCache | None = None, logits_at=None):
        """Float32 logits (B, T, V) of the T tokens idx_BxT.

        cache: the tokens sit at positions cache.pos.. (else 0..T-1) and attend to the cache's
          earlier positions; returns (logits, the cache with their keys and values written). The
          caller keeps pos + T within the cache. Inference only (deterministic).
        logits_at: (B,) one index per row: the head is applied only there, logits (B, V), as
          nanoGPT's inference forward (the head over every position is a large share of a step);
          or (B, K) indices per row, logits (B, K, V) (scoring only a continuation's positions).
        """
        cfg = self.config
        T = idx_BxT.shape[1]
        if cache is None:
            if T > cfg.block_size:
                raise ValueError(f"cannot forward a sequence of length {T}: block_size is only {cfg.block_size}")
            positions = jnp.arange(T)
        else:
            if not deterministic:
                raise ValueError("the KV-cache forward is for inference: call it with deterministic=True")
            pos = jnp.asarray(cache.pos)
            positions = (pos[:, None] if pos.ndim else pos) + jnp.arange(T)
        embed = dict(embedding_init=nn.initializers.normal(stddev=0.02), dtype=cfg.compute_dtype,
                     param_dtype=jnp.float32)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, name="wte", **embed)
        x_BxTxC = wte(idx_BxT)
        rotary = None
        if cfg.pos_embedding == "rotary":
            rotary = rotary_angles(positions, cfg.head_size, cfg.rope_theta)
        else:
            wpe_TxC = nn.Embed(cfg.block_size, cfg.n_embd, name="wpe", **embed)(positions)
            x_BxTxC = x_BxTxC + (wpe_TxC if wpe_TxC.ndim == 3 else wpe_TxC[None])
        x_BxTxC = nn.Dropout(cfg.dropout, name="drop")(x_BxTxC, deterministic=deterministic)

        if cfg.scan_layers:
            # flax passes broadcast arguments through untraced, so `deterministic` stays a Python bool
            blocks = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layer)
            x_BxTxC, new_kv = blocks(cfg, self.kernels, name="h")(
                x_BxTxC, None if cache is None else cache.kv, None if cache is None else cache.replace(kv=None),
                rotary, deterministic)
        else:
            block_class = _block_class(cfg, cache is not None)
            new_kv = []
            for i in range(cfg.n_layer):
                x_BxTxC, layer_kv = block_class(cfg, self.kernels, name=f"h_{i}")(
                    x_BxTxC, deterministic, None if cache is None else cache.replace(kv=cache.kv[i]), rotary)
                new_kv.append(layer_kv)

        if logits_at is not None:
            at_BxK = jnp.asarray(logits_at).reshape(idx_BxT.shape[0], -1)
            x_BxTxC = jnp.take_along_axis(x_BxTxC, at_BxK[:, :, None], axis=1)  # (B, K, C)
        x_BxTxC = norm(cfg, "ln_f")(x_BxTxC)
        # logits come out in float32 whatever the compute dtype
        if cfg.tie_embeddings:
            logits = jnp.einsum("btc,vc->btv", x_BxTxC, wte.embedding.astype(cfg.compute_dtype),
                                preferred_element_type=jnp.float32)
        else:
            head_CxV = self.param("lm_head", nn.initializers.normal(stddev=0.02), (cfg.n_embd, cfg.vocab_size))
            logits = jnp.einsum("btc,cv->btv", x_BxTxC, head_CxV.astype(cfg.compute_dtype),
                                preferred_element_type=jnp.float32)
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        if logits_at is not None and jnp.ndim(logits_at) == 1:
            logits = logits[:, 0]
        return logits if cache is None else (logits, cache.replace(kv=new_kv))


def _is_params(tree) -> bool:
    return isinstance(tree, dict) and "wte" in tree


def to_scan_layout(tree, n_layer: int):
    """Every params-shaped dict in `tree` (parameters, gradients, Adam moments, a whole train
    state) from GPT-2's per-layer layout (h_0 .. h_{L-1}) to scan_layers' (h/block, with a leading
    layer axis); a tree already scanned is returned as it is. Checkpoints and exports always hold
    the per-layer layout."""

    def stack(params):
        if not _is_params(params) or "h" in params:
            return params
        layers = [params[f"h_{i}"] for i in range(n_layer)]
        out = {k: v for k, v in params.items() if not k.startswith("h_")}
        out["h"] = {"block": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)}
        return out

    return jax.tree_util.tree_map(stack, tree, is_leaf=_is_params)


def to_gpt2_layout(tree):
    """The inverse of `to_scan_layout`; a tree already per-layer is returned as it is."""

    scanned = [p["h"] for p in jax.tree_util.tree_leaves(tree, is_leaf=_is_params) if _is_params(p) and "h" in p]
    # an optimizer's masked copy of the tree may hold no arrays under h: any other copy has the layers
    n_layer = next((leaves[0].shape[0] for leaves in map(jax.tree_util.tree_leaves, scanned) if leaves), 0)

    def unstack(params):
        if not _is_params(params) or "h" not in params:
            return params
        stacked = params["h"]["block"]
        out = {k: v for k, v in params.items() if k != "h"}
        for i in range(n_layer):
            out[f"h_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
        return out

    return jax.tree_util.tree_map(unstack, tree, is_leaf=_is_params)


@functools.partial(jax.jit, static_argnums=0)  # eager init dispatches hundreds of tiny ops
def init_params(cfg: GPTConfig, key: jax.Array) -> dict:
    """nanoGPT-initialised parameters (the `params` collection, without the outer wrapper)."""
    idx_1xT = jnp.zeros((1, min(cfg.block_size, 8)), dtype=jnp.int32)
    return GPT(cfg).init(key, idx_1xT)["params"]


def num_params(params, non_embedding: bool = True) -> int:
    """Parameter count as nanoGPT's get_num_params: the position embedding is left out by
    default; the token embedding counts where it is also the output head (tied)."""
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    if non_embedding:
        total -= params["wpe"]["embedding"].size if "wpe" in params else 0
        total -= params["wte"]["embedding"].size if "lm_head" in params else 0
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
    if "wpe" in params:  # rotary models have no table to crop
        params["wpe"] = {"embedding": params["wpe"]["embedding"][:block_size]}
    return params, dataclasses.replace(cfg, block_size=block_size)
