"""The train state, its sharded creation, and the pure jitted train and eval steps."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gptjax import cpu, sharding
from gptjax.kernels import Kernels
from gptjax.model import GPT, GPTConfig, init_params, to_scan_layout


# torch.cuda.amp.GradScaler's defaults, which nanoGPT trains float16 with
LOSS_SCALE_INIT = 2.0**16
LOSS_SCALE_GROWTH_INTERVAL = 2000


@flax.struct.dataclass
class LossScale:
    """Dynamic loss scaling for float16 compute, as torch's GradScaler: the loss is multiplied by
    `scale` before backprop so that small gradients do not flush to zero in float16; a step whose
    gradients overflow is skipped and halves the scale, and LOSS_SCALE_GROWTH_INTERVAL good steps
    in a row double it. Powers of two, so scaling and unscaling are exact."""

    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32 scalar: finite steps since the scale last changed

    def update(self, grads_finite: jax.Array) -> "LossScale":
        grown = self.good_steps + 1 >= LOSS_SCALE_GROWTH_INTERVAL
        scale = jnp.where(grads_finite, jnp.where(grown, self.scale * 2, self.scale), self.scale / 2)
        good_steps = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return LossScale(scale=scale, good_steps=good_steps.astype(jnp.int32))


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far (= nanoGPT's iter_num)
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 PRNG key of the dropout stream; step n's key is fold_in(rng, n)
    skipped: jax.Array  # int32 scalar: updates skipped for non-finite loss or gradients
    loss_scale: LossScale | None = None  # float16 compute only (None: no leaves, so other
    # dtypes' checkpoints keep their layout)


def loss_fn(params, model: GPT, x_BxT, y_BxT, dropout_key=None):
    """Mean next-token cross entropy in float32 over every position, as nanoGPT's forward."""
    deterministic = dropout_key is None
    rngs = None if deterministic else {"dropout": dropout_key}
    logits_BxTxV = model.apply({"params": params}, x_BxT, deterministic=deterministic, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, y_BxT).mean()


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(initialisation key, dropout key): two streams split from the run's seed."""
    init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, dropout_key


def _init_state(cfg: GPTConfig, optimizer, seed: int, params=None) -> TrainState:
    init_key, dropout_key = seed_keys(seed)
    params = init_params(cfg, init_key) if params is None else params
    loss_scale = None
    if cfg.dtype == "float16":
        loss_scale = LossScale(scale=jnp.float32(LOSS_SCALE_INIT), good_steps=jnp.zeros((), jnp.int32))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=dropout_key,
        skipped=jnp.zeros((), jnp.int32),
        loss_scale=loss_scale,
    )


def abstract_train_state(cfg: GPTConfig, optimizer, mesh: Mesh, seed: int, params=None):
    """(state as ShapeDtypeStructs with their shardings, state_shardings) of `create_train_state`,
    computing nothing: what a checkpoint is restored into, with no state initialised first."""
    abstract = jax.eval_shape(functools.partial(_init_state, cfg, optimizer, seed), _scan_layout(cfg, params))
    shardings = sharding.state_shardings(abstract, mesh)
    laid_out = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s, weak_type=x.weak_type), abstract, shardings)
    return laid_out, shardings


def _scan_layout(cfg: GPTConfig, params):
    return to_scan_layout(params, cfg.n_layer) if params is not None and cfg.scan_layers else params


def create_train_state(cfg: GPTConfig, optimizer, mesh: Mesh, seed: int, params=None, shardings=None):
    """(state, state_shardings), the state created already laid out over the mesh, so a model
    bigger than one device's memory never exists whole on one device. `params` (e.g. imported
    GPT-2 weights, in GPT-2's per-layer layout) replace the random initialisation; `shardings`:
    `abstract_train_state`'s, when the caller has them already."""
    if shardings is None:
        _, shardings = abstract_train_state(cfg, optimizer, mesh, seed, params)
    params = _scan_layout(cfg, params)
    init = functools.partial(_init_state, cfg, optimizer, seed)
    if params is None:
        state = jax.jit(lambda: init(), out_shardings=shardings)()
    else:
        params = jax.device_put(params, shardings.params)
        state = jax.jit(init, out_shardings=shardings)(params)
    return state, shardings


