"""One writer per out_dir, save and metrics failures that stop the run where they happen, corrupt
weight files, and messages that name the real problem: each case of the reliability issue,
reproduced first, and each asserting that no saved checkpoint, metrics record or data was lost."""

import errno
import json
import os
import shutil
import signal
import subprocess

import pytest

from gptjax import crosscheck, faults, plot, sample
from gptjax.checkpoint import checkpoint_dir

from _faults import CORPUS, M, TMP, args, assert_kept, complete, error_lines, run_main, snapshot, steps, temporaries


def test_a_second_writer_is_refused_and_a_killed_runs_lock_is_taken_over(space, reference):
    out = space.fresh("two-writers", like=reference.out)
    first = space.start("writer-1", args(out, space.data, init_from="resume", max_iters=M + 10**7,
                                                 eval_interval=10**7))  # still running when killed
    first.until(lambda: any(r["iter"] > M for r in steps(out, False)), "the first run's steps")
    before, metrics = snapshot(out), (out / "metrics.jsonl").read_text()
    second = space.run("writer-2", args(out, space.data, init_from="resume", max_iters=M + 10**7))
    assert second.proc.returncode == 2, second.output()[-3000:]
    assert error_lines(second) == [f"error: out_dir {out} is being written by another run (pid {first.proc.pid} on "
                                   f"{os.uname().nodename}, since {error_lines(second)[0].split(', since ')[1]}"], \
        error_lines(second)
    assert (out / "metrics.jsonl").read_text().startswith(metrics)  # the second run wrote nothing there
    first.kill()  # kill -9: the lock file stays, its flock goes with the process
    assert (out / faults.OutDirLock.NAME).is_file()
    assert_kept(before, snapshot(out))
    third = space.run("writer-3", args(out, space.data, init_from="resume", max_iters=M + 2))
    assert third.proc.returncode == 0, third.output()[-3000:]
    iters = [r["iter"] for r in steps(out)]
    assert iters[-2:] == [M, M + 1] and len(error_lines(third)) == 0


def test_a_failed_save_stops_the_run_at_once(space, reference):
    """Saves every 200 iterations; the one at 200 fails (a file size limit stands in for a full
    disk): the run stops where the failure is noticed, not at its next save, with one error line."""
    out = space.fresh("save-fails", like=reference.out)
    before = snapshot(out)
    child = space.run("save-fails", args(out, space.data, init_from="resume", max_iters=600, eval_interval=200,
                                         log_interval=10), file_size_limit=40 << 10)  # metrics.jsonl stays small
    assert child.proc.returncode == 2, child.output()[-3000:]
    errors = error_lines(child)
    assert len(errors) == 1 and "could not save the checkpoint of step 200" in errors[0], child.output()[-3000:]
    assert f"the newest complete checkpoint, step {M}, is intact" in errors[0]
    assert max(r["iter"] for r in steps(out)) < 400  # the next save's step
    assert complete(out) == list(range(1, M + 1))
    assert_kept(before, snapshot(out))


def test_a_full_disk_under_metrics_jsonl_and_its_torn_line(space, reference, capsys):
    out = space.fresh("metrics-full", like=reference.out)
    before = snapshot(out)
    size = (out / "metrics.jsonl").stat().st_size
    child = space.run("metrics-full", args(out, space.data, init_from="resume", max_iters=M + 20, eval_interval=1000),
                      file_size_limit=size + 300)  # room for about two more records, and no save is due
    assert child.proc.returncode == 2, child.output()[-3000:]
    (error,) = error_lines(child)
    assert error.startswith(f"error: could not write {out / 'metrics.jsonl'} at iter ") and "free disk space" in error
    assert error.endswith(f"The last checkpoint (iter {M}) is untouched; resume with --init_from=resume"), error
    assert_kept(before, snapshot(out))
    text = (out / "metrics.jsonl").read_text()
    tail = text[text.rfind("\n") + 1:]  # what follows the last newline: part of a record, or nothing
    if not tail or tail.endswith("}"):  # the limit fell between two records or just before a newline
        (out / "metrics.jsonl").write_text(text + '{"iter": 99, "lo')  # tear the last line as a crash would
    plot.read_metrics(out)  # the torn last line is skipped, with a warning
    assert "torn line" in capsys.readouterr().err
    resumed = space.run("metrics-resumed", args(out, space.data, init_from="resume", max_iters=M + 2))
    assert resumed.proc.returncode == 0, resumed.output()[-3000:]
    assert "ended in a torn line" in resumed.output() and "removed" in resumed.output()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line whole: no record follows half of one
    assert [r["iter"] for r in steps(out)][-2:] == [M, M + 1]


