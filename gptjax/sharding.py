"""Device mesh and shardings: data parallel on 'data', ZeRO-3 style parameter sharding on 'fsdp'.

Batches are split over both axes (FSDP devices are data-parallel too); parameters and optimizer
state are replicated on 'data' and, when fsdp > 1, split along 'fsdp' on their largest dimension
that divides evenly. XLA inserts the all-gathers and reduce-scatters from these annotations.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 2**12  # smaller arrays (biases, LayerNorm) stay replicated: not worth a collective


def maybe_initialize_distributed() -> None:
    """Join a multi-host run when launched as one (TPU pod, SLURM, or the JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID variables); a single process does nothing. Call it before
    anything touches a device: jax.distributed must start before the backends do."""
    explicit = "JAX_COORDINATOR_ADDRESS" in os.environ
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    if jax.distributed.is_initialized() or not (explicit or slurm or tpu_pod):
        return
    # CPU processes exchange gradients through gloo (bundled with jaxlib); the setting only
    # concerns the CPU client, so it is harmless on GPU and TPU hosts.
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=_env_int("JAX_NUM_PROCESSES"),
            process_id=_env_int("JAX_PROCESS_ID"),
        )
    else:
        jax.distributed.initialize()  # auto-detects SLURM and Cloud TPU


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"JAX_COORDINATOR_ADDRESS is set but {name}={value!r} is not an integer: set "
            "JAX_NUM_PROCESSES (how many processes) and JAX_PROCESS_ID (0..N-1) on every process too"
        ) from None


def make_mesh(dp: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 on one axis takes whatever the other leaves."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if dp == -1 and fsdp == -1:
        raise ValueError("only one of dp and fsdp may be -1 (all remaining devices); give the other a size")
    if dp == -1:
        if n % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n} devices; use a divisor of {n}")
        dp = n // fsdp
    elif fsdp == -1:
        if n % dp:
            raise ValueError(f"dp={dp} does not divide the {n} devices; use a divisor of {n}")
        fsdp = n // dp
    if dp * fsdp != n:
        raise ValueError(f"dp={dp} x fsdp={fsdp} = {dp * fsdp} does not match the {n} devices; "
                         "use -1 on one axis to take the rest")
    # Auto axes: shardings are annotations and XLA propagates them (explicit-sharding mode
    # would make every op's sharding part of its type).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((dp, fsdp), DATA_AXES, axis_types=auto, devices=devices)


def data_size(mesh: Mesh) -> int:
    """Number of ways a batch is split: every device holds a different slice."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh, ndim: int = 3, batch_axis: int = 1) -> NamedSharding:
    """Batches are (A, B, T) with A the accumulation steps: split B over every device."""
    spec = [None] * ndim
    spec[batch_axis] = DATA_AXES
    return NamedSharding(mesh, P(*spec))


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    n = data_size(mesh)
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} does not divide over the {n} data-parallel devices "
            f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {n}"
        )


def _param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARD_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a train state (or params) pytree of ShapeDtypeStructs."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree_util.tree_map(
        lambda x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp_size)), abstract_state
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    """This host's slice of a batch -> one global array laid out by `sharding`."""
    return jax.make_array_from_process_local_data(sharding, local_batch, global_shape)
