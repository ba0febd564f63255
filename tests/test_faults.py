"""Reliability of training: SIGTERM/SIGINT, kill -9 during checkpoint saves, non-finite losses,
full disks, and bad configs, data, checkpoints and pickles. Real `python -m gptjax.train`
subprocesses on a tiny char model; every test checks that no finished checkpoint or data file changed.

Resumed runs must log exactly (bitwise, float32 on CPU) the losses and end with exactly the
parameters of one uninterrupted run. Children share a JAX compilation cache so only the first
of each graph compiles.
"""

import errno
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import data as data_lib
from gptjax import prepare
from gptjax import faults, train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
TIMEOUT = 300  # seconds for one child on a busy 2-core machine (a cold compile is ~1 minute there)
M = 24  # iterations of the reference run
RUN = dict(dataset="shakespeare_char", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4,
           gradient_accumulation_steps=1, dropout=0.1, eval_interval=1, eval_iters=4, log_interval=1,
           always_save_checkpoint=True, keep_checkpoints=100, learning_rate=1e-3, warmup_iters=2,
           lr_decay_iters=40, min_lr=1e-4, max_iters=M, seed=7)
TMP = ".orbax-checkpoint-tmp"


# ----------------------------------------------------------------------------- helpers


def args(out_dir, data_dir, **overrides):
    return [f"--{k}={v}" for k, v in {**RUN, "out_dir": out_dir, "data_dir": data_dir, **overrides}.items()]


