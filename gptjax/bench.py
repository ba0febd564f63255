"""Benchmarks: `python -m gptjax.bench [CONFIG] [--key=value ...] [--steps N] [--compare torch] [--json FILE]`.

nanoGPT's bench.py, extended: times the jitted train step after warm-up (ms/iter, tokens/s, model
FLOP/s, MFU, compile time, peak memory) and, with --compare torch, the same model, config and
batch in nanoGPT's PyTorch architecture (eager and torch.compile), in rounds that alternate with
gptjax's in the same run, then sampling tokens/s with the KV cache vs full recomputation (and, with
--compare torch, nanoGPT's and transformers' generate), its runs too taking turns. Prints a table
and the ratios. `--vs "--key=value ..."` (repeatable) adds gptjax rows with those overrides
to the same alternating rounds: an A/B of a setting in one process; `--tune` is that A/B of the
dot libraries on a CPU, whose verdict runs of the config then take (gptjax.autotune).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from gptjax import autotune
from gptjax import config as config_lib
from gptjax import sharding
from gptjax.config import TrainConfig
from gptjax.model import flops_per_token, num_params
from gptjax.optim import lr_schedule, make_optimizer
from gptjax import cpu
from gptjax import kernels as kernels_lib
from gptjax.perf import device_peak_flops, host_description, keep_peak_flops, mfu
from gptjax.step import create_train_state, jit_steps

TRAIN_IMPLS = ("gptjax", "torch", "torch-compile")


@dataclasses.dataclass
class Row:
    impl: str
    config: str
    ms_per_iter: float
    tokens_per_s: float
    mfu: float
    compile_s: float
    peak_mem_mb: float | None = None
    note: str = ""
    variant: str = ""  # a --vs row's config overrides
    flops_per_s: float = float("nan")  # model FLOPs (nanoGPT's count) per second; NaN for sampling rows
    round_ms: list[float] = dataclasses.field(default_factory=list)  # a train-step row's ms/iter in each round

    @property
    def label(self) -> str:
        return f"{self.config} {self.variant}" if self.variant else self.config

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _batch_tokens(cfg: TrainConfig, vocab_size: int, real_data: bool) -> np.ndarray:
    """(A, B, T+1) int32 windows: random tokens, or a training batch of the real dataset."""
    if real_data:
        from gptjax import data as data_lib

        dataset = data_lib.BinDataset(cfg.resolved_data_dir, cfg.block_size, vocab_size, cfg.dataset)
        x, y = data_lib.get_batch(dataset, "train", 0, cfg.batch_size, cfg.block_size, cfg.seed,
                                  accum_steps=cfg.gradient_accumulation_steps)
        return np.concatenate([x, y[..., -1:]], axis=-1)
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.gradient_accumulation_steps, cfg.batch_size, cfg.block_size + 1)
    return rng.integers(0, vocab_size, shape).astype(np.int32)


def _dataset_vocab(cfg: TrainConfig) -> int | None:
    """A char-level dataset's vocabulary when it is prepared, as training would use."""
    from gptjax.data import load_meta

    meta = load_meta(cfg.resolved_data_dir)
    return meta and meta["vocab_size"]


@dataclasses.dataclass
class Runner:
    """One implementation's warmed-up train step, ready to be timed."""

    impl: str
    run: Callable[[int], float]  # n full steps -> their wall-clock seconds, blocking until done
    flops_per_iter: float
    compile_s: float
    close: Callable[[], None] = lambda: None
    variant: str = ""  # a --vs variant's config overrides
    first_step: Any = None  # (loss, optimizer state) on the host after the first step, when kept


def measure(runners: Sequence[Runner], cfg: TrainConfig, name: str, n_steps: int, rounds: int) -> list[Row]:
    """Time the runners in alternating rounds of n_steps and keep each one's median step time:
    on a shared machine the load drifts, and interleaving makes the ratios fair."""
    times: list[list[float]] = [[] for _ in runners]
    with tqdm(total=rounds * len(runners), desc="timing", unit="round", file=sys.stderr) as bar:
        for _ in range(rounds):
            for r, r_times in zip(runners, times):
                r_times.append(r.run(n_steps) / n_steps)
                bar.set_postfix_str(f"{r.impl}{' ' + r.variant if r.variant else ''}: "
                                    f"{r_times[-1] * 1e3:.1f} ms/iter", refresh=False)
                bar.update()
    rows = []
    for r, r_times in zip(runners, times):
        dt = float(np.median(r_times))
        mem = _peak_mem_mb() if r.impl == "gptjax" else None
        rows.append(Row(r.impl, name, dt * 1e3, cfg.tokens_per_iter / dt, mfu(r.flops_per_iter, dt), r.compile_s, mem,
                        variant=r.variant, flops_per_s=r.flops_per_iter / dt,
                        round_ms=[t * 1e3 for t in r_times]))
    return rows


