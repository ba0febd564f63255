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
other than XLA's default is taken only when it is clearly faster, by MARGIN in the median and in
every round, and computes the same step: its first train step, from the same state and batch, must
give XLA's default's loss and optimizer state (on one AMD EPYC host XLA's oneDNN path computed
gradients 1-30% off; docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from gptjax import kernels as kernels_lib
from gptjax import paths, sharding
from gptjax.kernels import Kernels
from gptjax.perf import cpu_model

MARGIN = 0.05  # another library must be this much faster than XLA's default to be taken
# ... and its first step's results this close to XLA's default's (relative to each array's largest
# value): float32 reassociation stays near 1e-6, a wrong product shows 1e-2
AGREEMENT = 1e-3


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
               "library_options": kernels_lib.LIBRARY_OPTIONS,  # a verdict holds for the options it measured
               "checked": "first step against XLA's default; faster in every round"}  # older verdicts are not used
    digest = hashlib.sha256(json.dumps(program, sort_keys=True).encode()).hexdigest()[:16]
    m = model_cfg
    return (f"{cpu_model()} | jaxlib {importlib.metadata.version('jaxlib')} | {mesh.size} devices | "
            f"n_layer {m.n_layer} n_embd {m.n_embd} block_size {m.block_size}, {rows} rows | {digest}")


RECORDS = "autotune.json"  # in gptjax's cache


def recorded(key: str) -> dict | None:
    """The verdict measured on this host for `key` ({"dot_library": ..., "ms_per_step": {...}}), or None."""
    return paths.cache_records(RECORDS, "measure again with python -m gptjax.bench CONFIG --tune").get(key)


def first_step_disagreement(reference, other) -> float:
    """How far one library's first train step strays from XLA's default's, both run from the same
    state on the same batch: the largest difference over the leaves of `(loss, optimizer state)`
    (whose moments hold the gradients), each relative to its leaf's largest magnitude; inf where
    either holds a non-finite value."""
    worst = 0.0
    for ref, got in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(other), strict=True):
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        diff = np.abs(got - ref)
        if not np.isfinite(diff).all():
            return float("inf")
        scale = np.abs(ref).max(initial=0.0)
        worst = max(worst, float(diff.max(initial=0.0) / scale) if scale > 0 else float(diff.max(initial=0.0)))
    return worst


def record_verdict(key: str, round_ms: dict[str, Sequence[float]], disagreement: dict[str, float]) -> dict:
    """Record which dot library this host should use for `key`, from each one's step time in each
    of the alternating rounds ("xla" among them) and its first step's `first_step_disagreement` with
    XLA's default: the fastest (median) of those within AGREEMENT, if its median beats XLA's
    default's by MARGIN and it was faster in every round. A round's times were taken minutes apart
    at most, under the same load; a library that loses one of them may owe its median to the host's
    drift rather than its products (docs/benchmarks.md, "Two speeds in one host"). Returns the verdict."""
    ms_per_step = {k: float(np.median(v)) for k, v in round_ms.items()}
    wins = {k: sum(a < b for a, b in zip(v, round_ms["xla"], strict=True)) for k, v in round_ms.items()}
    agreeing = {k: v for k, v in ms_per_step.items() if k == "xla" or disagreement[k] <= AGREEMENT}
    steady = {k: v for k, v in agreeing.items() if k == "xla" or wins[k] == len(round_ms["xla"])}
    best = min(steady, key=steady.get)
    choice = best if steady[best] < (1 - MARGIN) * ms_per_step["xla"] else "xla"
    verdict = {"dot_library": choice, "ms_per_step": {k: round(v, 3) for k, v in ms_per_step.items()},
               "rounds_faster_than_xla": {k: wins[k] for k in round_ms if k != "xla"},
               "rounds": len(round_ms["xla"]),
               "disagreement": {k: float(f"{v:.3g}") for k, v in disagreement.items()},
               "refused": sorted(set(ms_per_step) - set(agreeing)), "measured": time.strftime("%Y-%m-%d")}
    paths.record_in_cache(RECORDS, key, verdict)
    return verdict


def record_for_run(cfg, vocab_size: int, round_ms: dict[str, Sequence[float]],
                   disagreement: dict[str, float]) -> dict:
    """Record the verdict of `python -m gptjax.bench CONFIG --tune` (each library's step time in
    each alternating round, and its first-step disagreement with XLA's default) for the run `cfg`
    describes."""
    return record_verdict(run_key(cfg, cfg.model_config(vocab_size), sharding.make_mesh(cfg.dp, cfg.fsdp)),
                          round_ms, disagreement)
