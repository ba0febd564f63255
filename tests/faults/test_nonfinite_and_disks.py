"""Non-finite losses (stop, or skip and count) and storage failures (a full disk at save time, an
unwritable out_dir): a clear error, and the last good checkpoint kept."""

import errno
import math
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import data as data_lib
from gptjax import faults

from _faults import (
    M, RUN, data_copy, args, assert_kept, assert_params_equal, assert_same_losses, complete,
    error_lines, params, run_main, snapshot, steps, temporaries,
)


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
    data, out = data_copy(space, tmp_path), space.fresh("nan-stop")
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
    data, out = data_copy(space, tmp_path), space.fresh("nan-skip")
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
                      file_size_limit=40 << 10)
    assert child.proc.returncode == 2, child.output()[-3000:]
    errors = error_lines(child)
    assert len(errors) == 1, child.output()[-3000:]
    assert f"could not save the checkpoint of step {M + 1}" in errors[0]
    assert "(File too large: " in errors[0] and f"the newest complete checkpoint, step {M}, is intact" in errors[0]
    assert complete(out) == list(range(1, M + 1))
    assert ckpt_lib.Checkpointer(out).latest_step() == M
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
    shapes = {"a": jax.ShapeDtypeStruct((3, 4), np.float32), "b": [jax.ShapeDtypeStruct((5,), np.int32)]}
    assert faults.state_nbytes(shapes) == 48 + 20  # a state not yet created, as a resume sees it

