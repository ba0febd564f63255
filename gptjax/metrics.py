"""Console progress bar, metrics.jsonl, TensorBoard events and optional Weights & Biases, from the
main process only."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gptjax import paths
from gptjax.config import TrainConfig
from gptjax.perf import mfu, recorded_peak_flops


class MetricsWriteError(OSError):
    """metrics.jsonl could not take a record (a full disk); train adds which checkpoint is safe."""


def open_for_appending(path: Path):
    """`path` opened to append lines; a last line that a crash or a full disk cut off mid-write is
    cut away first (with a warning), so appended records never follow half of one."""
    if path.is_file():
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - (64 << 10)))  # records are far shorter: the last newline is in here
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n") + 1
                torn = tail[cut:][:60].decode(errors="replace")
                print(f"warning: {path} ended in a torn line ({torn!r}...), cut off by a crash or a full disk "
                      "while it was written: removed", file=sys.stderr)
                f.truncate(size - len(tail) + cut)
    return open(path, "ab", buffering=0)  # unbuffered: a failed write leaves nothing to flush at close


def _scalars_event(record: dict[str, Any]):
    """One TensorBoard event holding all of a record's scalars at its iter, in the summary's scalar
    field, which TensorBoard reads as scalars: tensorboard.summary.Writer builds an event and a
    tensor per scalar, host time that a logged step takes from the devices' cores on a CPU host."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=name, simple_value=value) for name, value in record.items() if name != "iter"]
    return Event(wall_time=time.time(), step=record["iter"], summary=Summary(value=values))


class MetricsLogger:
    """Shows iteration, loss, lr, ms/iter, tokens/s, MFU and ETA; appends one JSON object per
    logged step (iter, loss, lr, grad_norm, loss_scale in float16 runs, dt_ms, tokens_per_s, mfu),
    per eval (iter, train_loss, val_loss) and per task evaluation (iter, 'task/metric': value) to
    OUT_DIR/metrics.jsonl, except in eval_only runs; the same scalars, under the same names, go to
    TensorBoard events in OUT_DIR/tensorboard (cfg.tensorboard)."""

    def __init__(self, cfg: TrainConfig, start_iter: int, is_main: bool, flops_per_iter: float):
        self.cfg, self.is_main, self.flops_per_iter = cfg, is_main, flops_per_iter
        self.last_time = None
        self.bar = self.file = self.wandb = self.copy = self.tensorboard = self.events_copy = None
        if not is_main:
            return
        if not cfg.eval_only:  # an evaluation leaves out_dir as it was: its losses are printed only
            out_dir = paths.resolve(cfg.out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            self.path = out_dir / "metrics.jsonl"
            # a bucket object takes no appends: they go to a local copy, uploaded at each eval and at close
            self.copy = None if isinstance(self.path, Path) else paths.WorkingCopy(self.path)
            self.file = open_for_appending(self.path if self.copy is None else self.copy.local)
            self.bar = tqdm(total=cfg.max_iters, initial=start_iter, desc="train", unit="it",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
            if cfg.tensorboard:  # TensorBoard's own event writer: no TensorFlow or PyTorch to import
                from tensorboard.summary.writer.event_file_writer import EventFileWriter

                events = out_dir / "tensorboard"  # on a bucket: a local copy, uploaded as metrics.jsonl is
                self.events_copy = None if isinstance(events, Path) else paths.DirectoryCopy(events)
                self.tensorboard = EventFileWriter(str(events if self.events_copy is None else self.events_copy.local))
        self.peak_flops, _ = recorded_peak_flops()  # before the timed loop, not in it
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise ImportError("wandb_log=True needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=cfg.to_dict())

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            line = (json.dumps(record) + "\n").encode()
            try:  # a failure tears at most this line, which the next open cuts off
                written = 0
                while written < len(line):  # a write may take only part of it before the disk is full
                    written += self.file.write(line[written:])
            except OSError as err:
                raise MetricsWriteError(f"could not write {self.path} at iter {record['iter']} "
                                        f"({err.strerror or err}): free disk space") from err
        if self.tensorboard is not None:
            try:  # the writer's thread reports a failed write at the next call
                self.tensorboard.add_event(_scalars_event(record))
            except OSError as err:
                self.tensorboard = None  # its thread has stopped: nothing is left to close
                raise MetricsWriteError(f"could not write the TensorBoard events in {self.path.parent / 'tensorboard'} "
                                        f"at iter {record['iter']} ({err.strerror or err}): free disk space") from err
        if self.wandb is not None:
            self.wandb.log(record, step=record["iter"])

    def info(self, message: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(message)

    def step(self, it: int, metrics: dict[str, Any]) -> None:
        """Called once per step with the step's metrics already on the host."""
        now = time.perf_counter()
        dt, self.last_time = (None if self.last_time is None else now - self.last_time), now
        if not self.is_main:
            return
        self.bar.update(1)
        if it % self.cfg.log_interval:
            return
        record = {"iter": it, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"]}
        if "loss_scale" in metrics:  # float16 runs
            record["loss_scale"] = metrics["loss_scale"]
        postfix = f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e}"
        if dt is not None:  # the first step after start or an eval has no step time
            record.update(dt_ms=dt * 1e3, tokens_per_s=self.cfg.tokens_per_iter / dt,
                          mfu=mfu(self.flops_per_iter, dt, peak=self.peak_flops))
            postfix += (f" {record['dt_ms']:.1f}ms {record['tokens_per_s']:,.0f}tok/s "
                        f"mfu {record['mfu'] * 100:.1f}%")
        self.bar.set_postfix_str(postfix, refresh=False)
        self._write(record)

    def eval(self, it: int, train_loss: float, val_loss: float) -> None:
        self.last_time = None  # the eval's time is not a training step's
        if not self.is_main:
            return
        self.info(f"step {it}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
        self._write({"iter": it, "train_loss": train_loss, "val_loss": val_loss})
        try:
            if self.copy is not None:
                self.copy.upload()
            if self.events_copy is not None and self.tensorboard is not None:
                self.tensorboard.flush()
                self.events_copy.upload()
        except OSError as err:
            raise MetricsWriteError(f"{err} at iter {it}") from err

    def tasks(self, it: int, metrics: dict[str, float]) -> None:
        self.last_time = None  # nor is the tasks' time
        if not self.is_main:
            return
        self.info(f"step {it}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
        self._write({"iter": it, **metrics})

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.events_copy is not None:
            self.events_copy.close()
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.copy is not None:
            self.copy.close()
        if self.wandb is not None:
            self.wandb.finish()
