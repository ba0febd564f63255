"""Round trips with the real nanoGPT (its unmodified scripts in ../shared/nanogpt, run as a user
runs them, in subprocesses on CPU) and with transformers: gptjax's exports are sampled and resumed
by nanoGPT's own sample.py and train.py, gptjax samples what nanoGPT's train.py wrote, and every
command that takes a checkpoint takes a gptjax run directory."""

import contextlib
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from _compile_cache import session_compile_cache
from _trees import assert_trees_equal
from gptjax import checkpoint, config as config_lib, crosscheck, data, export, sample, weights
from gptjax.checkpoint import load_inference
from gptjax.optim import lr_schedule, make_optimizer
from gptjax.train import train
from test_train import CORPUS, tiny

NANOGPT = Path(__file__).resolve().parents[2] / "shared" / "nanogpt"
PROMPT = "ROMEO:"
NEW_TOKENS = 40
BATCH = dict(batch_size=16, gradient_accumulation_steps=1)

pytestmark = pytest.mark.skipif(not (NANOGPT / "sample.py").is_file(), reason=f"nanoGPT's scripts not at {NANOGPT}")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with session_compile_cache(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A nanoGPT checkout as a user has one: its scripts, and data/shakespeare_char prepared by
    gptjax (nanoGPT's format) from the first 50,000 characters of tiny-shakespeare."""
    pytest.importorskip("torch")
    if not CORPUS.is_file():
        pytest.skip(f"tiny-shakespeare corpus not found at {CORPUS}")
    root = tmp_path_factory.mktemp("nanoGPT")
    for name in ("model.py", "sample.py", "train.py", "configurator.py"):
        shutil.copy(NANOGPT / name, root / name)
    from gptjax.prepare import prepare_shakespeare_char

    prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8")[:50_000], root / "data" / "shakespeare_char")
    return root


@pytest.fixture(scope="module")
def run_dir(clone, tmp_path_factory):
    """A gptjax run with nanoGPT's numerics (exact GELU, no bias), trained until greedy text is
    more than one repeated character, checkpointed at iter 300."""
    out = tmp_path_factory.mktemp("gptjax_run")
    train(tiny(clone / "data" / "shakespeare_char", out, activation="gelu", max_iters=300, eval_interval=300,
               learning_rate=2e-2, min_lr=2e-3, warmup_iters=10, lr_decay_iters=300, **BATCH))
    return out


def nanogpt(clone, script, *flags, cwd=None):
    """stdout of one of nanoGPT's scripts, run from the clone on CPU."""
    proc = subprocess.run([sys.executable, str(clone / script), "--device=cpu", *flags], cwd=cwd or clone,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def nanogpt_greedy(clone, out_dir) -> str:
    """nanoGPT's sample.py at a temperature so low that sampling is the argmax."""
    out = nanogpt(clone, "sample.py", f"--out_dir={out_dir}", f"--start={PROMPT}", "--num_samples=1",
                  f"--max_new_tokens={NEW_TOKENS}", "--temperature=1e-9")
    assert "Loading meta from data/shakespeare_char/meta.pkl" in out, out  # not GPT-2's BPE
    return out.split("meta.pkl...\n", 1)[1].split("\n---------------", 1)[0]


def gptjax_greedy(*flags, cwd, new_tokens=NEW_TOKENS) -> str:
    """gptjax.sample's greedy text, run in this process from `cwd` (as the command would be)."""
    out = io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            code = sample.main([*flags, f"--start={PROMPT}", "--num_samples=1", f"--max_new_tokens={new_tokens}",
                                "--temperature=0"])
    finally:
        os.chdir(here)
    assert code == 0
    return out.getvalue().split("\n---------------", 1)[0]


def test_nanogpt_sample_py_prints_the_greedy_text_of_an_export(clone, run_dir, tmp_path):
    dest = tmp_path / "out-nano"
    assert export.main([str(run_dir), "--to=nanogpt", str(dest), f"--nanogpt={clone}"]) == 0
    ours = gptjax_greedy(f"--out_dir={run_dir}", cwd=tmp_path)
    assert ours.startswith(PROMPT) and len(set(ours[len(PROMPT):])) > 2, ours
    assert nanogpt_greedy(clone, dest) == ours
    # and gptjax reads nanoGPT's out_dir back, finding the vocabulary beside ckpt.pt
    assert gptjax_greedy(f"--out_dir={dest}", cwd=tmp_path) == ours


def test_nanogpt_train_py_resumes_an_export(clone, run_dir, tmp_path):
    dest = tmp_path / "out-nano"
    export.to_nanogpt(run_dir, dest, clone)
    out = nanogpt(clone, "train.py", "--dataset=shakespeare_char",
                  "--init_from=resume", f"--out_dir={dest}", "--compile=False", "--eval_iters=20", "--eval_interval=300",
                  "--max_iters=303", "--warmup_iters=10", "--lr_decay_iters=300", "--n_layer=2", "--n_head=2", "--n_embd=32",
                  "--block_size=16", "--batch_size=16", "--gradient_accumulation_steps=1", "--bias=False",
                  "--dropout=0.0", "--log_interval=1")
    # it evaluates the exported weights at the exported iteration, then trains on from there
    evals = [line for line in out.splitlines() if line.startswith("step 300:")]
    assert len(evals) == 1 and "iter 302: loss" in out, out[-2000:]
    val = float(evals[0].rsplit("val loss ", 1)[1])
    ours = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val_loss" in r][-1]
    assert abs(val - ours["val_loss"]) < 0.15, (val, ours)  # other random batches; an untrained model is 4.17


def test_the_exported_adamw_state_takes_the_same_step_in_nanogpt(clone, run_dir, tmp_path):
    """nanoGPT's own GPT and configure_optimizers, loading the exported ckpt.pt's model and
    optimizer, take the same AdamW step from the same gradients as the gptjax run would."""
    import torch

    ckpt_path = export.to_nanogpt(run_dir, tmp_path / "out-nano")["written"][0]
    params, cfg, saved = load_inference(run_dir)
    run = config_lib.from_dict(saved["run"])
    optimizer = make_optimizer(run)
    opt_state = checkpoint.restore_part(run_dir, saved["iter_num"], "opt_state", jax.eval_shape(optimizer.init, params))
    rng = np.random.default_rng(0)
    grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 1e-3, params)
    assert float(optax.tree.norm(grads)) < run.grad_clip  # no clipping: the same gradients reach AdamW
    updates, _ = optimizer.update(grads, opt_state, params)
    expected = optax.apply_updates(params, updates)

    spec = importlib.util.spec_from_file_location("nanogpt_model", clone / "model.py")
    nanogpt_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt_model)
    ckpt = torch.load(ckpt_path, map_location="cpu")
    model = nanogpt_model.GPT(nanogpt_model.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    torch_opt = model.configure_optimizers(run.weight_decay, run.learning_rate, (run.beta1, run.beta2), "cpu")
    torch_opt.load_state_dict(ckpt["optimizer"])
    for group in torch_opt.param_groups:
        group["lr"] = float(lr_schedule(run)(saved["iter_num"]))  # what nanoGPT's get_lr sets
    from gptjax.convert import nanogpt_state_dict

    torch_grads = nanogpt_state_dict(grads, cfg)
    for name, p in model.named_parameters():
        p.grad = torch_grads[name].clone()
    torch_opt.step()
    want = nanogpt_state_dict(expected, cfg)
    got = model.state_dict()
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=0, atol=2e-7, err_msg=name)
    assert not np.array_equal(got["transformer.wte.weight"].numpy(), ckpt["model"]["transformer.wte.weight"].numpy())


def test_gptjax_samples_what_nanogpt_train_py_wrote(clone, tmp_path):
    out_dir = clone / "out-shakespeare-char"  # where nanoGPT's README puts it: in the clone
    nanogpt(clone, "train.py", "--dataset=shakespeare_char", "--out_dir=out-shakespeare-char", "--compile=False", "--eval_iters=2", "--eval_interval=300", "--max_iters=300",
            "--lr_decay_iters=300", "--warmup_iters=10", "--learning_rate=2e-2", "--min_lr=2e-3", "--n_layer=2",
            "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=16", "--gradient_accumulation_steps=1",
            "--bias=False", "--dropout=0.0")
    want = nanogpt_greedy(clone, out_dir)
    assert len(set(want[len(PROMPT):])) > 2, want
    elsewhere = tmp_path / "elsewhere"  # not the clone: data/shakespeare_char is found beside the out_dir
    elsewhere.mkdir()
    assert gptjax_greedy(f"--init_from={out_dir / 'ckpt.pt'}", cwd=elsewhere) == want
    assert gptjax_greedy(f"--out_dir={out_dir}", cwd=elsewhere) == want


def test_hf_export_carries_the_character_vocabulary(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    dest = tmp_path / "hf"
    assert export.main([str(run_dir), "--to=hf", str(dest)]) == 0
    meta = data.load_meta(run_dir)
    tok = transformers.AutoTokenizer.from_pretrained(dest)
    text = "ROMEO:\nO, she doth teach the torches to burn bright!"
    ids = tok.encode(text)
    assert ids == [meta["stoi"][ch] for ch in text] and tok.decode(ids) == text
    model = transformers.GPT2LMHeadModel.from_pretrained(dest).eval()
    prompt = torch.tensor([tok.encode(PROMPT)])
    new = 16 - len(PROMPT)  # GPT2LMHeadModel stops at its context; gptjax and nanoGPT would crop and go on
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    got = gptjax_greedy(f"--init_from={dest}", cwd=tmp_path, new_tokens=new)
    assert PROMPT + tok.decode(hf[0, prompt.shape[1]:].tolist()) == got and len(set(got[len(PROMPT):])) > 2


def test_hf_export_of_a_bpe_model_has_gpt2s_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tiktoken

    from gptjax.convert import save_hf
    from gptjax.model import GPTConfig, init_params

    cfg = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, activation="gelu_tanh")
    save_hf(init_params(cfg, jax.random.PRNGKey(0)), cfg, tmp_path / "src")
    export.to_hf(tmp_path / "src", tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world, it's 2026: naïve café <|endoftext|> done."
    assert tok.encode(text) == tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
    assert tok.eos_token_id == 50256


def test_a_run_directory_is_taken_wherever_a_checkpoint_is(run_dir, clone, tmp_path, capsys):
    params, cfg, _ = load_inference(run_dir)
    loaded = weights.load(run_dir)
    assert loaded.kind == "gptjax" and loaded.iter_num == 300 and loaded.meta == data.load_meta(run_dir)
    assert_trees_equal(loaded.params, params)
    assert crosscheck.main([str(run_dir)]) == 0
    assert "gptjax run vs nanoGPT's GPT" in capsys.readouterr().out
    result = train(tiny(clone / "data" / "shakespeare_char", tmp_path / "tuned", init_from=str(run_dir),
                        activation="gelu", max_iters=2, eval_interval=2, **BATCH))
    assert result["iter"] == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert f"from the weights of {run_dir} (gptjax run, iter 300)" in text, text[-2000:]


def test_export_refuses_to_overwrite_and_names_bad_sources(run_dir, clone, tmp_path):
    dest = tmp_path / "out-nano"
    export.to_nanogpt(run_dir, dest)
    before = (dest / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="overwrites nothing"):
        export.to_nanogpt(run_dir, dest)
    assert (dest / "ckpt.pt").read_bytes() == before
    other = clone.parent / "other_clone"
    (other / "data" / "shakespeare_char").mkdir(parents=True)
    meta = data.load_meta(run_dir)
    swapped = dict(meta, stoi={**meta["stoi"], "a": meta["stoi"]["b"], "b": meta["stoi"]["a"]},
                   itos={**meta["itos"], meta["stoi"]["a"]: "b", meta["stoi"]["b"]: "a"})
    (other / "data" / "shakespeare_char" / "meta.pkl").write_bytes(pickle.dumps(swapped))
    with pytest.raises(ValueError, match="another vocabulary"):
        export.to_nanogpt(run_dir, tmp_path / "second", other)
    assert not (tmp_path / "second").exists()
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--to=hf", str(tmp_path / "x")]) == 2
    with pytest.raises(ValueError, match="holds no gptjax run"):
        weights.load(tmp_path / "empty")
    # a failed start leaves no empty checkpoints/ that a later command would take for a run
    with pytest.raises(ValueError):
        train(tiny(clone / "data" / "shakespeare_char", tmp_path / "failed", init_from=str(tmp_path / "empty")))
    assert not (tmp_path / "failed" / "checkpoints").exists()