def _corrupt(tmp_path, kind):
    """A weight file of `kind` damaged as a failed download or a wrong file would be."""
    import jax
    import numpy as np

    from gptjax.convert import save_hf, save_nanogpt
    from gptjax.model import GPTConfig, init_params

    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    weights = jax.tree_util.tree_map(lambda x: rng.normal(0, 0.02, x.shape).astype(x.dtype), shapes)
    if kind == "safetensors":
        path = save_hf(weights, cfg, tmp_path / "hf")
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 3])
        return path, f"{path / 'model.safetensors'} is not a readable safetensors file: it is truncated or corrupt"
    if kind == "pytorch_model.bin":
        path = save_hf(weights, cfg, tmp_path / "hf")
        (path / "model.safetensors").unlink()
        (path / "pytorch_model.bin").write_bytes(b"\x80\x02not a zip")
        return path, f"{path / 'pytorch_model.bin'} is not a readable PyTorch checkpoint"
    path = save_nanogpt(weights, cfg, tmp_path / "ckpt.pt")
    if kind == "text ckpt.pt":
        path.write_text("this is a text file\n")
    else:  # a truncated zip
        path.write_bytes(path.read_bytes()[:20000])
    return path, f"{path} is not a readable PyTorch checkpoint: it is truncated, corrupt or not written by torch.save"


@pytest.mark.parametrize("kind", ["safetensors", "pytorch_model.bin", "text ckpt.pt", "truncated ckpt.pt"])
def test_corrupt_weight_files_are_one_line_errors_everywhere(space, tmp_path, capsys, kind):
    pytest.importorskip("torch")
    path, message = _corrupt(tmp_path, kind)
    assert crosscheck.main([str(path)]) == 2  # 1 is kept for "loaded, and the numbers differ"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    assert sample.main([f"--init_from={path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {message}"), err
    rc, errors = run_main(capsys, args(tmp_path / "out", space.data, init_from=path))
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message}"), errors
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_dp_and_fsdp_can_be_set_on_a_cpu_only_host(space, reference):
    """The mesh is built at set-up, so an evaluation of the reference's checkpoint (one compile,
    no train step) proves it; the one-device checkpoint restores sharded over two."""
    out = space.fresh("fsdp2", like=reference.out)
    child = space.run("fsdp2", args(out, space.data, dp=1, fsdp=2, init_from="resume", eval_only=True))
    assert child.proc.returncode == 0, child.output()[-3000:]
    assert "mesh {'data': 1, 'fsdp': 2}" in child.output() and f"step {M}: train loss" in child.output()


def test_a_second_ctrl_c_while_the_stop_save_is_written(space, reference):
    """The stop's save is waited for before "checkpoint saved" is said; a second Ctrl-C in that wait
    leaves at once, and the next run clears the unfinished save's temporary directory."""
    out = space.fresh("ctrl-c-in-save", like=reference.out)
    before = snapshot(out)
    child = space.start("ctrl-c-in-save", args(out, space.data, init_from="resume", max_iters=M + 400,
                                               eval_interval=1000), slow_wait=30)
    child.until(lambda: any(r["iter"] > M for r in steps(out, False)), "steps past the checkpoint")
    child.proc.send_signal(signal.SIGINT)
    child.until(lambda: "test: waiting for a save" in child.output(), "the stop's save")
    child.proc.send_signal(signal.SIGINT)
    assert child.wait(timeout=20) == faults.EXIT_INTERRUPTED, child.output()[-3000:]
    text = child.output()
    assert "checkpoint saved" not in text and "Traceback" not in text, text[-3000:]
    assert "error: interrupted: exiting at once without waiting for a checkpoint save" in text
    assert_kept(before, snapshot(out))
    leftover = checkpoint_dir(out) / f"{M + 1}{TMP}-1234"  # what a kill mid-save leaves, whatever the timing
    leftover.mkdir(exist_ok=True)
    resumed = space.run("ctrl-c-resumed", args(out, space.data, init_from="resume", max_iters=M + 1))
    assert resumed.proc.returncode == 0, resumed.output()[-3000:]
    assert not temporaries(out)