class Child:
    """One `python -m gptjax.train` process (through _fault_worker.py), its output in files we poll."""

    def __init__(self, workdir: Path, name: str, argv, env, file_size_limit=None):
        self.out, self.err = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
        limit = [] if file_size_limit is None else ["--file-size-limit", str(file_size_limit)]
        command = [sys.executable, str(Path(__file__).with_name("_fault_worker.py")), *limit, "--", *argv]
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


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A tiny char dataset, a shared compilation cache, and a way to start children that are all
    killed at the end whatever happens."""
    root = tmp_path_factory.mktemp("faults")
    text = CORPUS.read_text()[:20000] if CORPUS.is_file() else "".join(
        random.Random(0).choice("abcdefghij klmnop\n") for _ in range(20000))
    prepare.prepare_shakespeare_char(text, root / "data")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, always
    env.update(GPTJAX_CPU_DEVICES="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    children = []

    class Space:
        data = root / "data"

        def start(self, name, argv, extra_env=None, **kw):
            children.append(Child(root, name, argv, {**env, **(extra_env or {})}, **kw))
            return children[-1]

        def run(self, name, argv, **kw):
            child = self.start(name, argv, **kw)
            child.wait()
            return child

        def fresh(self, name, like=None):
            out = root / name
            if like is not None:
                shutil.copytree(like, out)
            return out

    try:
        yield Space()
    finally:
        for child in children:
            child.kill()


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


def _data_copy(space, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(space.data, data)
    return data


@pytest.fixture(scope="module")
def reference(space):
    """One uninterrupted run of M iterations, a checkpoint after every one."""
    out = space.fresh("reference")
    child = space.run("reference", args(out, space.data))
    assert child.proc.returncode == 0, child.output()[-3000:]
    assert complete(out) == list(range(1, M + 1))
    return SimpleNamespace(out=out, final=params(out))


# ----------------------------------------------------------------------------- signals


def test_sigterm_finishes_step_checkpoints_and_resumes_bitwise(space, reference):
    out = space.fresh("sigterm")
    data_before = snapshot(space.data)
    child = space.start("sigterm", args(out, space.data))
    child.until(lambda: complete(out) and any(r["iter"] > complete(out)[0] for r in steps(out, False)),
                "progress past a checkpoint")
    before = snapshot(out)
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait() == 0, child.output()[-3000:]
    text = child.output()
    stopped = [line for line in text.splitlines() if line.startswith("stopped by SIGTERM at iter")]
    assert len(stopped) == 1 and "--init_from=resume" in stopped[0], text[-2000:]
    n = int(stopped[0].split("at iter ")[1].split(";")[0])
    assert 0 < n < M and complete(out)[-1] == n
    assert ckpt_lib.Checkpointer(out, create=False).latest_step() == n
    assert_kept(before, snapshot(out))

    resumed = space.run("sigterm-resume", args(out, space.data, init_from="resume"))
    assert resumed.proc.returncode == 0, resumed.output()[-3000:]
    assert f"starting at iter {n}" in resumed.output()
    assert_same_losses(out, reference)
    assert_params_equal(params(out), reference.final)
    assert_kept(data_before, snapshot(space.data))


def test_sigint_checkpoints_and_says_how_to_resume(space, reference):
    out = space.fresh("sigint")
    child = space.start("sigint", args(out, space.data))
    child.until(lambda: len(complete(out)) >= 2, "two checkpoints")
    before = snapshot(out)
    child.proc.send_signal(signal.SIGINT)
    assert child.wait() == 0, child.output()[-3000:]
    text = child.output()
    assert "SIGINT received: finishing the current step" in text
    n = int(text.split("stopped by SIGINT at iter ")[1].split(";")[0])
    assert "Resume with the same command plus --init_from=resume" in text
    assert complete(out)[-1] == n < M
    assert_kept(before, snapshot(out))
    assert_params_equal(params(out, n), params(reference.out, n))


def test_second_ctrl_c_exits_at_once_and_keeps_checkpoints(space, reference):
    """The second Ctrl-C lands while the run evaluates 2 x 100000 batches (tens of seconds): the
    process must leave within seconds, with code 130, the eval never finished, checkpoints intact."""
    out = space.fresh("ctrl-c-twice", like=reference.out)
    before = snapshot(out)
    child = space.start("ctrl-c-twice", args(out, space.data, init_from="resume", max_iters=M + 100,
                                             eval_iters=100000))
    child.until(lambda: f"starting at iter {M}" in child.output(), "the training loop")
    time.sleep(2.0)  # the loop installs its handlers right after that line, then starts the long eval
    child.proc.send_signal(signal.SIGINT)
    child.until(lambda: "SIGINT received" in child.output(), "the first Ctrl-C to be acknowledged", timeout=60)
    t0 = time.monotonic()
    child.proc.send_signal(signal.SIGINT)
    assert child.wait() == faults.EXIT_INTERRUPTED, child.output()[-3000:]
    assert time.monotonic() - t0 < 20
    text = child.output()
    assert f"step {M}: train loss" not in text  # the eval was abandoned, not finished
    assert f"error: interrupted: exiting at once without waiting for a checkpoint save. The newest " \
           f"complete checkpoint, step {M}" in text
    assert "Traceback" not in text
    assert_kept(before, snapshot(out))
    assert_params_equal(params(out), reference.final)


def test_stop_request_second_sigint_raises_and_handlers_are_restored():
    stop = faults.StopRequest()
    previous = signal.getsignal(signal.SIGINT)
    with stop.installed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM keeps the polite stop
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------------------- kill -9


def test_sigkill_during_saves_keeps_checkpoints_and_resume_is_bitwise(space, reference):
    """Kill at the first sight of a save's temporary directory, then a little and a lot later; after
    each kill every finished checkpoint is unchanged, orbax's latest_step is the newest finished
    one (temporary directories ignored) and it holds the reference's parameters of that step."""
    out = space.fresh("sigkill")
    rng = random.Random(1)
    seen, left_temporaries = {}, []
    for attempt, max_delay in enumerate([0.0, 0.05, 0.5]):
        stale = temporaries(out)
        done = complete(out)
        resume = {"init_from": "resume"} if done else {}
        child = space.start(f"sigkill{attempt}", args(out, space.data, **resume))
        child.until(lambda: complete(out) and temporaries(out) - stale, "a checkpoint save to start")
        time.sleep(rng.uniform(0, max_delay))
        child.kill()
        after = complete(out)
        assert set(done) <= set(after) and after, (done, after)
        assert ckpt_lib.Checkpointer(out, create=False).latest_step() == after[-1]
        assert_kept(seen, snapshot(out))
        seen = snapshot(out)
        left_temporaries.append(bool(temporaries(out)))
        assert_params_equal(params(out), params(reference.out, after[-1]))
    assert any(left_temporaries), "no kill landed during a save; the test proved nothing about them"

    child = space.run("sigkill-final", args(out, space.data, init_from="resume"))
    assert child.proc.returncode == 0, child.output()[-3000:]
    assert complete(out) == list(range(1, M + 1)) and not temporaries(out)  # interrupted steps saved again
    assert_kept(seen, snapshot(out))
    assert_same_losses(out, reference)
    assert_params_equal(params(out), reference.final)


