"""The real peers the benchmarks run against, and what every table records about its host.

`nanogpt_cpu_recipe` runs nanoGPT's own, unmodified train.py (from ../shared/nanogpt or a clone the
user names) on its README's CPU recipe, in a scratch copy whose data/shakespeare_char links to the
given data, timed from outside as a process; `gptjax_recipe` times `python -m gptjax.train` the
same way, and `eval_200` evaluates either's final model with gptjax's evaluator on 200 batches.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_BATCHES = 200
NANOGPT = ROOT.parent / "shared" / "nanogpt"
# nanoGPT's README, "I only have a macbook": on top of config/train_shakespeare_char.py
CPU_RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
              "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
              "--lr_decay_iters=2000", "--dropout=0.0"]


def peer_arguments(parser: argparse.ArgumentParser, table: str) -> None:
    """The options every peer benchmark takes: nanoGPT's checkout, the data, where the table goes."""
    parser.add_argument("--nanogpt", type=Path, default=NANOGPT, help="nanoGPT's checkout (default ../shared/nanogpt)")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data" / "shakespeare_char")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / table)


def shakespeare_char(data_dir: Path) -> Path:
    """`data_dir`, prepared for shakespeare_char when it is not (from the shared corpus offline)."""
    from gptjax.prepare import ensure_dataset

    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    ensure_dataset("shakespeare_char", data_dir, corpus if corpus.is_file() else None)
    return data_dir.resolve()


def publish(table: str, out: Path) -> None:
    """Print a benchmark's table and write it to `out` (its folders made as needed)."""
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")


def host(packages=("jax", "jaxlib", "flax", "optax", "torch")) -> str:
    """CPU model, cores and the versions of `packages`, for the line above a table."""
    from gptjax.perf import host_description

    return host_description(packages)


def nanogpt_cpu_recipe(nanogpt: Path, data_dir: Path, out_dir: Path, iters: int = 2000) -> dict:
    """nanoGPT's train.py on its CPU recipe (`iters` iterations, evaluated at the end): wall clock
    of the whole process, the median of its logged iteration times, its last in-run val loss (20
    batches) and its ckpt.pt."""
    missing = [name for name in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
               if not (nanogpt / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{nanogpt} is not a nanoGPT checkout (no {', '.join(missing)}): pass --nanogpt=PATH")
    flags = CPU_RECIPE + [f"--out_dir={out_dir}"]
    if iters != 2000:
        flags += [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}"]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(nanogpt / name, work / name)
        (work / "config").mkdir()
        shutil.copy(nanogpt / "config" / "train_shakespeare_char.py", work / "config")
        (work / "data" / "shakespeare_char").mkdir(parents=True)
        for name in ("train.bin", "val.bin", "meta.pkl"):
            (work / "data" / "shakespeare_char" / name).symlink_to(data_dir.resolve() / name)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", *flags], cwd=work,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"nanoGPT's train.py failed:\n{proc.stderr[-2000:]}")
    step, val = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout)[-1]
    step_ms = [float(ms) for ms in re.findall(r"iter \d+: loss [\d.]+, time ([\d.]+)ms", proc.stdout)]
    return {"impl": f"nanoGPT train.py, {iters} iters", "wall_s": wall, "iters": int(step),
            "val_loss_20": float(val), "step_ms": statistics.median(step_ms), "ckpt": out_dir / "ckpt.pt"}


def gptjax_recipe(config: str, data_dir: Path, out_dir: Path, *overrides: str, cache_dir: Path | None = None) -> dict:
    """`python -m gptjax.train CONFIG` timed as a process; cache_dir: its GPTJAX_CACHE_DIR, where
    its compiled programs are kept (an empty one makes the run compile everything, as a first does).
    A new cache_dir starts with this host's measured choices (`gptjax.autotune`'s records, which
    `python -m gptjax.bench CONFIG --tune` writes), as the user's own cache would hold them; the
    row names the dot library the run took and the median of its logged step times."""
    from gptjax import autotune, paths

    cmd = [sys.executable, "-m", "gptjax.train", config, f"--data_dir={data_dir}", f"--out_dir={out_dir}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    if cache_dir is not None:
        env["GPTJAX_CACHE_DIR"] = str(cache_dir)
        host_choices = paths.cache_root() / autotune.RECORDS
        if host_choices.is_file() and not (cache_dir / autotune.RECORDS).exists():
            cache_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(host_choices, cache_dir / autotune.RECORDS)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    library = re.search(r"dots (\w+);", proc.stdout)  # the run's first line says which
    if library is None:
        raise RuntimeError(f"{' '.join(cmd)} printed no kernels line ('dots NAME;'), so which library it ran is unknown")
    records = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    last = [r for r in records if "val_loss" in r][-1]
    return {"impl": f"gptjax {config}{' ' + ' '.join(overrides) if overrides else ''} (dots {library.group(1)})", "wall_s": wall,
            "iters": last["iter"], "val_loss_20": last["val_loss"],
            "step_ms": statistics.median(r["dt_ms"] for r in records if "dt_ms" in r), "run": out_dir}


def eval_200(init_from: Path, config: str, data_dir: Path) -> float:
    """Validation loss over EVAL_BATCHES batches, gptjax's evaluator, for a run or a ckpt.pt (printed
    by an eval_only run, which writes nothing)."""
    weights = init_from if init_from.suffix == ".pt" else "resume"
    with tempfile.TemporaryDirectory() as scratch:
        out_dir = scratch if init_from.suffix == ".pt" else init_from
        out = subprocess.run([sys.executable, "-m", "gptjax.train", config, f"--init_from={weights}",
                              f"--out_dir={out_dir}", "--eval_only=True", f"--eval_iters={EVAL_BATCHES}",
                              f"--data_dir={data_dir}"], check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return float(out.rsplit("val loss ", 1)[1].split()[0])
