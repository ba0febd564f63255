"""Device peak FLOP/s for MFU (a table for known accelerators, a measured matmul rate on CPU, kept
per host for training runs), the host a benchmark ran on, and the persistent compilation cache the
command-line tools share."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from gptjax import paths

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


PEAK_RECORDS = "peak_flops.json"  # in gptjax's cache


@functools.lru_cache(maxsize=None)
def recorded_peak_flops() -> tuple[float, str]:
    """device_peak_flops() for a run's progress display: on a CPU, the rate an earlier process on
    this host measured (kept in gptjax's cache, keyed by CPU, cores, devices and jaxlib), measured
    and kept now if none did. Measuring takes about a second, which every training run would
    otherwise spend before its first step; benchmarks measure afresh and keep their figure too."""
    device = jax.devices()[0]
    if device.platform != "cpu" or _known_peak(device.device_kind) is not None:
        return device_peak_flops()
    record = paths.cache_records(PEAK_RECORDS, "it is measured again").get(_peak_key())
    if isinstance(record, dict) and isinstance(record.get("flops"), float):
        return record["flops"], f"measured float32 matmul, {record.get('measured', 'earlier')}"
    return keep_peak_flops(*device_peak_flops())


def keep_peak_flops(peak: float, source: str) -> tuple[float, str]:
    """Keep a CPU peak just measured (device_peak_flops) as this host's, for recorded_peak_flops."""
    if jax.devices()[0].platform == "cpu" and math.isfinite(peak):
        try:
            paths.record_in_cache(PEAK_RECORDS, _peak_key(), {"flops": peak, "measured": time.strftime("%Y-%m-%d")})
        except OSError as err:  # a full or read-only cache costs the next run a measurement, not this run
            warnings.warn(f"could not keep the measured peak FLOP/s in gptjax's cache: {err}")
    return peak, source


def _peak_key() -> str:
    return (f"{cpu_model()} | {usable_cores()} cores | {jax.local_device_count()} devices | "
            f"jaxlib {importlib.metadata.version('jaxlib')}")


def mfu(flops_per_iter: float, seconds_per_iter: float, n_devices: int | None = None,
        peak: float | None = None) -> float:
    """Model FLOPs utilisation of one training iteration over the devices used, against `peak`
    FLOP/s per device (default device_peak_flops())."""
    peak = device_peak_flops()[0] if peak is None else peak
    if jax.devices()[0].platform == "cpu":
        n_devices = 1  # the measured CPU peak already covers every core
    n_devices = n_devices or jax.device_count()
    return flops_per_iter / seconds_per_iter / (peak * n_devices)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, as lscpu prints it), else what the platform
    module says."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_description(packages=("jax", "jaxlib", "flax", "optax")) -> str:
    """What a benchmark table records about its host: the CPU, its cores, and the versions of
    `packages` that are installed."""
    versions = []
    for name in packages:
        if importlib.util.find_spec(name) is not None:
            versions.append(f"{name} {importlib.metadata.version(name)}")
    return f"{cpu_model()} ({os.cpu_count()} cores); Python {platform.python_version()}, {', '.join(versions)}"


COMPILATION_CACHE_BYTES = 2 << 30  # least recently used executables beyond this are evicted


def enable_compilation_cache() -> str | None:
    """Keep compiled programs across runs in a persistent cache (JAX's own): a run of a model and
    shapes compiled before starts without recompiling them. The directory is JAX_COMPILATION_CACHE_DIR
    when set, else jax/ in gptjax's cache (`paths.cache_root()`: ~/.cache/gptjax by default);
    GPTJAX_COMPILATION_CACHE=0 turns it off. Programs that compile in under 0.2 s are not kept,
    unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise. Returns the directory (None: off)."""
    if os.environ.get("GPTJAX_COMPILATION_CACHE", "1") == "0":
        return None
    if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, or a caller's own choice
        return jax.config.jax_compilation_cache_dir
    directory = paths.cache_root() / "jax"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    # the evaluation and sampling loops compile in well under JAX's default threshold of 1 s
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return str(directory)