def test_unfinished_saves_are_invisible_to_latest_step(space, reference):
    """What a kill right after save() returns leaves: `<step>.orbax-checkpoint-tmp*` directories,
    even complete-looking ones, are never a step; the newest renamed one is restored."""
    out = space.fresh("leftovers", like=reference.out)
    directory = ckpt_lib.checkpoint_dir(out)
    shutil.copytree(directory / str(M), directory / f"{M + 1}{TMP}-1700000000")  # all files, never renamed
    shutil.copytree(directory / str(M) / "meta", directory / f"{M + 2}{TMP}" / "meta")  # half written
    manager = ckpt_lib.Checkpointer(out, create=False)
    assert manager.latest_step() == M and M + 1 not in manager.manager.all_steps()
    manager.close()
    assert complete(out)[-1] == M
    assert_params_equal(params(out), reference.final)


# ----------------------------------------------------------------------------- non-finite


def _windows(split, n_tokens, it, eval_index=None):
    ix = data_lib.batch_offsets(RUN["seed"], split, it, n_tokens, RUN["block_size"], RUN["batch_size"],
                                eval_index=eval_index)
    return [(int(i), int(i) + RUN["block_size"]) for i in ix.ravel()]  # x and y: T + 1 tokens


def lone_positions(data_dir, split):
    """{("step" | "eval", iter): a position of `split` that only this step or eval reads} for
    every step and eval of an M-iteration run: poisoning it hits exactly that one."""
    n = (Path(data_dir) / f"{split}.bin").stat().st_size // 2
    reads = {("eval", i): [w for k in range(RUN["eval_iters"]) for w in _windows(split, n, i, k)]
             for i in range(M + 1)}
    if split == "train":
        reads.update({("step", t): _windows(split, n, t) for t in range(M)})
    readers = np.zeros(n, np.int32)  # how many steps/evals read each position
    for windows in reads.values():
        mask = np.zeros(n, bool)
        for lo, hi in windows:
            mask[lo : hi + 1] = True
        readers += mask
    return {key: next((q for lo, hi in windows for q in range(lo, hi + 1) if readers[q] == 1), None)
            for key, windows in reads.items()}


def poison(path, position):
    """Overwrite one token in place with id 65535 (beyond any vocabulary): the running trainer's
    memory map sees it after its start-up check, and an out-of-range id embeds (and scores) as NaN."""
    with open(path, "r+b") as f:
        f.seek(2 * position)
        f.write(b"\xff\xff")


