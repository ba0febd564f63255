"""AdamW as nanoGPT configures it, and nanoGPT's learning-rate schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gptjax.config import TrainConfig


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """nanoGPT's schedule as a traceable function of the step: linear warmup lr*(it+1)/(warmup+1),
    cosine down to min_lr at lr_decay_iters, min_lr after; constant when decay_lr is off."""
    lr, min_lr = cfg.learning_rate, cfg.min_lr
    warmup, decay = cfg.warmup_iters, cfg.lr_decay_iters

    def schedule(step):
        it = jnp.asarray(step, jnp.float32)
        if not cfg.decay_lr:
            return jnp.full((), lr, jnp.float32)
        warm = lr * (it + 1) / (warmup + 1)
        ratio = jnp.clip((it - warmup) / max(decay - warmup, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (lr - min_lr)
        return jnp.where(it < warmup, warm, jnp.where(it > decay, min_lr, cosine))

    return schedule


def decay_mask(params):
    """nanoGPT decays every parameter of 2 or more dimensions (weights, embeddings) and no
    bias or LayerNorm parameter. Under 'h' (scan_layers) a leading layer axis is not counted."""

    def decays(path, p):
        stacked = getattr(path[0], "key", None) == "h"
        return p.ndim - int(stacked) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (0 disables), then AdamW with nanoGPT's betas, eps 1e-8 (torch's)
    and weight-decay split."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(cfg),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=1e-8,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
