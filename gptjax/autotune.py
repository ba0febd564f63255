"""Kernel choices measured on this host and remembered: the library XLA's CPU backend hands a
run's matrix products to.

Which library multiplies fastest depends on the CPU and the shapes (docs/benchmarks.md, "Intel
Xeon host"): on one host oneDNN and Eigen beat YNNPACK, XLA's default, on a 384-wide model's train
step and lose on a 128-wide one's. `python -m gptjax.bench CONFIG --tune` times the run's own train step
with each library in alternating rounds and records the verdict here, in gptjax's cache
(`paths.cache_root()/autotune.json`), keyed by the CPU, jaxlib, the devices and the train step
measured; a run of that step with `dot_library="auto"` then takes it, so every such run on this
host makes the same choice (and computes the same numbers). The measuring is a command of its own,
and the library is used for the train step alone (`step.jit_steps`), because XLA's oneDNN path is
experimental: a program it cannot build ends the process when it first runs, which must be the
benchmark's and not a training run's, so only the program the benchmark ran may use it. A library
other than XLA's default is taken only when it is clearly faster.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import time

import jax
from jax.sharding import Mesh

from gptjax import kernels as kernels_lib
from gptjax import paths, sharding
from gptjax.kernels import Kernels
from gptjax.perf import cpu_model

MARGIN = 0.05  # another library must be this much faster than XLA's default to be taken


def for_run(cfg, model_cfg, mesh: Mesh) -> Kernels:
    """The kernels of a training run on `mesh` (`kernels.for_run`), with dot_library "auto" on a
    CPU taking the library recorded as fastest on this host for the run's train step (`python -m
    gptjax.bench CONFIG [--key=value ...] --tune` measures it), else XLA's default. A run over
    several processes keeps XLA's default unless it names a library: each host would take its own
    record."""
    if cfg.dot_library == "auto" and mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1:
        verdict = recorded(run_key(cfg, model_cfg, mesh))
        if verdict is not None:
            cfg = dataclasses.replace(cfg, dot_library=verdict["dot_library"])  # chosen as if named
    return kernels_lib.for_run(cfg, model_cfg, mesh)


def rows_per_device(cfg, mesh: Mesh) -> int:
    """Token rows of one micro-batch on one device: the M of the run's Dense products."""
    return cfg.batch_size * cfg.block_size // mesh.size


def run_key(cfg, model_cfg, mesh: Mesh) -> str:
    """What a verdict holds for: this host's CPU and jaxlib, the devices, and the train step it was
    measured on (the model as built, the rows of its products, accumulation, optimizer, the other
    kernel choices and the libraries' compiler options), so a run takes only a verdict measured on its
    own program."""
    rows = rows_per_device(cfg, mesh)
    program = {"model": dataclasses.asdict(model_cfg), "rows_per_device": rows,
               "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "optimizer": cfg.optimizer,
               "grad_clip": cfg.grad_clip > 0, "mesh": dict(mesh.shape),
               "kernels": [cfg.attention, cfg.matmul, cfg.grad_reduce],
               "library_options": kernels_lib.LIBRARY_OPTIONS}  # a verdict holds for the options it measured
    digest = hashlib.sha256(json.dumps(program, sort_keys=True).encode()).hexdigest()[:16]
    m = model_cfg
    return (f"{cpu_model()} | jaxlib {importlib.metadata.version('jaxlib')} | {mesh.size} devices | "
            f"n_layer {m.n_layer} n_embd {m.n_embd} block_size {m.block_size}, {rows} rows | {digest}")


RECORDS = "autotune.json"  # in gptjax's cache


def recorded(key: str) -> dict | None:
    """The verdict measured on this host for `key` ({"dot_library": ..., "ms_per_step": {...}}), or None."""
    return paths.cache_records(RECORDS, "measure again with python -m gptjax.bench CONFIG --tune").get(key)


def record_verdict(key: str, ms_per_step: dict[str, float]) -> dict:
    """Record which dot library this host should use for `key`, from each one's measured step
    time ("xla" among them): the fastest, if it beats XLA's default by MARGIN. Returns the verdict."""
    best = min(ms_per_step, key=ms_per_step.get)
    choice = best if ms_per_step[best] < (1 - MARGIN) * ms_per_step["xla"] else "xla"
    verdict = {"dot_library": choice, "ms_per_step": {k: round(v, 3) for k, v in ms_per_step.items()},
               "measured": time.strftime("%Y-%m-%d")}
    paths.record_in_cache(RECORDS, key, verdict)
    return verdict


def record_from_rows(cfg, vocab_size: int, rows) -> dict:
    """Record the verdict of `python -m gptjax.bench CONFIG --tune`'s rows (gptjax.bench.Row, one
    per `--dot_library=NAME` variant, timed in alternating rounds) for the run `cfg` describes."""
    ms = {r.variant.split("=", 1)[1]: r.ms_per_iter for r in rows if r.variant.startswith("--dot_library=")}
    return record_verdict(run_key(cfg, cfg.model_config(vocab_size), sharding.make_mesh(cfg.dp, cfg.fsdp)), ms)
