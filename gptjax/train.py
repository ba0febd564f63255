"""Training: `python -m gptjax.train [CONFIG] [--key=value ...]`, nanoGPT's train.py in JAX.

The loop is host-side bookkeeping around one jitted, sharded `train_step`; metrics of step n are
read while step n+1 runs, so the host never stalls the device to log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import pickle
import sys
from typing import Any, Sequence

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import cpu
from gptjax import data as data_lib
from gptjax import autotune
from gptjax import paths, perf, prepare
from gptjax import sharding
from gptjax.checkpoint import Checkpointer, check_model_matches, check_state_matches, model_meta, write_json
from gptjax.config import TrainConfig
from gptjax.faults import (OutDirLock, StopRequest, check_free_space, check_writable, exit_now, first_line,
                           state_nbytes)
from gptjax.metrics import MetricsLogger, MetricsWriteError
from gptjax.kernels import Kernels
from gptjax.model import GPT2_ARCHITECTURE, PRESETS, GPTConfig, crop_block_size, flops_per_token, num_params
from gptjax.optim import lr_schedule, make_optimizer
from gptjax.step import abstract_train_state, create_train_state, jit_steps


class NonFiniteLoss(FloatingPointError):
    pass


@dataclasses.dataclass
class Run:
    """What the loop needs, built once by `setup`; a notebook can build it and drive steps itself."""

    cfg: TrainConfig
    model_cfg: GPTConfig
    kernels: Kernels
    mesh: Any
    state: Any
    state_shardings: Any
    train_step: Any
    eval_step: Any
    dataset: data_lib.BinDataset
    checkpointer: Checkpointer
    best_val_loss: float = float("inf")
    started_from: str = ""  # the weights of iter 0 or of the resumed checkpoint, for the log
    lock: OutDirLock | None = None  # held by the process that writes out_dir
    tasks: Any = None  # harness.TrainingTasks of eval_tasks: params, step -> {task/metric: value}

    def close(self, wait_for_saves: bool = True) -> None:
        """Finish (or, wait_for_saves=False, abandon) the save in flight and let out_dir go."""
        try:
            if wait_for_saves:
                self.checkpointer.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def batch(self, split: str, step: int, eval_index: int | None = None):
        """This host's share of a batch as numpy (A, B_local, T), A = accumulation steps."""
        accum = self.cfg.gradient_accumulation_steps if eval_index is None else 1
        return data_lib.get_batch(
            self.dataset, split, step, self.cfg.batch_size, self.cfg.block_size, self.cfg.seed,
            jax.process_index(), jax.process_count(), accum, eval_index,
        )

    def to_device(self, local_batch):
        """Assemble the hosts' numpy shares into global arrays sharded over the mesh."""
        x, y = local_batch
        batch_sharding = sharding.batch_sharding(self.mesh)
        shape = (x.shape[0], self.cfg.batch_size, x.shape[2])
        return (sharding.global_batch(x, batch_sharding, shape), sharding.global_batch(y, batch_sharding, shape))

    def estimate_loss(self, step: int) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, as nanoGPT's estimate_loss: each
        split's batches stacked into one call (the eval step's mean over its A dimension)."""
        out = {}
        for split in ("train", "val"):
            x, y = zip(*(self.batch(split, step, k) for k in range(self.cfg.eval_iters)))
            batches = self.to_device((np.concatenate(x), np.concatenate(y)))  # (eval_iters, B, T)
            out[split] = float(self.eval_step(self.state.params, batches))
        return out

    def save(self, step: int) -> None:
        if step == self.checkpointer.latest_step():
            return  # resumed from this very step: the checkpoint on disk is this state
        meta = {"iter_num": step, "best_val_loss": self.best_val_loss, "run": self.cfg.to_dict(),
                "model": model_meta(self.model_cfg)}
        self.checkpointer.save(step, self.state, meta)


def _with_run_settings(model_cfg: GPTConfig, cfg: TrainConfig) -> GPTConfig:
    """A checkpoint's model with this run's settings that leave its weights as they are."""
    return dataclasses.replace(model_cfg, **cfg.run_settings())


def _load_model_config(cfg: TrainConfig, meta: dict | None, checkpointer: Checkpointer):
    """(model config, imported params or None, resume meta or None, what the weights start from)
    for cfg.init_from; `meta`: the dataset's character vocabulary (None: GPT-2's BPE)."""
    if cfg.init_from != "resume" and not cfg.eval_only and (step := checkpointer.latest_step()) is not None:
        # its saves would overwrite, rotate out or collide with the checkpoints of the run already there
        # (an eval_only run saves nothing)
        raise ValueError(
            f"out_dir {cfg.out_dir!r} already holds the checkpoints of a run (newest: iter {step}), which a new "
            f"run (init_from={cfg.init_from}) would overwrite: continue that run with --init_from=resume "
            f"(and a larger --max_iters), pass another --out_dir, or remove {cfg.out_dir} to start over"
        )
    if cfg.init_from == "scratch" and cfg.eval_only and (step := checkpointer.latest_step()) is not None:
        raise ValueError(f"eval_only with init_from=scratch evaluates random weights, not the run in out_dir "
                         f"{cfg.out_dir!r} (newest checkpoint: iter {step}): pass --init_from=resume to evaluate it")
    if cfg.init_from == "scratch":
        return cfg.model_config(meta and meta["vocab_size"]), None, None, f"random weights (seed {cfg.seed})"
    if cfg.init_from == "resume":
        step = checkpointer.latest_step()
        if step is None:
            nanogpt = paths.resolve(cfg.out_dir) / "ckpt.pt"
            hint = (f", or start from the weights of nanoGPT's {nanogpt} with --init_from={nanogpt}"
                    if nanogpt.is_file() else "")
            raise FileNotFoundError(
                f"init_from=resume but there is no checkpoint in {checkpointer.directory}; "
                f"start with --init_from=scratch{hint}"
            )
        saved = checkpointer.restore_meta(step)
        source = str(checkpointer.directory / str(step))
        # The model is the checkpoint's, as in nanoGPT: a run started from pretrained weights has an
        # architecture its n_layer/n_embd/... keys never described. Those keys must still be the ones
        # the checkpointed run was given, so a changed --n_embd is refused rather than ignored.
        run = dict(saved.get("run") or saved["model"])
        if cfg.vocab_size == saved["model"]["vocab_size"]:
            run["vocab_size"] = cfg.vocab_size  # an explicit vocab_size naming the model's own (run: 0)
        check_model_matches(run, cfg, source)
        check_state_matches(saved, cfg, source)
        return _with_run_settings(GPTConfig.from_fields(saved["model"]), cfg), None, saved, f"checkpoint {source}"
    from gptjax import weights  # torch-free for HF safetensors and gptjax runs

    if cfg.init_from not in PRESETS and not paths.resolve(cfg.init_from).exists():
        raise ValueError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume', a GPT-2 name ({', '.join(PRESETS)}) "
                         "or an existing path (a gptjax out_dir, a Hugging Face directory, a nanoGPT ckpt.pt)")
    loaded = weights.load(cfg.init_from, need_vocabulary=False)
    params, model_cfg = loaded.params, loaded.cfg
    if loaded.meta is not None and meta is not None and loaded.meta["stoi"] != meta["stoi"]:
        raise ValueError(f"{cfg.init_from} was trained on other characters than {cfg.resolved_data_dir}/meta.pkl "
                         "holds: fine-tune it on data prepared with its own vocabulary")
    # The architecture is the checkpoint's; a setting that asks for another one cannot be honoured.
    asked = [f"{k}={getattr(cfg, k)!r}" for k, default in GPT2_ARCHITECTURE.items()
             if getattr(cfg, k) != default and getattr(cfg, k) != getattr(model_cfg, k)]
    if asked:
        raise ValueError(f"{cfg.init_from} holds a model whose weights cannot be run with {', '.join(asked)}: "
                         "drop these settings to fine-tune it, or train such a model with --init_from=scratch")
    if cfg.block_size > model_cfg.block_size:
        raise ValueError(f"block_size={cfg.block_size} is larger than {cfg.init_from}'s {model_cfg.block_size}")
    if cfg.block_size < model_cfg.block_size:
        params, model_cfg = crop_block_size(params, model_cfg, cfg.block_size)
    return _with_run_settings(model_cfg, cfg), params, None, f"the weights of {loaded.describe()}"


def setup(cfg: TrainConfig) -> Run:
    """Build the mesh, data, model, sharded state and jitted steps; restore when resuming."""
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(cfg.dp, cfg.fsdp)
    sharding.check_batch_divisible(cfg.batch_size, mesh)
    if cfg.batch_size % jax.process_count():
        raise ValueError(f"batch_size={cfg.batch_size} does not divide over {jax.process_count()} hosts")
    if jax.process_index() == 0:
        check_writable(cfg.out_dir)
    with contextlib.ExitStack() as on_error:
        lock = None
        if jax.process_index() == 0 and not cfg.eval_only:  # an evaluation writes nothing: a reader
            lock = OutDirLock(cfg.out_dir)
            on_error.callback(lock.release)
        run = _setup(cfg, mesh, lock)
        on_error.pop_all()
    return run


def _setup(cfg: TrainConfig, mesh, lock: OutDirLock | None) -> Run:
    """setup once out_dir is this process's to write (`lock`; None: another host's, or an evaluation)."""
    data_dir = cfg.resolved_data_dir
    # Every host prepares when the files are missing: pod hosts have their own disks, and one that
    # read meta.pkl before host 0 had written it would build a model with GPT-2's vocabulary.
    # The writes are atomic renames, so hosts sharing a disk never see half-written files.
    prepare.ensure_dataset(cfg.dataset, data_dir, cfg.data_input or None)
    meta = data_lib.load_meta(data_dir)  # the character vocabulary; None for GPT-2's BPE
    run_meta = data_lib.load_meta(cfg.out_dir) if cfg.init_from == "resume" else None
    if run_meta is not None and (meta is None or meta["stoi"] != run_meta["stoi"]):
        raise ValueError(f"{data_dir} is no longer the character vocabulary this run was trained on "
                         f"({cfg.out_dir}/meta.pkl): it was prepared again from another text; prepare it "
                         "from the run's text, or pass the --data_dir that holds it")
    checkpointer = Checkpointer(cfg.out_dir, keep=cfg.keep_checkpoints, writer=lock is not None)
    model_cfg, params, resume_meta, started_from = _load_model_config(cfg, meta, checkpointer)
    if meta is not None and meta["vocab_size"] > model_cfg.vocab_size:
        raise ValueError(f"the dataset's meta.pkl has vocab_size={meta['vocab_size']} but the model has "
                         f"{model_cfg.vocab_size}: re-prepare the data or fix vocab_size")
    dataset = data_lib.BinDataset(data_dir, cfg.block_size, model_cfg.vocab_size, cfg.dataset)

    optimizer = make_optimizer(cfg, mesh)
    abstract, shardings = abstract_train_state(model_cfg, optimizer, mesh, cfg.seed, params)
    if jax.process_index() == 0:
        check_free_space(cfg.out_dir, state_nbytes(abstract) + (16 << 20))
    best_val = float("inf")
    if resume_meta is None:
        state, _ = create_train_state(model_cfg, optimizer, mesh, cfg.seed, params, shardings)
    else:  # restored straight into its layout: nothing is initialised only to be overwritten
        state, _ = checkpointer.restore(abstract)
        best_val = resume_meta["best_val_loss"]
    tasks = None
    if cfg.task_names:
        from gptjax import harness  # lm-eval: only for runs that evaluate tasks

        tasks = harness.TrainingTasks(cfg, model_cfg, meta)
    kernels = autotune.for_run(cfg, model_cfg, mesh)
    train_step, eval_step = jit_steps(model_cfg, kernels, optimizer, lr_schedule(cfg), shardings, mesh)
    if jax.process_index() == 0 and not cfg.eval_only:  # an evaluation leaves out_dir as it was
        out_dir = paths.resolve(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", cfg.to_dict())
        if meta is not None:  # the run's own vocabulary, for sampling after data/ is prepared again
            paths.write_bytes(out_dir / "meta.pkl", pickle.dumps(meta))
    return Run(cfg, model_cfg, kernels, mesh, state, shardings, train_step, eval_step, dataset, checkpointer, best_val,
               started_from, lock, tasks)


def train(cfg: TrainConfig, stop: StopRequest | None = None) -> dict[str, Any]:
    """Run nanoGPT's loop: eval + checkpoint every eval_interval, log every log_interval.
    Returns the last metrics (loss, val_loss, iter, ...)."""
    if cfg.wandb_log and importlib.util.find_spec("wandb") is None:  # before minutes of set-up, not after
        raise ImportError("wandb_log=True needs wandb: pip install wandb")
    if cfg.task_names and importlib.util.find_spec("lm_eval") is None:
        raise ImportError(f"eval_tasks={cfg.eval_tasks!r} needs lm-evaluation-harness: pip install 'gptjax[eval]'")
    if cfg.task_names and jax.process_count() > 1:
        raise ValueError("eval_tasks runs in single-process runs only: evaluate a multi-host run's checkpoints "
                         "with python -m gptjax.eval --out_dir=OUT_DIR --tasks=...")
    run = setup(cfg)
    stop = stop or StopRequest()
    start = int(jax.device_get(run.state.step))
    n_params = num_params(run.state.params)
    flops_per_iter = flops_per_token(run.model_cfg, n_params) * cfg.tokens_per_iter
    log = MetricsLogger(cfg, start, is_main=run.is_main, flops_per_iter=flops_per_iter)
    k = run.kernels
    log.info(f"{n_params / 1e6:.2f}M parameters (non-embedding); {run.model_cfg.dtype}; mesh "
             f"{dict(run.mesh.shape)}; kernels: attention {k.attention}, matmul {k.matmul}, grad_reduce "
             f"{k.grad_reduce}, dots {k.dot_library}; {cfg.tokens_per_iter:,} tokens per iteration; starting at iter {start} from {run.started_from}")
    last: dict[str, Any] = {"iter": start}
    # The host thread gathers each batch and copies it to the devices ahead of the step.
    prefetch = data_lib.Prefetcher(lambda s: run.to_device(run.batch("train", s)), start,
                                   depth=max(cfg.prefetch, 1))
    pending = None  # (iter, device metrics) of the step in flight
    hard_stop = False
    try:
        with stop.installed():
            it = start
            while True:
                if it % cfg.eval_interval == 0 or it == cfg.max_iters or cfg.eval_only:
                    if pending is not None:
                        last.update(_log_step(run, log, *pending))
                        pending = None
                    last.update(_evaluate(run, it, log))
                    if cfg.eval_only:
                        break
                if it >= cfg.max_iters or stop.requested:
                    break
                run.checkpointer.check()
                batch = prefetch.next()
                run.state, metrics = run.train_step(run.state, batch)
                if pending is not None:  # read the previous step while this one runs
                    last.update(_log_step(run, log, *pending))
                pending = (it, metrics)
                it += 1
            if pending is not None:
                last.update(_log_step(run, log, *pending))
                pending = None
            if stop.requested:
                run.save(it)
                run.checkpointer.wait()  # "saved" is said once it is; a second Ctrl-C meanwhile leaves at once
                log.info(f"stopped by {stop.signal_name} at iter {it}; checkpoint saved to "
                         f"{run.checkpointer.directory}. Resume with the same command plus --init_from=resume")
                last["stopped"] = stop.signal_name
    except MetricsWriteError as err:
        then = "resume with --init_from=resume" if run.checkpointer.latest_step() is not None else "start again"
        raise MetricsWriteError(f"{err}. {_last_checkpoint(run)}; {then}") from err
    except KeyboardInterrupt:
        # A second Ctrl-C: leave without waiting for a save in flight; its temporary directory is
        # never renamed, so the newest complete checkpoint stays the one a resume restores.
        hard_stop = True
        raise
    finally:
        prefetch.close()
        try:
            run.close(wait_for_saves=not hard_stop)
        finally:
            log.close()
    return last


def _evaluate(run: Run, it: int, log: MetricsLogger) -> dict[str, Any]:
    losses = run.estimate_loss(it)
    log.eval(it, losses["train"], losses["val"])
    if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
        # finite-but-absurd weights (e.g. after a huge learning rate) must not replace a good checkpoint
        message = (f"non-finite eval loss (train {losses['train']}, val {losses['val']}) at iter {it}; "
                   "no checkpoint saved")
        if run.cfg.nonfinite == "stop":
            raise NonFiniteLoss(message + f": stopping. {_last_checkpoint(run)}; lower the learning_rate")
        log.info(message)
        return {"train_loss": losses["train"], "val_loss": losses["val"]}
    if losses["val"] < run.best_val_loss or run.cfg.always_save_checkpoint:
        run.best_val_loss = min(run.best_val_loss, losses["val"])
        if it > 0 and not run.cfg.eval_only:
            run.save(it)
    out = {"train_loss": losses["train"], "val_loss": losses["val"]}
    if run.tasks is not None:  # while the checkpoint saves in the background
        out.update(task_metrics := run.tasks(run.state.params, it))
        log.tasks(it, task_metrics)
    return out


def _log_step(run: Run, log: MetricsLogger, it: int, metrics) -> dict[str, Any]:
    metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
    if metrics["nonfinite"]:
        message = (f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at iter {it}; "
                   "the update was not applied")
        if run.cfg.nonfinite == "stop":
            raise NonFiniteLoss(message + f": stopping. {_last_checkpoint(run)}; lower the "
                                "learning_rate or pass --nonfinite=skip to skip such updates")
        log.info(message + f" (skipped {metrics['skipped']} so far)")
    log.step(it, metrics)
    return {"iter": it + 1, "loss": metrics["loss"], "lr": metrics["lr"]}


def _last_checkpoint(run: Run) -> str:
    step = run.checkpointer.latest_step()
    return "No checkpoint was saved" if step is None else f"The last checkpoint (iter {step}) is untouched"


def main(argv: Sequence[str] | None = None, tune_cpu: bool = False) -> int:
    """The CLI. tune_cpu (set when run as `python -m gptjax.train`): on a CPU-only machine, run
    the batch data-parallel over the cores as separate XLA devices and keep freed memory for
    reuse (cpu.tune_host)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(config_lib.help_text())
        return 0
    cfg = None
    try:
        cfg = config_lib.parse_args(argv)
        if tune_cpu:
            cpu.tune_host(cfg)
        train(cfg)
    except KeyboardInterrupt:
        exit_now(cfg.out_dir if cfg is not None else None)
    except (ValueError, TypeError, OSError, ImportError, NonFiniteLoss) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if not isinstance(err, NonFiniteLoss) else 3
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        print(f"error: out of device memory ({first_line(err)}): lower batch_size or block_size (with more "
              "gradient_accumulation_steps for the same batch), or pass --remat=full", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    perf.enable_compilation_cache()
    sys.exit(main(tune_cpu=True))
