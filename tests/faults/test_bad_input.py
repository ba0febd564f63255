"""Bad configs, data, checkpoints, pickles and prompts: a one-line error naming the problem and the
fix, before anything compiles, and no user file changed."""

import os
import pickle
import shutil

import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib

from _faults import CORPUS, M, data_copy, args, assert_kept, complete, error_lines, run_main, snapshot


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
    ("missing", ["has val.bin but no train.bin: the dataset is incomplete", "python -m gptjax.prepare"]),
    ("empty", ["train.bin has 0 bytes"]),
    ("short", ["val.bin holds 10 tokens but block_size=16 needs at least 17"]),
    ("big-token", ["train.bin holds token id 300 but vocab_size="]),
    ("meta-vocab", ["meta.pkl has vocab_size=", "but the model has 20"]),
    ("meta-inconsistent", ["meta.pkl is inconsistent"]),
])
def test_bad_data_is_one_line_error_before_compiling(space, tmp_path, capsys, compilations, damage, expected):
    data, extra = data_copy(space, tmp_path), {}
    if damage == "missing":
        (data / "train.bin").unlink()
        extra = {"dataset": "mycorpus"}
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
    data = data_copy(space, tmp_path)
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
    ({"bias": True}, "bias: checkpoint False vs config True"),
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


def test_sampling_a_corrupt_checkpoint_names_it_and_the_one_to_fall_back_on(space, reference, capsys):
    from gptjax import sample

    out = space.fresh("corrupt-params", like=reference.out)
    step = ckpt_lib.checkpoint_dir(out) / str(M)
    older = sorted(int(p.name) for p in step.parent.iterdir() if p.name.isdigit() and int(p.name) < M)
    for f in (step / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:  # the tensor data, not its small metadata
            os.truncate(f, f.stat().st_size // 2)
    assert sample.main([f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=4"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot read the parameters of checkpoint {step}: it is corrupt" in errors[0], errors
    if older:
        assert f"the older checkpoint {older[-1]} is still there" in errors[0], errors[0]


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
