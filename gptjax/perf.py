"""Device peak FLOP/s for MFU: a table for known accelerators, a measured matmul rate on CPU."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device (bf16 tensor cores / MXU; dense, no sparsity), from vendor sheets.
# TPU figures are per chip; JAX shows v2/v3 chips as two devices (one per core), hence the halves.
PEAK_FLOPS_BF16 = {
    "a100": 312e12,
    "h100": 989e12,  # SXM
    "h200": 989e12,
    "h800": 989e12,
    "a10g": 125e12,
    "l4": 121e12,
    "v100": 125e12,
    "tpu v2": 45e12 / 2,
    "tpu v3": 123e12 / 2,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def cuda_major(device) -> int | None:
    """The major compute capability of an NVIDIA GPU (9 on an H100); None for any other device
    (a CPU, a TPU, or an AMD GPU, which JAX also calls 'gpu')."""
    if device.platform != "gpu" or "cuda" not in device.client.platform_version.lower():
        return None
    return int(device.compute_capability.split(".")[0])


def _known_peak(device_kind: str) -> float | None:
    kind = device_kind.lower()
    # Longest names first so that 'tpu v5 lite' wins over 'tpu v5'.
    for name in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):
        if name in kind:
            return PEAK_FLOPS_BF16[name]
    return None


def measure_matmul_flops(n: int = 2048, repeats: int = 5, device=None) -> float:
    """Best float32 FLOP/s of an n x n x n matrix product on one device: the practical peak."""
    device = device or jax.devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (n, n), jnp.float32), device)
    b = jax.device_put(jax.random.normal(key_b, (n, n), jnp.float32), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def device_peak_flops(device_kind: str | None = None, platform: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). CPU: measured once per process.

    On CPU, XLA spreads one matmul over all cores, and forcing several host devices splits the
    same cores, so the measured rate is a whole-machine figure; MFU on CPU is reported against
    it for the whole step, not per device."""
    device = jax.devices()[0]
    device_kind = device_kind or device.device_kind
    platform = platform or device.platform
    peak = _known_peak(device_kind)
    if peak is not None:
        return peak, f"{device_kind} bf16 spec"
    if platform == "cpu":
        return measure_matmul_flops(), "measured float32 matmul"
    return float("nan"), f"unknown device {device_kind!r}"


def mfu(flops_per_iter: float, seconds_per_iter: float, n_devices: int | None = None) -> float:
    """Model FLOPs utilisation of one training iteration over the devices used."""
    peak, _ = device_peak_flops()
    if jax.devices()[0].platform == "cpu":
        n_devices = 1  # the measured CPU peak already covers every core
    n_devices = n_devices or jax.device_count()
    return flops_per_iter / seconds_per_iter / (peak * n_devices)


def split_cpu_devices(batch_size: int, max_devices: int = 8) -> int:
    """On a CPU-only machine, expose the cores as separate XLA devices so that the batch runs
    data-parallel across them: XLA's CPU backend runs a small model's many little ops one after
    another, and two devices on two cores take ~1.5x fewer ms per step (docs/benchmarks.md).

    Only the command-line entry points call this, before JAX starts its backend; it does nothing
    when the user chose a device count (XLA_FLAGS, GPTJAX_CPU_DEVICES), an accelerator plugin is
    installed, the run spans several processes, or the backend is already up. Returns the number
    of CPU devices it asked for (1: unchanged). The count divides batch_size."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return 1
    requested = os.environ.get("GPTJAX_CPU_DEVICES")
    if requested is None:
        if _accelerator_installed() or _multi_process() or _backend_started():
            return 1
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        limit = min(cores, max_devices)
    else:
        limit = int(requested)
    count = max(d for d in range(1, max(limit, 1) + 1) if batch_size % d == 0)
    if count > 1:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return count


# glibc mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # on 64-bit: bigger blocks always get their own mmap


def keep_freed_memory(largest_buffer_bytes: int) -> bool:
    """On a CPU-only Linux (glibc) host, let malloc reuse freed memory instead of handing it back
    to the kernel, when the train step's buffers are big enough to need it. XLA's CPU runtime
    allocates each step's activations afresh, and glibc serves blocks over 32 MB with new
    mmap()s that the kernel zeroes page by page on first touch: at the shakespeare_char size
    that is ~1.7M page faults and ~8 s of kernel time per step on 2 cores (16.2 -> 10.5 s/iter,
    docs/benchmarks.md). One reused heap, like PyTorch's caching allocator, removes it; the
    process then keeps its peak memory until it exits. Smaller steps are left alone: glibc
    already reuses their blocks, and one shared heap slows their many small steps (~15%).

    Only the command-line entry points call this, before JAX starts its threads (the one-arena
    setting applies to threads created later). GPTJAX_KEEP_MEMORY=0 turns it off, =1 forces it.
    Returns whether the settings were applied."""
    wanted = os.environ.get("GPTJAX_KEEP_MEMORY")
    if wanted == "0" or (wanted != "1" and largest_buffer_bytes <= _GLIBC_MMAP_THRESHOLD_MAX):
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if _accelerator_installed() or _backend_started():
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))  # -1: SIZE_MAX, never trim
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def largest_activation_bytes(batch_size: int, block_size: int, n_embd: int, n_head: int, n_devices: int = 1) -> int:
    """float32 bytes of a train step's biggest activation on one device: the MLP's hidden layer
    (B, T, 4C) or the attention scores (B, N, T, T) of one micro-batch."""
    per_device = max(batch_size // max(n_devices, 1), 1)
    return 4 * per_device * block_size * max(4 * n_embd, n_head * block_size)


def tune_cpu_host(cfg) -> None:
    """The CPU-only host settings the CLIs apply to a TrainConfig's run before JAX starts
    (no-ops on accelerator hosts): split the cores into devices, keep freed memory if it pays."""
    n_devices = split_cpu_devices(cfg.batch_size) if cfg.dp == -1 and cfg.fsdp == 1 else 1
    keep_freed_memory(largest_activation_bytes(cfg.batch_size, cfg.block_size, cfg.n_embd, cfg.n_head, n_devices))


def _accelerator_installed() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] != "cpu"
    names = {d.metadata["Name"].lower() for d in importlib.metadata.distributions()}
    return any(n.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu", "jax-tpu")) for n in names)


def _multi_process() -> bool:
    return any(v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public query; a started backend ignores XLA_FLAGS anyway

    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())
