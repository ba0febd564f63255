"""The optimizers: AdamW as nanoGPT configures it, or Muon for the blocks' matrices with AdamW for
the rest (modded-nanogpt's and nanochat's split); nanoGPT's learning-rate schedule for both."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

from gptjax.config import TrainConfig
from gptjax.sharding import DATA_AXES, data_size


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


def _scaled(schedule: optax.Schedule, base_lr: float, lr: float) -> optax.Schedule:
    """`schedule`'s shape at another peak: lr * schedule(step) / base_lr."""
    return lambda step: schedule(step) * (lr / base_lr)


def _stacked(path) -> bool:
    """Whether a leaf lies under scan_layers' 'h', with a leading layer axis."""
    return getattr(path[0], "key", None) == "h"


def decay_mask(params):
    """nanoGPT decays every parameter of 2 or more dimensions (weights, embeddings) and no
    bias or LayerNorm parameter. Under 'h' (scan_layers) a leading layer axis is not counted."""
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - int(_stacked(path)) >= 2, params)


def param_groups(params):
    """Each parameter's optimizer group: 'muon' for the blocks' Dense kernels, 'embedding' (wte,
    wpe), 'head' (an untied lm_head) and 'adamw' for the rest (norms, biases)."""

    def group(path, p):
        names = [getattr(k, "key", "") for k in path]
        if names[0] in ("wte", "wpe"):
            return "embedding"
        if names[0] == "lm_head":
            return "head"
        return "muon" if names[-1] == "kernel" and (names[0] == "h" or names[0].startswith("h_")) else "adamw"

    return jax.tree_util.tree_map_with_path(group, params)


def _is_qkv(path) -> bool:
    return len(path) >= 2 and [getattr(k, "key", None) for k in path[-2:]] == ["c_attn", "kernel"]


def _muon_dims(params):
    """Muon's matrix axes of each block kernel: c_attn's (C, 3C) as three (C, C) matrices (q, k
    and v orthogonalised apart, as modded-nanogpt and nanochat do), reshaped by _split_qkv."""

    def dims(path, p):
        batch = int(_stacked(path))  # scan_layers' layer axis is a batch of matrices
        if _is_qkv(path):
            return MuonDimensionNumbers(reduction_axis=batch, output_axis=batch + 2)  # (.., C, 3, C)
        return MuonDimensionNumbers(reduction_axis=batch, output_axis=batch + 1)

    return jax.tree_util.tree_map_with_path(dims, params)


def _split_qkv(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` run on c_attn kernels viewed as (.., C, 3, C), the rest as they are."""

    def view(tree, split: bool):
        def reshape(path, x):
            if not _is_qkv(path):
                return x
            return x.reshape(*x.shape[:-1], 3, x.shape[-1] // 3) if split else x.reshape(*x.shape[:-2], -1)
        return jax.tree_util.tree_map_with_path(reshape, tree)

    def init(params):
        return inner.init(view(params, True))

    def update(updates, state, params=None):
        updates, state = inner.update(view(updates, True), state, None if params is None else view(params, True))
        return view(updates, False), state

    return optax.GradientTransformation(init, update)


def _layers_split(inner: optax.GradientTransformation, mesh) -> optax.GradientTransformation:
    """`inner` with every scanned (layer-stacked) leaf split over the mesh's devices by layer, before
    and after: each device orthogonalises its share of the layers, and the update is gathered."""
    n = data_size(mesh)

    def split(tree):
        def constrain(path, x):
            if not _stacked(path) or x.shape[0] % n:
                return x
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA_AXES)))
        return jax.tree_util.tree_map_with_path(constrain, tree)

    def update(updates, state, params=None):
        updates, state = inner.update(split(updates), state, params)
        return split(updates), state

    return optax.GradientTransformation(inner.init, update)


def _muon(cfg: TrainConfig, schedule: optax.Schedule, mesh: Mesh | None) -> optax.GradientTransformation:
    """optax's Muon (Nesterov momentum, Newton-Schulz with modded-nanogpt's coefficients, the
    sqrt(max(1, out/in)) width scale) on the block kernels; no weight decay, as nanochat."""
    muon = optax.contrib.muon(
        learning_rate=_scaled(schedule, cfg.learning_rate, cfg.muon_lr),
        beta=cfg.muon_momentum,
        eps=1e-7,  # modded-nanogpt's, in the Frobenius normalisation before Newton-Schulz
        muon_weight_dimension_numbers=_muon_dims,
    )
    muon = _split_qkv(muon)
    return muon if mesh is None or data_size(mesh) == 1 else _layers_split(muon, mesh)


def make_optimizer(cfg: TrainConfig, mesh: Mesh | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (0 disables), then AdamW with nanoGPT's betas, eps 1e-8 (torch's) and
    weight-decay split; with optimizer='muon', Muon for the blocks' kernels at muon_lr and AdamW
    for the embeddings (embedding_lr), an untied head (head_lr) and the rest (learning_rate), all
    following lr_schedule's shape. `mesh`: the run's devices, over which Muon shares out a scanned
    model's layers (modded-nanogpt shares its matrices out over GPUs the same way)."""
    schedule = lr_schedule(cfg)

    def adamw(lr: float):
        return optax.adamw(learning_rate=schedule if lr == cfg.learning_rate else _scaled(schedule, cfg.learning_rate, lr),
                           b1=cfg.beta1, b2=cfg.beta2, eps=1e-8, weight_decay=cfg.weight_decay, mask=decay_mask)

    if cfg.optimizer == "muon":
        update = optax.multi_transform(
            {"muon": _muon(cfg, schedule, mesh), "adamw": adamw(cfg.learning_rate),
             "embedding": adamw(cfg.embedding_lr or cfg.learning_rate), "head": adamw(cfg.head_lr or cfg.learning_rate)},
            param_groups)
    else:
        update = adamw(cfg.learning_rate)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), update)
    return update
