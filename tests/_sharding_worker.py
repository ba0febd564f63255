"""Runs the real training path in a fresh process, for tests that need several (simulated) devices or
several processes: XLA reads the device count once, before jax is imported, so the pytest process
itself cannot switch. Prints nothing the tests parse; writes its findings as JSON and .npz files.

  python tests/_sharding_worker.py steps  --devices N --data DIR --out DIR --runs 8x1x1,2x4x2 [--extras 2x4x2]
  python tests/_sharding_worker.py train  --devices N --data DIR --out DIR [--key=value ...]

`train` calls gptjax.train.train, so JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
make it one process of a multi-process run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared/data/tinyshakespeare/input.txt"


def prepare_data(out_dir: Path) -> Path:
    """The first 100k characters of tiny-shakespeare as a character dataset (61 symbols)."""
    from gptjax import prepare

    prepare.prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8")[:100_000], out_dir)
    return out_dir


def launch(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python argv...` from the repository root with output to `log` (a pipe left unread
    could fill and block the child)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("XLA_FLAGS", None)  # the worker sets the device count itself
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_all(procs: list[tuple[subprocess.Popen, Path]], timeout: float) -> None:
    """Wait for every process; on a timeout, a failure or an interrupt kill them all (a process
    of a multi-process run blocks forever once its peer died) and fail with the logs' tails."""
    deadline = time.monotonic() + timeout
    failed = None
    try:
        for proc, log in procs:
            try:
                if proc.wait(timeout=max(deadline - time.monotonic(), 0.1)) != 0:
                    failed = f"{log.name} exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                failed = f"{log.name} still running after {timeout:.0f} s"
            if failed:
                break
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed:
        tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in procs)
        raise AssertionError(f"{failed}\n{tails}")


def tiny_config(data_dir: str, out_dir: str, **overrides):
    """The tiny model every sharding test trains: deterministic (dropout 0) and a constant lr
    large enough that five steps move the loss. vocab 65 (tiny-shakespeare's characters) makes the
    (65, 64) token embedding big enough to shard, along its second dimension."""
    from gptjax.config import TrainConfig

    base = dict(
        out_dir=out_dir, dataset="shakespeare_char", data_dir=data_dir, n_layer=2, n_embd=64, n_head=4,
        block_size=16, batch_size=16, vocab_size=65, dropout=0.0, gradient_accumulation_steps=1,
        learning_rate=1e-3, decay_lr=False, warmup_iters=0, max_iters=5, eval_interval=1000, eval_iters=2, log_interval=1,
        prefetch=1, seed=1337,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _flat(tree) -> dict:
    import jax
    import numpy as np

    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(jax.device_get(x)) for path, x in leaves}


def _layout(x) -> dict:
    """How an array is laid out: its PartitionSpec and the shapes of the pieces devices hold."""
    return {
        "spec": [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec],
        "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
        "n_devices": len(x.sharding.device_set),
    }


