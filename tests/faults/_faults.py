"""Shared by the fault tests (tests/faults/test_*.py): the tiny run they all train, real
`python -m gptjax.train` children (through _fault_worker.py) whose output is polled from files, and
checks on what a run leaves on disk: checkpoints, metrics, data.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import train

ROOT = Path(__file__).resolve().parents[2]  # the repository
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TIMEOUT = 300  # seconds for one child on a busy 2-core machine (a cold compile is ~1 minute there)
M = 24  # iterations of the reference run
RUN = dict(dataset="shakespeare_char", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
           gradient_accumulation_steps=1, dropout=0.1, eval_interval=1, eval_iters=4, log_interval=1,
           always_save_checkpoint=True, keep_checkpoints=100, learning_rate=1e-3, warmup_iters=2,
           lr_decay_iters=40, min_lr=1e-4, max_iters=M, seed=7)
TMP = ".orbax-checkpoint-tmp"


def args(out_dir, data_dir, **overrides):
    return [f"--{k}={v}" for k, v in {**RUN, "out_dir": out_dir, "data_dir": data_dir, **overrides}.items()]


class Child:
    """One `python -m gptjax.train` process (through _fault_worker.py), its output in files we poll."""

    def __init__(self, workdir: Path, name: str, argv, env, file_size_limit=None, slow_wait=None):
        self.out, self.err = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
        limit = [] if file_size_limit is None else ["--file-size-limit", str(file_size_limit)]
        slow = [] if slow_wait is None else ["--slow-wait", str(slow_wait)]
        command = [sys.executable, str(Path(__file__).with_name("_fault_worker.py")), *limit, *slow, "--", *argv]
        self.relay = None
        with open(self.out, "w") as out, open(self.err, "w") as err:
            if file_size_limit is None:
                self.proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=err)
                return
        # The size limit binds every file the child writes, its own logs too: orbax's noise could
        # fill the log and swallow the error line. Relay the child's output through a pipe instead.
        self.proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.relay = threading.Thread(target=self._copy_output, daemon=True)
        self.relay.start()

    def _copy_output(self) -> None:
        with open(self.err, "ab") as err:
            for line in self.proc.stdout:
                err.write(line)
                err.flush()

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait(self, timeout=TIMEOUT) -> int:
        code = self.proc.wait(timeout=timeout)
        if self.relay is not None:
            self.relay.join(timeout=60)
        return code

    def until(self, condition, what: str, timeout=TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"training exited ({self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.002)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)



def records(out_dir, complete=True):
    path = Path(out_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    if not complete and lines and not lines[-1].endswith("}"):
        lines = lines[:-1]  # being written right now
    return [json.loads(line) for line in lines if line.strip()]


def steps(out_dir, complete=True):
    return [r for r in records(out_dir, complete) if "loss" in r]


def complete(out_dir):
    return ckpt_lib.complete_steps(ckpt_lib.checkpoint_dir(out_dir))


def temporaries(out_dir):
    """(name, inode) of the unfinished saves: scandir's inode needs no stat, which would race the rename."""
    directory = ckpt_lib.checkpoint_dir(out_dir)
    return {(e.name, e.inode()) for e in os.scandir(directory) if TMP in e.name} if directory.is_dir() else set()


def snapshot(*dirs):
    """sha256 of every file of every finished checkpoint (and of any plain directory given)."""
    digests = {}
    for d in dirs:
        d = Path(d)
        roots = [d] if (d / "train.bin").exists() else [ckpt_lib.checkpoint_dir(d) / str(s) for s in complete(d)]
        for r in roots:
            for f in sorted(r.rglob("*")):
                if f.is_file():
                    digests[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def assert_kept(before: dict, after: dict):
    lost = [f for f in before if f not in after]
    changed = [f for f in before if f in after and after[f] != before[f]]
    assert not lost and not changed, f"lost {lost[:3]}, changed {changed[:3]}"


def params(out_dir, step=None):
    flat = ckpt_lib.load_inference(out_dir, step)[0]
    import jax

    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(flat)[0]}


def assert_params_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs"  # bitwise: float32 CPU is deterministic


def assert_same_losses(out_dir, reference, steps_logged=range(M), upto=M):
    """Every step before `upto` and eval at or before it that the (interrupted, resumed) run logged
    equals the reference bitwise, including steps logged twice (after a kill, the steps past the
    checkpoint run again); and the steps logged are exactly `steps_logged`."""
    ref = {(r["iter"], "loss" in r): r for r in records(reference.out)}
    got = records(out_dir)
    for r in got:
        if r["iter"] > upto or (r["iter"] == upto and "loss" in r):
            continue
        want = ref[(r["iter"], "loss" in r)]
        for key in ("loss", "grad_norm", "train_loss", "val_loss"):
            if key in r:
                assert r[key] == want[key], f"iter {r['iter']} {key}: {r[key]!r} != reference {want[key]!r}"
    assert {r["iter"] for r in got if "loss" in r} == set(steps_logged)


def error_lines(child):
    return [line for line in child.err.read_text().splitlines() if line.startswith("error:")]


def data_copy(space, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(space.data, data)
    return data


def run_main(capsys, argv):
    """gptjax.train.main in this process: (exit code, its `error:` lines); no traceback allowed."""
    rc = train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]