def _poison_ahead(child, out, data, targets):
    """Once the run has logged a step, poison each (split, kind, offset) target `offset` iterations
    ahead of it, beyond the batches the prefetcher may already hold. Returns the poisoned iterations."""
    lone = {split: lone_positions(data, split) for split in {t[0] for t in targets}}
    child.until(lambda: steps(out, False), "a logged step")
    now = max(r["iter"] for r in steps(out, False))
    hit = []
    for split, kind, offset in targets:
        it = now + offset
        assert it < M and lone[split][(kind, it)] is not None, (split, kind, it)
        poison(data / f"{split}.bin", lone[split][(kind, it)])
        hit.append(it)
    return hit


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(space, reference, tmp_path):
    data, out = _data_copy(space, tmp_path), space.fresh("nan-stop")
    child = space.start("nan-stop", args(out, data))
    [k] = _poison_ahead(child, out, data, [("train", "step", 8)])
    assert child.wait() == 3, child.output()[-3000:]
    errors = error_lines(child)
    assert errors == [f"error: non-finite loss (nan) or gradient norm (nan) at iter {k}; the update was not "
                      f"applied: stopping. The last checkpoint (iter {k}) is untouched; lower the learning_rate "
                      "or pass --nonfinite=skip to skip such updates"], errors
    assert "Traceback" not in child.output()
    assert_same_losses(out, reference, steps_logged=range(k))  # the non-finite step k is not logged
    assert complete(out) == list(range(1, k + 1)) and not temporaries(out)
    assert_params_equal(params(out), params(reference.out, k))


def test_nonfinite_skip_counts_skipped_updates_and_saves_no_nonfinite_eval(space, reference, tmp_path):
    """--nonfinite=skip: two poisoned steps are skipped (parameters unchanged) and counted, the run
    goes on; an eval made non-finite by a poisoned val window saves nothing."""
    data, out = _data_copy(space, tmp_path), space.fresh("nan-skip")
    child = space.start("nan-skip", args(out, data, nonfinite="skip"))
    s1, e, s2 = _poison_ahead(child, out, data, [("train", "step", 8), ("val", "eval", 10), ("train", "step", 12)])
    assert child.wait() == 0, child.output()[-3000:]
    text = child.output()
    assert f"at iter {s1}; the update was not applied (skipped 1 so far)" in text
    assert f"at iter {s2}; the update was not applied (skipped 2 so far)" in text
    assert text.count("the update was not applied (skipped") == 2
    assert [r["iter"] for r in steps(out) if math.isnan(r["loss"])] == [s1, s2]
    assert "non-finite eval loss (train " in text and f", val nan) at iter {e}; no checkpoint saved" in text
    assert complete(out) == [i for i in range(1, M + 1) if i != e] and not temporaries(out)
    assert_same_losses(out, reference, upto=s1)  # identical until the first skipped update
    skipped = params(out, s1 + 1)
    assert_params_equal(skipped, params(out, s1))  # the poisoned update was not applied
    assert_params_equal(params(out, s1), params(reference.out, s1))
    assert any(not np.array_equal(skipped[k], v) for k, v in params(reference.out, s1 + 1).items())
    assert all(np.isfinite(v).all() for v in params(out).values())


@pytest.mark.slow  # a graph of its own to compile: about a minute on a busy 2-core machine
def test_absurd_learning_rate_never_replaces_the_last_good_checkpoint(space, reference):
    """lr 1e30: step M's update is finite but absurd, so the eval at M+1 is NaN; with a save due at
    every eval, the run must stop there instead of writing those weights over the good ones."""
    out = space.fresh("absurd-lr", like=reference.out)
    before = snapshot(out)
    child = space.run("absurd-lr", args(out, space.data, init_from="resume", learning_rate=1e30, decay_lr=False,
                                        max_iters=M + 8))
    assert child.proc.returncode == 3, child.output()[-3000:]
    errors = error_lines(child)
    assert len(errors) == 1 and f"non-finite eval loss (train nan, val nan) at iter {M + 1}" in errors[0]
    assert f"The last checkpoint (iter {M}) is untouched" in errors[0]
    assert complete(out) == list(range(1, M + 1)) and not temporaries(out)
    assert_kept(before, snapshot(out))
    assert_params_equal(params(out), reference.final)


# ----------------------------------------------------------------------------- disks