def run_steps(cfg, n_steps: int, out: Path, extras: bool) -> dict:
    """Train n_steps on cfg's mesh through gptjax.train.setup; record the losses and layouts, and
    with `extras` the gradient at the initial state, eval losses, greedy samples and a checkpoint."""
    import functools

    import jax
    import numpy as np

    from gptjax.model import GPT
    from gptjax.step import loss_fn
    from gptjax.train import setup

    run = setup(cfg)
    model = GPT(run.model_cfg)
    first = run.to_device(run.batch("train", 0))
    result = {"mesh": dict(run.mesh.shape)}
    hlo = run.train_step.lower(run.state, first).compile().as_text()
    result["all_reduce_shapes"] = re.findall(r"= (\S+) all-reduce(?:-start)?\(", hlo)
    if extras:  # the gradient of one micro-batch, with the parameters laid out as in training
        grad = jax.jit(
            lambda p, b: jax.grad(functools.partial(loss_fn, model=model))(p, x_BxT=b[0][0], y_BxT=b[1][0]),
            out_shardings=run.state_shardings.params,
        )(run.state.params, first)
        np.savez(out / "grads.npz", **_flat(grad))

    losses = []
    for step in range(n_steps):
        batch = first if step == 0 else run.to_device(run.batch("train", step))
        run.state, metrics = run.train_step(run.state, batch)
        losses.append(float(metrics["loss"]))
    result["losses"] = losses

    params = run.state.params
    opt_leaves = jax.tree_util.tree_leaves_with_path(run.state.opt_state)
    c_fc_moments = [x for path, x in opt_leaves if "c_fc" in jax.tree_util.keystr(path)
                    and "kernel" in jax.tree_util.keystr(path)]
    result["layouts"] = {
        "c_fc_kernel": _layout(params["h_0"]["mlp"]["c_fc"]["kernel"]),
        "c_attn_kernel": _layout(params["h_0"]["attn"]["c_attn"]["kernel"]),
        "wte": _layout(params["wte"]["embedding"]),
        "ln_1_scale": _layout(params["h_0"]["ln_1"]["scale"]),
        "c_fc_opt_moments": [_layout(x) for x in c_fc_moments],
        "batch_x": _layout(first[0]),
    }
    if extras:
        np.savez(out / "params.npz", **_flat(params))
        result.update(_eval_and_sample(run, model, params, first, n_steps))
        run.save(n_steps)
    run.close()
    return result


def _eval_and_sample(run, model, params, first, n_steps: int) -> dict:
    """Evaluation and sampling read the parameters as training laid them out; the same on one device."""
    import jax
    import numpy as np

    from gptjax.generate import generate

    prompt = run.batch("val", 0)[0][0, :2, :4]
    key = jax.random.PRNGKey(0)
    local = jax.device_put(jax.device_get(params), jax.devices()[0])
    tokens = {name: np.asarray(generate(p, run.model_cfg, prompt, key, 6, temperature=0.0)).tolist()
              for name, p in (("sharded", params), ("local", local))}
    x_BxT = np.asarray(first[0][0])
    apply = jax.jit(model.apply)
    logits = [np.asarray(apply({"params": p}, x_BxT)) for p in (params, local)]
    logits_diff = np.abs(logits[0] - logits[1])
    return {"eval": run.estimate_loss(n_steps), "greedy": tokens, "logits_max_abs_diff": float(logits_diff.max())}


def _parse_overrides(overrides: list[str]) -> dict:
    """--key=value command-line overrides -> TrainConfig fields, type-checked as the CLIs do."""
    from gptjax import config as config_lib

    return dict(config_lib.parse_override(o) for o in overrides)


def cmd_steps(args, overrides: list[str]) -> None:
    results = {}
    extras = set(args.extras.split(","))
    for name in args.runs.split(","):
        dp, fsdp, accum = (int(n) for n in name.split("x"))
        out = Path(args.out) / name
        out.mkdir(parents=True)
        cfg = tiny_config(args.data, str(out), dp=dp, fsdp=fsdp, gradient_accumulation_steps=accum,
                          **_parse_overrides(overrides))
        results[name] = run_steps(cfg, args.steps, out, extras=name in extras)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


def cmd_train(args, overrides: list[str]) -> None:
    import jax

    from gptjax.train import train

    last = train(tiny_config(args.data, args.out, **_parse_overrides(overrides)))
    (Path(args.out) / f"result.{jax.process_index()}.json").write_text(json.dumps(last))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("steps", "train"))
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices in this process")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="1x1x1", help="comma-separated DPxFSDPxACCUM runs")
    parser.add_argument("--extras", default="", help="runs that also save grads, params, eval, samples")
    parser.add_argument("--steps", type=int, default=5)
    args, overrides = parser.parse_known_args(argv)
    # before jax is imported: the device count is read once
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    if args.command == "steps":
        cmd_steps(args, overrides)
    else:
        cmd_train(args, overrides)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
