"""Interrupted training: SIGTERM and SIGINT (once and twice), and kill -9 in the middle of
checkpoint saves. A resumed run must log exactly (bitwise, float32 on CPU) the losses and end with
exactly the parameters of one uninterrupted run; no finished checkpoint may change."""

import os
import random
import shutil
import signal
import time

import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import faults

from _faults import (
    M, TMP, args, assert_kept, assert_params_equal, assert_same_losses, complete, params,
    snapshot, steps, temporaries,
)


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
    assert ckpt_lib.Checkpointer(out).latest_step() == n
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
        assert ckpt_lib.Checkpointer(out).latest_step() == after[-1]
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
    manager = ckpt_lib.Checkpointer(out)
    assert manager.latest_step() == M and M + 1 not in manager.manager.all_steps()
    manager.close()
    assert complete(out)[-1] == M
    assert_params_equal(params(out), reference.final)