def test_full_disk_at_save_time_is_a_clear_error_and_keeps_the_previous_checkpoint(space, reference):
    out = space.fresh("disk-full", like=reference.out)
    before = snapshot(out)
    child = space.run("disk-full", args(out, space.data, init_from="resume", max_iters=M + 4),
                      file_size_limit=48 << 10)
    assert child.proc.returncode == 2, child.output()[-3000:]
    errors = error_lines(child)
    assert len(errors) == 1, child.output()[-3000:]
    assert f"could not save the checkpoint of step {M + 1}" in errors[0]
    assert "(File too large: " in errors[0] and f"the newest complete checkpoint, step {M}, is intact" in errors[0]
    assert complete(out) == list(range(1, M + 1))
    assert ckpt_lib.Checkpointer(out, create=False).latest_step() == M
    assert_kept(before, snapshot(out))
    assert_params_equal(params(out), reference.final)


def test_storage_errors_lead_with_the_os_cause_however_long_the_paths():
    # tensorstore's wording, with the cause after paths long enough to be cut from one line
    path = "/tmp/" + "deep/" * 80 + "ocdbt.process_0/d/e029b9f1"
    tensorstore = Exception(f'OUT_OF_RANGE: Error writing local file "{path}": Failed to write 5880 bytes '
                            f"to file 7: File too large [os_error_code='27'] [source locations='{path}']")
    assert ckpt_lib._storage_error(tensorstore).startswith("File too large: OUT_OF_RANGE: Error writing")
    try:
        try:
            raise OSError(errno.ENOSPC, "write failed")
        except OSError as cause:
            raise RuntimeError("background save failed") from cause
    except RuntimeError as wrapped:
        assert ckpt_lib._storage_error(wrapped) == f"{os.strerror(errno.ENOSPC)}: background save failed"
    assert ckpt_lib._storage_error(ValueError("no OS cause")) == "no OS cause"