def gptjax_runner(cfg: TrainConfig, tokens: np.ndarray, vocab_size: int, profile_dir: str | None = None,
                  keep_first_step: bool = False) -> Runner:
    mesh = sharding.make_mesh(cfg.dp, cfg.fsdp)
    sharding.check_batch_divisible(cfg.batch_size, mesh)
    model_cfg = cfg.model_config(vocab_size)
    optimizer = make_optimizer(cfg, mesh)
    state, shardings = create_train_state(model_cfg, optimizer, mesh, cfg.seed)
    kernels = autotune.for_run(cfg, model_cfg, mesh)
    train_step, _ = jit_steps(model_cfg, kernels, optimizer, lr_schedule(cfg), shardings, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = tuple(jax.device_put(a, batch_sharding) for a in (tokens[..., :-1], tokens[..., 1:]))
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops = flops_per_token(model_cfg, num_params(state.params)) * cfg.tokens_per_iter
    holder = {"state": state}

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["metrics"]["loss"])

    step()
    first_step = jax.device_get((holder["metrics"]["loss"], holder["state"].opt_state)) if keep_first_step else None
    step()
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(3):
                step()
    return Runner("gptjax", functools.partial(timed, step), flops, compile_s, first_step=first_step)


def say(message: str) -> None:
    """What the benchmark is doing now, on stderr (the table goes to stdout)."""
    tqdm.write(message, file=sys.stderr)


