"""The backend-specific pieces of a run's programs, chosen once at set-up and passed in.

`Kernels` is a frozen record of every choice that depends on the hardware: which attention,
which Dense product, how gradients meet across devices, how activations are pinned to the batch
split. `choose` makes it from the devices and mesh a run actually uses (train, sample, bench,
crosscheck and notebooks call it at set-up); the model and the steps only read it, so what a
config builds never depends on process-global state. Every field can also be set by name on any
backend, which is how the GPU/TPU defaults are tested on a CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.sharding import DATA_AXES, data_size

ATTENTION = ("auto", "xla", "cudnn", "plain", "blocked", "head_groups")
MATMUL = ("auto", "xla", "cpu")
GRAD_REDUCE = ("auto", "xla", "flat")
DOT_LIBRARIES = ("auto", "xla", "onednn", "eigen")
# XLA's CPU compiler options (per compile) that hand dots to oneDNN, or to Eigen, instead of
# YNNPACK. YNNPACK keeps the reductions: without it XLA splits each one into a slow reduce-window
# (docs/benchmarks.md)
ONEDNN_DOTS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
               "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
EIGEN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
LIBRARY_OPTIONS = {"onednn": ONEDNN_DOTS, "eigen": EIGEN_DOTS}
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """What the model and steps run; the defaults are plain XLA, correct on every backend.

    attention: "xla" (jax.nn.dot_product_attention's XLA path), "cudnn" (its fused flash kernel),
      "plain" (the masked softmax written out), "blocked" (gptjax.cpu's causal query blocks),
      "head_groups" (the blocks a few heads at a time: faster in inference, slower to train).
    cudnn_fallback: a cuDNN that refuses the call when traced falls back to XLA with a warning.
    matmul: "xla" (the plain dot), "cpu" (gptjax.cpu's Dense product, weight gradients laid out for
      XLA's fast CPU kernels).
    row_blocks: with matmul="cpu", tall products in row blocks; only for one device's arrays.
    grad_reduce: "xla" (the partitioner's reductions, overlapped with the backward pass), "flat"
      (gptjax.cpu: each device's gradient in shard_map, one all-reduce of a flat buffer).
    batch_sharding: where activations are pinned to the batch split (None: not pinned).
    dot_library: who multiplies matrices in the train step: "xla" (the backend's default;
      YNNPACK on a CPU), "onednn" or "eigen" (on a CPU; `compiler_options` says so at its
      compile). Under "eigen" the CPU Dense product's weight gradient x^T dy goes to Eigen as it
      is, without the transposed copy YNNPACK needs. XLA's oneDNN path is experimental and ends
      the process on some programs (it did on the evaluation step of a model whose train step it
      runs), and on some hosts computes wrong gradients, so a library is used for the train step
      alone, the program `python -m gptjax.bench --tune` has run and checked against XLA's
      default before recording it.
    """

    attention: str = "xla"
    cudnn_fallback: bool = False
    matmul: str = "xla"
    row_blocks: bool = False
    grad_reduce: str = "xla"
    batch_sharding: NamedSharding | None = None
    dot_library: str = "xla"

    def __post_init__(self):
        for name, allowed in (("attention", ATTENTION[1:]), ("matmul", MATMUL[1:]), ("grad_reduce", GRAD_REDUCE[1:]),
                              ("dot_library", DOT_LIBRARIES[1:])):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Kernels.{name}={getattr(self, name)!r} is not one of {allowed}")

    @property
    def compiler_options(self) -> dict | None:
        """XLA compiler options for the train step's compile (jax.jit's)."""
        options = LIBRARY_OPTIONS.get(self.dot_library)
        return None if options is None else dict(options)

    @property
    def transposed_copy(self) -> bool:
        """Whether the CPU Dense product copies an operand transposed for its weight gradient:
        YNNPACK (and oneDNN) need it, Eigen takes x^T dy as it is."""
        return self.dot_library != "eigen"

    def pin_batch(self, x_BxTxC: jax.Array) -> jax.Array:
        """x split on its batch dimension over every device, so that XLA does not spread the
        fsdp weights' layout into the activations (and move them back in every layer); batches
        that do not divide over the devices are left as they are."""
        if self.batch_sharding is None or x_BxTxC.shape[0] % data_size(self.batch_sharding.mesh):
            return x_BxTxC
        return jax.lax.with_sharding_constraint(x_BxTxC, self.batch_sharding)


def cuda_major(device) -> int | None:
    """The major compute capability of an NVIDIA GPU (9 on an H100); None for any other device
    (a CPU, a TPU, or an AMD GPU, which JAX also calls 'gpu')."""
    if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
        return None
    return int(device.compute_capability.split(".")[0])


def fused_attention_impl(dtype, head_size: int, device) -> str:
    """The attention "auto" picks off the CPU: cuDNN's flash attention on an NVIDIA GPU that takes
    the shapes (bfloat16 or float16, head size a multiple of 8 up to 128, Ampere or newer), else
    XLA's (jax's own default everywhere, which materialises the (B, N, T, T) scores)."""
    major = cuda_major(device)
    cudnn_takes_it = (major is not None and major >= 8 and jnp.dtype(dtype) in CUDNN_DTYPES
                      and head_size % 8 == 0 and head_size <= 128)
    return "cudnn" if cudnn_takes_it else "xla"


def choose(devices: Sequence, *, dtype: str, head_size: int, mesh: Mesh | None = None, dropout: float = 0.0,
           attention: str = "auto", matmul: str = "auto", grad_reduce: str = "auto",
           dot_library: str = "auto", forward_only: bool = False) -> Kernels:
    """The kernels for programs on `devices` (laid out over `mesh` when it spans several); "auto"
    fields are decided here, named ones are taken as they are.

    On a CPU: blocked attention (by head groups for forward_only programs on one device, which
    nothing differentiates), the CPU Dense product, and, for pure data parallelism without
    dropout, the flat all-reduce (XLA's CPU runtime synchronises the devices once per all-reduce
    operand; docs/benchmarks.md). Row blocks only where each program sees one device's arrays.
    Elsewhere: cuDNN attention where it applies, else XLA's; XLA's products and reductions.
    Dropout stays with the global program under "auto": its masks then do not depend on how the
    batch is split. dot_library "auto" is XLA's default here; `autotune.for_run` puts in what was
    measured on this host."""
    for name, value, allowed in (("attention", attention, ATTENTION), ("matmul", matmul, MATMUL),
                                 ("grad_reduce", grad_reduce, GRAD_REDUCE), ("dot_library", dot_library, DOT_LIBRARIES)):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")
    device = devices[0]
    cpu = device.platform == "cpu"
    if dot_library in LIBRARY_OPTIONS and not cpu:
        raise ValueError(f"dot_library={dot_library!r} is for XLA's CPU backend, not {device.platform}: use 'auto' or 'xla'")
    dot_library = "xla" if dot_library == "auto" else dot_library
    if attention == "auto":
        attention = ("head_groups" if forward_only else "blocked") if cpu else fused_attention_impl(dtype, head_size, device)
        cudnn_fallback = attention == "cudnn"
    else:
        cudnn_fallback = False
    if matmul == "auto":
        matmul = "cpu" if cpu else "xla"
    several = mesh is not None and mesh.size > 1
    pure_dp = several and mesh.shape["fsdp"] == 1
    if grad_reduce == "auto":
        grad_reduce = "flat" if cpu and pure_dp and dropout == 0 else "xla"
    if grad_reduce == "flat" and (not pure_dp or dropout > 0):
        raise ValueError("grad_reduce='flat' needs pure data parallelism over several devices (fsdp=1, dp>1) "
                         f"and no dropout (mesh {dict(mesh.shape) if mesh else None}, dropout={dropout}); "
                         "use grad_reduce='xla' or 'auto'")
    per_device = not several or grad_reduce == "flat"
    return Kernels(
        attention=attention, cudnn_fallback=cudnn_fallback, matmul=matmul,
        # row blocks are YNNPACK's (oneDNN takes a tall product whole at least as fast; Eigen was measured whole)
        row_blocks=matmul == "cpu" and per_device and dot_library == "xla", grad_reduce=grad_reduce,
        batch_sharding=None if per_device else NamedSharding(mesh, P(DATA_AXES)), dot_library=dot_library,
    )


def for_run(cfg, model_cfg, mesh: Mesh) -> Kernels:
    """The kernels of a training run on `mesh`: its TrainConfig's kernel fields, for its model
    (the GPTConfig it trains, which may be a checkpoint's). dot_library "auto" is XLA's default
    here; `autotune.for_run` puts in what was measured on this host."""
    return choose(mesh.devices.flat, dtype=model_cfg.dtype, head_size=model_cfg.head_size, mesh=mesh,
                  dropout=model_cfg.dropout, attention=cfg.attention, matmul=cfg.matmul,
                  grad_reduce=cfg.grad_reduce, dot_library=cfg.dot_library)


def for_inference(cfg, device=None, attention: str = "auto") -> Kernels:
    """The kernels for sampling or evaluating a model (GPTConfig) on one device. (Not the train
    run's eval step: with one device per core it measured slower by head groups.)"""
    device = device or jax.devices()[0]
    return choose([device], dtype=cfg.dtype, head_size=cfg.head_size, attention=attention, forward_only=True)