def test_unwritable_out_dir_or_no_free_space_fails_before_training(space, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, errors = run_main(capsys, args(blocker / "out", space.data))
    assert rc == 2 and len(errors) == 1 and "is not writable" in errors[0] and "--out_dir" in errors[0]
    assert blocker.read_text() == "not a directory"

    real_statvfs = os.statvfs
    monkeypatch.setattr(faults.os, "statvfs", lambda p: SimpleNamespace(f_bavail=3, f_frsize=real_statvfs(p).f_frsize))
    rc, errors = run_main(capsys, args(tmp_path / "out", space.data))
    assert rc == 2 and len(errors) == 1 and "MiB free but a checkpoint needs about" in errors[0], errors
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_state_nbytes_counts_every_array():
    tree = {"a": np.zeros((3, 4), np.float32), "b": [np.zeros(5, np.int32), np.zeros((), np.float64)]}
    assert faults.state_nbytes(tree) == 48 + 20 + 8


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def compilations():
    """XLA compilations seen while the test runs: bad input must be refused before any."""
    import jax.monitoring

    seen = []

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


def run_main(capsys, argv):
    """gptjax.train.main in this process: (exit code, its `error:` lines); no traceback allowed."""
    rc = train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("bad, expected", [
    (["--bogus=1"], ["unknown config key(s) ['bogus']"]),
    (["--n_layer=two"], ["'n_layer'", "must be int", "'two'"]),
    (["--n_layer=2.5"], ["'n_layer'", "must be int", "2.5"]),
    (["--n_embd=30", "--n_head=4"], ["n_embd=30 is not divisible by n_head=4"]),
    (["--learning_rate=-0.001"], ["learning_rate=-0.001 must not be negative"]),
    (["--warmup_iters=100", "--lr_decay_iters=10"], ["warmup_iters=100 is larger than lr_decay_iters=10"]),
    (["--batch_size=0"], ["batch_size=0 must be positive"]),
])
def test_bad_config_is_one_line_error_before_anything_runs(space, tmp_path, capsys, compilations, bad, expected):
    rc, errors = run_main(capsys, args(tmp_path / "out", space.data) + bad)
    assert rc == 2 and len(errors) == 1, errors
    assert all(e in errors[0] for e in expected), errors[0]
    assert not compilations and not (tmp_path / "out").exists()


def test_batch_not_divisible_over_data_devices(space):
    child = space.run("two-devices", args(space.fresh("two-devices"), space.data, batch_size=3),
                      extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert child.proc.returncode == 2, child.output()[-2000:]
    assert error_lines(child) == ["error: batch_size=3 does not divide over the 2 data-parallel devices "
                                  "(data=2 x fsdp=1); use a multiple of 2"]


def test_block_size_larger_than_the_pretrained_model(space, tmp_path, capsys, compilations):
    import jax

    from gptjax.convert import save_hf
    from gptjax.model import GPTConfig, init_params

    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)  # numpy weights: init_params would compile for seconds
    save_hf(jax.tree_util.tree_map(lambda x: rng.normal(0, 0.02, x.shape).astype(x.dtype), shapes), cfg,
            tmp_path / "hf")
    before = snapshot(space.data)
    compilations.clear()  # save_hf's own
    rc, errors = run_main(capsys, args(tmp_path / "out", space.data, init_from=tmp_path / "hf", block_size=32))
    assert rc == 2 and len(errors) == 1 and "block_size=32 is larger than" in errors[0] and "16" in errors[0]
    assert not compilations
    assert_kept(before, snapshot(space.data))


def _tokens(path, ids):
    np.asarray(ids, np.uint16).tofile(path)


@pytest.mark.parametrize("damage, expected", [
    ("missing", ["has no train.bin/val.bin", "python -m gptjax.prepare"]),
    ("empty", ["train.bin has 0 bytes"]),
    ("short", ["val.bin holds 10 tokens but block_size=16 needs at least 17"]),
    ("big-token", ["train.bin holds token id 300 but vocab_size="]),
    ("meta-vocab", ["meta.pkl has vocab_size=", "but the model has 20"]),
    ("meta-inconsistent", ["meta.pkl is inconsistent"]),
])
def test_bad_data_is_one_line_error_before_compiling(space, tmp_path, capsys, compilations, damage, expected):
    data, extra = _data_copy(space, tmp_path), {}
    if damage == "missing":
        (data / "train.bin").unlink()
        extra = {"dataset": "mycorpus"}  # shakespeare* would be prepared (downloaded) instead
    elif damage == "empty":
        (data / "train.bin").write_bytes(b"")
    elif damage == "short":
        _tokens(data / "val.bin", range(10))
    elif damage == "big-token":
        _tokens(data / "train.bin", [1, 2, 300] * 100)
    elif damage == "meta-vocab":
        extra = {"vocab_size": 20}
    elif damage == "meta-inconsistent":
        meta = pickle.loads((data / "meta.pkl").read_bytes())
        meta["itos"].pop(3)
        (data / "meta.pkl").write_bytes(pickle.dumps(meta))
    before = snapshot(data)
    rc, errors = run_main(capsys, args(tmp_path / "out", data, **extra))
    assert rc == 2 and len(errors) == 1, errors
    assert all(e in errors[0] for e in expected), errors[0]
    assert not compilations and not complete(tmp_path / "out")
    assert_kept(before, snapshot(data))


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a malicious pickle does, visibly."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_meta_pkl_is_refused_without_running_it(space, tmp_path, capsys, compilations):
    data = _data_copy(space, tmp_path)
    marker = tmp_path / "pwned"
    meta = pickle.loads((data / "meta.pkl").read_bytes())
    (data / "meta.pkl").write_bytes(pickle.dumps({**meta, "extra": _RunsCode(marker)}))
    rc, errors = run_main(capsys, args(tmp_path / "out", data))
    assert rc == 2 and len(errors) == 1 and "refusing to load" in errors[0] and "mkdir" in errors[0], errors
    assert not marker.exists() and not compilations


def test_crafted_nanogpt_ckpt_is_refused_without_running_it(space, tmp_path, capsys, compilations):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    torch.save({"model": {"transformer.wte.weight": torch.zeros(4, 4)}, "model_args": {}, "x": _RunsCode(marker)},
               tmp_path / "ckpt.pt")
    rc, errors = run_main(capsys, args(tmp_path / "out", space.data, init_from=tmp_path / "ckpt.pt"))
    assert rc == 2 and len(errors) == 1 and "refusing to unpickle" in errors[0], errors
    assert not marker.exists() and not compilations


@pytest.mark.parametrize("change, expected", [
    ({"n_embd": 64}, "n_embd: checkpoint 32 vs config 64"),
    ({"n_layer": 2}, "n_layer: checkpoint 1 vs config 2"),
    ({"bias": False}, "bias: checkpoint True vs config False"),
    ({"vocab_size": 80}, "vocab_size: checkpoint"),
])
def test_resume_with_another_model_names_the_mismatch(space, reference, tmp_path, capsys, compilations,
                                                      change, expected):
    out = space.fresh(f"mismatch-{next(iter(change))}", like=reference.out)
    before = snapshot(out)
    rc, errors = run_main(capsys, args(out, space.data, init_from="resume", **change))
    assert rc == 2 and len(errors) == 1 and expected in errors[0] and "different model" in errors[0], errors
    assert not compilations
    assert_kept(before, snapshot(out))


@pytest.mark.parametrize("damage, expected", [
    ("truncated-data", "cannot restore checkpoint"),
    ("garbage-meta", "is corrupt or incomplete: cannot read its metadata"),
    ("no-meta", "is corrupt or incomplete: cannot read its metadata"),
])
def test_corrupt_checkpoint_is_a_clear_error(space, reference, tmp_path, capsys, damage, expected):
    out = space.fresh(f"corrupt-{damage}", like=reference.out)
    step = ckpt_lib.checkpoint_dir(out) / str(M)
    if damage == "truncated-data":
        biggest = max((f for f in step.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
        os.truncate(biggest, biggest.stat().st_size // 2)
    elif damage == "garbage-meta":
        (step / "meta" / "metadata").write_text("{not json")
    elif damage == "no-meta":
        shutil.rmtree(step / "meta")
    before = snapshot(out)
    rc, errors = run_main(capsys, args(out, space.data, init_from="resume"))
    assert rc == 2 and len(errors) == 1, errors
    assert expected in errors[0] and str(step) in errors[0] and "Delete that directory" in errors[0], errors[0]
    assert_kept(before, snapshot(out))


@pytest.mark.parametrize("start, expected", [
    ("To be€", "error: character '€' (U+20AC) is not in the model's 58-character vocabulary: remove it from --start"),
    ("", "error: the prompt (--start) is empty"),
])
def test_bad_sampling_prompt_is_one_line_error(space, reference, capsys, start, expected):
    from gptjax import sample

    before = snapshot(reference.out)
    assert sample.main([f"--out_dir={reference.out}", f"--start={start}", "--num_samples=1"]) == 2
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.startswith("error:")] == [
        line for line in captured.err.splitlines() if line.strip()]
    assert captured.err.strip().startswith(expected) and not captured.out
    assert_kept(before, snapshot(reference.out))


def test_prompt_longer_than_the_context_is_cropped_with_a_warning(space, reference, capsys):
    from gptjax import sample

    prompt = CORPUS.read_text()[:40] if CORPUS.is_file() else "abcdefghij" * 4
    assert sample.main([f"--out_dir={reference.out}", f"--start={prompt}", "--num_samples=1",
                        "--max_new_tokens=3", "--temperature=0"]) == 0
    captured = capsys.readouterr()
    assert "warning: the prompt is 40 tokens, longer than the model's context of 16: only its last 16" in captured.err
    assert captured.out.startswith(prompt) and len(captured.out.split("\n---------------")[0]) == 43