def _accumulated_grads(params, x_AxBxT, y_AxBxT, step_key, model: GPT, scale=None):
    """(mean loss, mean gradients) over the A micro-batches, accumulated in a scan. With a loss
    `scale` the backward pass runs on loss * scale; both come back unscaled."""
    n_micro = x_AxBxT.shape[0]
    use_dropout = model.config.dropout > 0
    if scale is None:
        grad_fn = jax.value_and_grad(loss_fn)
    else:
        grad_fn = jax.value_and_grad(lambda *args: loss_fn(*args) * scale)

    def accumulate(carry, micro):
        loss_sum, grads_sum = carry
        i, x_BxT, y_BxT = micro
        key = jax.random.fold_in(step_key, i) if use_dropout else None
        loss, grads = grad_fn(params, model, x_BxT, y_BxT, key)
        return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grads_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    micro = (jnp.arange(n_micro), x_AxBxT, y_AxBxT)
    (loss_sum, grads_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
    total = n_micro if scale is None else n_micro * scale
    return loss_sum / total, jax.tree_util.tree_map(lambda g: g / total, grads_sum)


def train_step(state: TrainState, batch, *, model: GPT, optimizer, schedule: Callable, mesh: Mesh | None = None):
    """One optimizer update on a batch of (x, y), each (A, B, T): the A micro-batches are
    accumulated in a scan, so A micro-batches of B give the update of one batch of A*B.

    A non-finite loss or gradient norm never reaches the parameters: the update is skipped and
    counted, and the host decides whether to stop (metrics['nonfinite']). Under float16 loss
    scaling, gradients that overflow with a finite loss are the scaler's business: the update is
    skipped, the scale halves, and the run goes on. `mesh`: the devices' mesh, which
    model.kernels.grad_reduce='flat' runs its shard_map over."""
    x_AxBxT, y_AxBxT = batch
    step_key = jax.random.fold_in(state.rng, state.step)
    scale = None if state.loss_scale is None else state.loss_scale.scale
    if model.kernels.grad_reduce == "flat":  # each device's shard alone (no dropout), one all-reduce
        grads_of = cpu.flat_data_parallel(lambda *args: _accumulated_grads(*args[:3], None, model, args[3]), mesh)
        loss, grads = grads_of(state.params, x_AxBxT, y_AxBxT, scale)
    else:
        loss, grads = _accumulated_grads(state.params, x_AxBxT, y_AxBxT, step_key, model, scale)
    grad_norm = optax.tree.norm(grads)
    loss_finite, grads_finite = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    finite = loss_finite & grads_finite
    nonfinite = ~finite if scale is None else ~loss_finite

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Keep the previous parameters on a bad step: lax.cond picks whole trees, so no NaN from the
    # rejected update can leak into the kept state.
    params, opt_state = jax.lax.cond(
        finite, lambda: (new_params, new_opt_state), lambda: (state.params, state.opt_state)
    )
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        loss_scale=None if scale is None else state.loss_scale.update(grads_finite),
    )
    metrics = {
        # the optimizer's schedule counts applied updates, which skipped ones are not
        "loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped),
        "nonfinite": nonfinite, "skipped": new_state.skipped,
    }
    if scale is not None:
        metrics["loss_scale"] = scale
    return new_state, metrics


def eval_step(params, batch, *, model: GPT, mesh: Mesh | None = None):
    """Mean loss over the (A, B, T) batch, dropout off; per device shard where the train step is."""
    def mean_loss(params, x_AxBxT, y_AxBxT):
        return jax.lax.map(lambda xy: loss_fn(params, model, xy[0], xy[1]), (x_AxBxT, y_AxBxT)).mean()

    if model.kernels.grad_reduce == "flat":
        mean_loss = cpu.flat_data_parallel(mean_loss, mesh)
    return mean_loss(params, *batch)


def jit_steps(cfg: GPTConfig, kernels: Kernels, optimizer, schedule, state_shardings, mesh: Mesh):
    """The jitted (train_step, eval_step) of GPT(cfg, kernels), with shardings fixed at jit and the
    state donated; the train step compiles with the kernels' dot library."""
    model = GPT(cfg, kernels)
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    train = jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule, mesh=mesh),
        in_shardings=(state_shardings, (batch_sharding, batch_sharding)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
        compiler_options=kernels.compiler_options,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, mesh=mesh),
        in_shardings=(state_shardings.params, (batch_sharding, batch_sharding)),
        out_shardings=replicated,  # XLA's own dot library: `--tune` measures (and so vets) the train step only
    )
    return train, evaluate