def timed(step: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def _peak_mem_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _flops(rate: float) -> str:
    if np.isnan(rate):
        return ""
    return f"{rate / 1e12:.1f}T" if rate >= 1e12 else f"{rate / 1e9:.1f}G"


def format_table(rows: Sequence[Row]) -> str:
    width = max([22] + [len(r.label) for r in rows])
    header = (f"{'impl':<24} {'config':<{width}} {'ms/iter':>10} {'tokens/s':>12} {'FLOP/s':>8} {'MFU':>7} "
              f"{'compile s':>10} {'peak MB':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        mfu = "" if np.isnan(r.mfu) else f"{r.mfu * 100:.1f}%"
        mem = "" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
        lines.append(f"{r.impl:<24} {r.label:<{width}} {r.ms_per_iter:>10.2f} {r.tokens_per_s:>12,.0f} "
                     f"{_flops(r.flops_per_s):>8} {mfu:>7} {r.compile_s:>10.1f} {mem:>9}" + (f"  {r.note}" if r.note else ""))
    by_impl: dict[str, Row] = {}
    for r in rows:
        by_impl.setdefault(r.impl, r)  # the first gptjax row is the CONFIG as given, before --vs rows
    for other in ("torch", "torch-compile", "torch-sample-recompute", "gptjax-sample-recompute", "hf-generate",
                  "hf-generate-b8"):
        mine = ("gptjax-sample-cache" + other[len("hf-generate"):] if other.startswith("hf-generate")
                else "gptjax-sample-cache" if "sample" in other else "gptjax")
        if other in by_impl and mine in by_impl:
            ratio = by_impl[mine].tokens_per_s / by_impl[other].tokens_per_s
            lines.append(f"{mine} / {other}: {ratio:.2f}x tokens/s")
    for r in rows:
        if r.impl == "gptjax" and r.variant:
            ratio = by_impl["gptjax"].tokens_per_s / r.tokens_per_s
            lines.append(f"gptjax / gptjax {r.variant}: {ratio:.2f}x tokens/s")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gptjax.bench", description=__doc__,
                                     epilog=config_lib.help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per round, after warm-up (0: no train-step rows, only --sample's)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per implementation (sampling too: its runs take turns, each row the median of its runs)")
    parser.add_argument("--compare", choices=["torch"], help="also time nanoGPT's PyTorch model")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--sample", type=int, default=0, metavar="N", help="also time sampling N new tokens")
    parser.add_argument("--real-data", action="store_true", help="batches from the dataset, not random tokens")
    parser.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of 3 steps to DIR")
    parser.add_argument("--vs", action="append", default=[], metavar="OVERRIDES",
                        help='a gptjax variant timed in the same rounds, e.g. --vs="--attention=xla" (repeatable)')
    parser.add_argument("--tune", action="store_true", help="on a CPU, time each dot library (--vs=--dot_library=...) "
                        "and record the fastest for this host and model: dot_library='auto' runs take it")
    parser.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    parser.add_argument("--name", help="config label in the table (default: the CONFIG name)")
    return parser


def run(argv: Sequence[str] | None = None, tune_cpu: bool = False) -> list[Row]:
    """Parse `[CONFIG] [--key=value ...] [bench flags]`, time, print the table; returns the rows."""
    args, rest = _parser().parse_known_args(argv)
    cfg = config_lib.parse_args(rest)
    if args.steps < 0 or args.rounds < 1:
        raise ValueError(f"--steps={args.steps} --rounds={args.rounds}: give --steps >= 0 and --rounds >= 1")
    if args.steps == 0 and (not args.sample or args.vs or args.tune or args.profile):
        raise ValueError("--steps=0 times no train step: it is for sampling alone (give --sample=N; "
                         "--vs, --tune and --profile time train steps)")
    if args.tune:
        args.vs += [f"--dot_library={name}" for name in kernels_lib.DOT_LIBRARIES[1:]]
    if args.compare == "torch":
        # The PyTorch rows run in a process of their own on the same GPU: JAX must not take 75% of
        # its memory up front, as XLA does by default, or that process runs out of it.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if tune_cpu:
        cpu.tune_host(cfg)  # the gptjax row runs as `python -m gptjax.train` would
    name = args.name or next((a for a in rest if not a.startswith("--")), "default")
    vocab_size = cfg.vocab_size or _dataset_vocab(cfg) or 50304
    rows, disagreement = ([], {}) if args.steps == 0 else _train_rows(args, cfg, rest, name, vocab_size)
    if args.sample:
        from gptjax.sampling_bench import bench_sampling  # it builds on this module's rows

        rows += bench_sampling(cfg, name, vocab_size, args.sample, args.compare == "torch", args.rounds)
    verdict = (autotune.record_for_run(cfg, vocab_size, _by_library(rows, lambda r: r.round_ms), disagreement)
               if args.tune else None)
    if verdict:
        say(f"recorded for this host and model: {verdict}")
    peak, source = keep_peak_flops(*device_peak_flops())
    host = host_description(("jax", "jaxlib", "flax", "optax") + (("torch", "transformers") if args.compare else ()))
    print(f"host: {host}\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}; peak {peak / 1e9:,.0f} GFLOP/s ({source})")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": host, "device": jax.devices()[0].device_kind, "peak_flops": peak,
                       "rows": [r.as_dict() for r in rows], **({"tune": verdict} if verdict else {})}, f, indent=2)
    return rows


def _train_rows(args: argparse.Namespace, cfg: TrainConfig, argv: Sequence[str], name: str,
                vocab_size: int) -> tuple[list[Row], dict[str, float]]:
    """The train-step rows: gptjax, its --vs variants and PyTorch's, in alternating rounds; with
    --tune, also each dot library's first-step disagreement with XLA's default."""
    tokens = _batch_tokens(cfg, vocab_size, args.real_data)
    say(f"compiling gptjax's train step ({cfg.resolved_dtype})")
    runners = [gptjax_runner(cfg, tokens, vocab_size, args.profile)]
    try:
        for overrides in args.vs:
            say(f"compiling gptjax's train step with {overrides}")
            runners.append(dataclasses.replace(gptjax_runner(_variant(cfg, argv, overrides), tokens, vocab_size,
                                                             keep_first_step=args.tune), variant=overrides))
        disagreement = _library_disagreement(runners) if args.tune else {}
        if args.compare == "torch":
            from gptjax.torch_bench import torch_device, torch_process_runner  # they build on Runner

            device = torch_device()
            runners.append(torch_process_runner(cfg, tokens, vocab_size, compile=False, device=device))
            if not args.no_torch_compile:
                runners.append(torch_process_runner(cfg, tokens, vocab_size, compile=True, device=device))
        return measure(runners, cfg, name, args.steps, args.rounds), disagreement
    finally:
        for runner in runners:
            runner.close()


def _library_disagreement(runners: Sequence[Runner]) -> dict[str, float]:
    """Each --dot_library=NAME runner's first step against XLA's default's (autotune), said where a
    library computes another step; the kept first steps are let go."""
    first = _by_library(runners, lambda r: r.first_step)
    disagreement = {name: autotune.first_step_disagreement(first["xla"], step) for name, step in first.items()}
    for name, value in disagreement.items():
        if value > autotune.AGREEMENT:
            say(f"dot_library={name} computes another train step than XLA's default here (its loss and "
                f"optimizer state differ by {value:.2g} of their size): it will not be chosen")
    for r in runners:
        r.first_step = None
    return disagreement


def _by_library(items, value: Callable[[Any], Any]) -> dict[str, Any]:
    """value(item) for each runner or row of a --tune variant, by the dot library it names."""
    return {i.variant.split("=", 1)[1]: value(i) for i in items if i.variant.startswith("--dot_library=")}


def _variant(cfg: TrainConfig, argv: Sequence[str], overrides: str) -> TrainConfig:
    """The config with a --vs variant's overrides; it must run the same batch on the same mesh."""
    variant = config_lib.parse_args([*argv, *shlex.split(overrides)])
    same = ("batch_size", "block_size", "gradient_accumulation_steps", "dp", "fsdp")
    changed = [k for k in same if getattr(variant, k) != getattr(cfg, k)]
    if changed:
        raise ValueError(f"--vs {overrides!r} changes {', '.join(changed)}: a variant is timed on the "
                         f"same batch and mesh, so it may not change {', '.join(same)}")
    return variant


def main(argv: Sequence[str] | None = None, tune_cpu: bool = False) -> int:
    try:
        run(argv, tune_cpu)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(tune_cpu=True))