def test_eval_only_from_scratch_into_a_run_is_refused(space, reference, tmp_path, capsys):
    out = space.fresh("eval-scratch", like=reference.out)
    metrics = (out / "metrics.jsonl").read_text()
    rc, errors = run_main(capsys, args(out, space.data, eval_only=True))
    assert rc == 2 and errors == [f"error: eval_only with init_from=scratch evaluates random weights, not the run in "
                                  f"out_dir '{out}' (newest checkpoint: iter {M}): pass --init_from=resume to "
                                  "evaluate it"], errors
    assert (out / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize("case", ["val.bin missing", "data_dir a file", "config a directory", "out_dir empty",
                                  "config fails to import", "init_from typo", "hf config.json broken",
                                  "prepare input not utf-8", "gptjax out_dir to crosscheck"])
def test_messages_name_the_real_problem(space, reference, tmp_path, capsys, case):
    base = args(tmp_path / "out", space.data)
    if case == "val.bin missing":
        data = tmp_path / "data"
        data.mkdir()
        (data / "train.bin").write_bytes((space.data / "train.bin").read_bytes())
        rc, errors = run_main(capsys, args(tmp_path / "out", data))
        expected = f"{data} has train.bin but no val.bin: the dataset is incomplete; prepare it again with"
        assert (data / "train.bin").read_bytes() == (space.data / "train.bin").read_bytes()
    elif case == "data_dir a file":
        (tmp_path / "f").write_text("x")
        rc, errors = run_main(capsys, args(tmp_path / "out", tmp_path / "f"))
        expected = f"data_dir {tmp_path / 'f'} is a file: pass the directory that holds train.bin and val.bin"
    elif case == "config a directory":
        (tmp_path / "cfgs").mkdir()
        rc, errors = run_main(capsys, [str(tmp_path / "cfgs"), *base])
        expected = f"config {tmp_path / 'cfgs'} is a directory: pass a config file"
    elif case == "out_dir empty":
        rc, errors = run_main(capsys, [*base, "--out_dir="])
        expected = "invalid config: out_dir is empty: pass --out_dir=DIR"
    elif case == "config fails to import":
        (tmp_path / "broken.py").write_text("from gptjax.config import TrainConfig\nx = undefined_name\n")
        rc, errors = run_main(capsys, [str(tmp_path / "broken.py"), *base])
        expected = f"config file {tmp_path / 'broken.py'} fails to run (line 2): NameError:"
    elif case == "init_from typo":
        rc, errors = run_main(capsys, [*base, "--init_from=resum"])
        expected = "init_from='resum' is not 'scratch', 'resume', a GPT-2 name (gpt2, gpt2-medium"
    elif case == "hf config.json broken":
        (tmp_path / "hf").mkdir()
        (tmp_path / "hf" / "config.json").write_text('{"n_embd": 32,')
        rc, errors = run_main(capsys, [*base, f"--init_from={tmp_path / 'hf'}"])
        expected = f"{tmp_path / 'hf' / 'config.json'} is not valid JSON"
    elif case == "prepare input not utf-8":
        from gptjax import prepare

        (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
        rc = prepare.main(["shakespeare_char", f"--input={tmp_path / 'latin1.txt'}", f"--out={tmp_path / 'p'}"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        expected = f"{tmp_path / 'latin1.txt'} is not UTF-8 text (invalid continuation byte at byte 3)"
    else:
        pytest.importorskip("torch")
        rc = crosscheck.main([str(reference.out)])
        out = capsys.readouterr()
        assert rc == 0 and "gptjax run vs nanoGPT's GPT" in out.out, out
        return
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(f"error: {expected}"), errors
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_out_of_memory_is_one_line_with_the_fix(space, tmp_path):
    overcommit = "/proc/sys/vm/overcommit_memory"
    if not os.path.exists(overcommit) or open(overcommit).read().strip() != "0":
        pytest.skip("needs the kernel's heuristic overcommit, which refuses an allocation larger than the machine")
    if not CORPUS.is_file():
        pytest.skip(f"needs tiny-shakespeare's 111k validation tokens ({CORPUS})")
    from gptjax.prepare import prepare_shakespeare_char

    prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8"), tmp_path / "data")
    out = space.fresh("oom")
    # a context of 100000: one (B, H, T, T) buffer of 600 GB, which the allocator refuses at once
    child = space.run("oom", args(out, tmp_path / "data", block_size=100000, batch_size=12, max_iters=1))
    assert child.proc.returncode == 2, child.output()[-3000:]
    (error,) = error_lines(child)
    assert error.startswith("error: out of device memory (RESOURCE_EXHAUSTED") and "lower batch_size" in error, error
    assert "Traceback" not in child.output()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs, mounted for the test (as root; skipped otherwise) and unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_that_really_fills_during_the_run(space, reference, small_disk):
    """The run's out_dir on a small filesystem that the test fills while it trains: one error line
    naming the full disk, every finished checkpoint intact, and the run resumes once there is room."""
    out = small_disk / "run"
    shutil.copytree(reference.out, out)
    child = space.start("really-full", args(out, space.data, init_from="resume", max_iters=M + 10**6))
    child.until(lambda: complete(out)[-1] > M, "a checkpoint past the reference's")
    ballast = small_disk / "ballast"
    with open(ballast, "wb", buffering=0) as f:  # fill the disk, then leave less room than a checkpoint takes
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * (1 << 16))
        assert full.value.errno == errno.ENOSPC
    with open(ballast, "r+b") as f:
        f.truncate(os.path.getsize(ballast) - (64 << 10))
    before = snapshot(out)
    assert child.wait() == 2, child.output()[-3000:]
    (error,) = error_lines(child)
    assert "No space left on device" in error, error
    assert_kept(before, snapshot(out))
    kept = complete(out)
    ballast.unlink()
    resumed = space.run("really-full-resumed", args(out, space.data, init_from="resume", max_iters=kept[-1] + 2))
    assert resumed.proc.returncode == 0, resumed.output()[-3000:]
    assert complete(out)[-1] == kept[-1] + 2 and all(json.loads(line) for line in
                                                     (out / "metrics.jsonl").read_text().splitlines())
