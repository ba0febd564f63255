"""gptjax.convert and gptjax.crosscheck: nanoGPT ckpt.pt and HF directories in and out, exact
round trips, loud errors on mismatched or unsafe files, and the crosscheck CLI.

Relative difference: max|jax - torch| / max|torch| over all logits; float32 tolerance 1e-4."""

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _trees import assert_trees_equal
from gptjax import convert, crosscheck, weights
from gptjax.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
from gptjax import torch_ref  # noqa: E402  (needs torch)
from test_model import random_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
SMALL = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def jax_logits(params, cfg, idx):
    with jax.default_matmul_precision("highest"):  # a float32 check: no TF32 when run on a GPU
        return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(idx)))


def torch_logits(model, idx):
    with torch.no_grad():
        out = model(torch.as_tensor(idx))
    return (out[0] if isinstance(out, tuple) else out.logits).numpy()


def tokens(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def nanogpt_model(bias=True, vocab_size=64, seed=0):
    tc = torch_ref.GPTConfig(**dict(SMALL, vocab_size=vocab_size), bias=bias)
    model = torch_ref.GPT(tc)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval(), dataclasses.asdict(tc)


def save_like_nanogpt(model, model_args, path, compiled=False):
    """What nanoGPT's train.py writes, optimizer state included."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    idx = torch.as_tensor(tokens(2, 8, model_args["vocab_size"]))
    model.train()
    model(idx, idx)[1].backward()
    opt.step()
    model.eval()
    prefix = "_orig_mod." if compiled else ""
    ckpt = {
        "model": {prefix + k: v for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "model_args": model_args,
        "iter_num": 100,
        "best_val_loss": torch.tensor(2.5),
        "config": {"out_dir": "out", "learning_rate": 1e-3, "compile": compiled},
    }
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------ nanoGPT


@pytest.mark.parametrize(
    "bias,vocab_size,compiled", [(False, 50304, True), (True, 50257, False), (True, 64, True)]
)
def test_nanogpt_ckpt_imports(tmp_path, bias, vocab_size, compiled):
    model, args = nanogpt_model(bias, vocab_size)
    path = save_like_nanogpt(model, args, tmp_path / "ckpt.pt", compiled)
    params, cfg = convert.load_nanogpt(path)
    assert (cfg.bias, cfg.vocab_size, cfg.activation) == (bias, vocab_size, "gelu")
    idx = tokens(2, 16, vocab_size)
    assert rel_diff(jax_logits(params, cfg, idx), torch_logits(model, idx)) < TOL


def test_nanogpt_export_round_trip_and_torch_load(tmp_path):
    cfg = GPTConfig(**SMALL, bias=True)
    params = random_params(cfg)
    path = convert.save_nanogpt(params, cfg, tmp_path, extra={"iter_num": 7})
    assert path == tmp_path / "ckpt.pt"
    back, cfg_back = convert.load_nanogpt(path)
    assert_trees_equal(back, params)
    assert cfg_back == cfg
    in_memory = convert.nanogpt_state_dict(params, cfg)
    assert_trees_equal(convert.params_from_state_dict(in_memory, cfg), params)
    with pytest.raises(ValueError, match="fmt="):
        convert.params_from_state_dict(in_memory, cfg, fmt="linear")

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 7 and "best_val_loss" in ckpt and "config" in ckpt
    ref = torch_ref.GPT(torch_ref.GPTConfig(**ckpt["model_args"]))
    assert list(ckpt["model"]) == list(ref.state_dict())  # same keys, same order, no mask buffer
    assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()
    ref.load_state_dict(ckpt["model"], strict=True)
    idx = tokens(2, 16, 64)
    assert rel_diff(jax_logits(params, cfg, idx), torch_logits(ref.eval(), idx)) < TOL


def test_nanogpt_export_refuses_other_numerics(tmp_path):
    cfg = GPTConfig(**SMALL, activation="gelu_tanh")
    params = random_params(cfg)
    with pytest.raises(ValueError, match="gelu_tanh.*allow_numerics_change"):
        convert.save_nanogpt(params, cfg, tmp_path / "ckpt.pt")
    convert.save_nanogpt(params, cfg, tmp_path / "ckpt.pt", allow_numerics_change=True)
    assert convert.load_nanogpt(tmp_path / "ckpt.pt")[1].activation == "gelu_tanh"


def test_nanogpt_shape_and_key_errors(tmp_path):
    model, args = nanogpt_model()
    state = model.state_dict()

    torch.save({"model": state, "model_args": dict(args, n_embd=48, n_head=4)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"wte.weight has shape \(64, 32\).*needs \(64, 48\)"):
        convert.load_nanogpt(tmp_path / "a.pt")

    missing = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    torch.save({"model": missing, "model_args": args}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"missing keys \[h.1.mlp.c_fc.bias\]"):
        convert.load_nanogpt(tmp_path / "b.pt")

    torch.save({"model": state, "model_args": dict(args, bias=False)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \[h.0.ln_1.bias"):
        convert.load_nanogpt(tmp_path / "c.pt")

    untied = dict(state, **{"lm_head.weight": state["lm_head.weight"] + 1})
    torch.save({"model": untied, "model_args": args}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="tied"):
        convert.load_nanogpt(tmp_path / "d.pt")

    torch.save({"state_dict": state}, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="not a nanoGPT checkpoint"):
        convert.load_nanogpt(tmp_path / "e.pt")

    with pytest.raises(FileNotFoundError):
        convert.load_nanogpt(tmp_path / "absent.pt")


def test_nanogpt_refuses_unsafe_pickle(tmp_path):
    model, args = nanogpt_model()
    torch.save({"model": model.state_dict(), "model_args": args, "config": argparse.Namespace(lr=1.0)},
               tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        convert.load_nanogpt(tmp_path / "ckpt.pt")


def test_check_params():
    cfg = GPTConfig(**SMALL)
    params = random_params(cfg)
    convert.check_params(params, cfg)
    with pytest.raises(ValueError, match=r"h_0/attn/c_attn/bias has shape \(96,\).*needs \(144,\)"):
        convert.check_params(params, dataclasses.replace(cfg, n_embd=48))
    with pytest.raises(ValueError, match=r"unexpected \[h_0/attn/c_attn/bias"):
        convert.check_params(params, dataclasses.replace(cfg, bias=False))
    with pytest.raises(ValueError, match=r"missing \[h_2/"):
        convert.check_params(params, dataclasses.replace(cfg, n_layer=3))


# ------------------------------------------------------------------------------------ HF


@pytest.mark.parametrize("activation,bias", [("gelu_tanh", True), ("gelu", False)])
def test_save_hf_loads_in_transformers(tmp_path, activation, bias):
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(**SMALL, bias=bias, activation=activation, layer_norm_eps=1e-4)
    params = random_params(cfg)
    convert.save_hf(params, cfg, tmp_path)
    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = tokens(2, 16, 64)
    assert rel_diff(jax_logits(params, cfg, idx), torch_logits(model.eval(), idx)) < TOL
    back, cfg_back = convert.load_hf(tmp_path)
    assert cfg_back == dataclasses.replace(cfg, bias=True)
    if bias:
        assert_trees_equal(back, params)
    else:  # written as zero biases: same function, more (zero) parameters
        assert float(np.abs(back["h_0"]["attn"]["c_attn"]["bias"]).max()) == 0
        assert rel_diff(jax_logits(back, cfg_back, idx), jax_logits(params, cfg, idx)) < 1e-6


def test_hf_pytorch_bin_without_prefix_with_mask_buffers(tmp_path):
    """Old-style HF files: pytorch_model.bin, GPT2Model keys (no `transformer.`), attn.bias buffers."""
    transformers = pytest.importorskip("transformers")
    hc = transformers.GPT2Config(n_positions=16, n_embd=32, n_layer=2, n_head=4, vocab_size=64,
                                 bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(hc).eval()
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hc.save_pretrained(tmp_path)
    params, cfg = convert.load_hf(tmp_path)
    assert cfg.activation == "gelu_tanh"
    idx = tokens(2, 16, 64)
    assert rel_diff(jax_logits(params, cfg, idx), torch_logits(model, idx)) < TOL


def test_hf_bfloat16_safetensors(tmp_path):
    """bf16 files (numpy has no bfloat16) still load without torch's help, rounded values exact."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    cfg = GPTConfig(**SMALL, activation="gelu_tanh")
    params = random_params(cfg)
    convert.save_hf(params, cfg, tmp_path)
    state = safetensors_torch.load_file(tmp_path / "model.safetensors")
    safetensors_torch.save_file({k: v.bfloat16() for k, v in state.items()}, tmp_path / "model.safetensors",
                                metadata={"format": "pt"})
    back, _ = convert.load_hf(tmp_path)
    want = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    assert_trees_equal(back, want)


def test_hf_errors(tmp_path):
    cfg = GPTConfig(**SMALL, activation="gelu_tanh")
    convert.save_hf(random_params(cfg), cfg, tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"n_embd": 32', '"n_embd": 64'))
    with pytest.raises(ValueError, match=r"wte.weight has shape \(64, 32\).*needs \(64, 64\)"):
        convert.load_hf(tmp_path)
    config.write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="only GPT-2"):
        convert.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor"):
        convert.load_hf(tmp_path / "nothing-here")


def test_hub_name_offline_fails_clearly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO),
               JAX_PLATFORMS="cpu")
    code = "from gptjax.convert import load_hf\nload_hf('gpt2')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError") and "pass a local directory" in last, proc.stderr[-2000:]
    # the CLIs say it in one line (it used to be a 100-line traceback)
    proc = subprocess.run([sys.executable, "-m", "gptjax.sample", "--init_from=gpt2"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    assert proc.stderr.startswith("error: could not download 'gpt2'") and proc.stderr.count("\n") == 1


def test_weights_load_dispatch(tmp_path):
    cfg = GPTConfig(**SMALL)
    params = random_params(cfg)
    convert.save_nanogpt(params, cfg, tmp_path / "nano" / "ckpt.pt")
    convert.save_hf(params, cfg, tmp_path / "hf")
    for source, kind in ((tmp_path / "nano", "nanogpt"), (tmp_path / "nano" / "ckpt.pt", "nanogpt"),
                         (str(tmp_path / "hf"), "hf")):
        got = weights.load(source, dtype="bfloat16", need_vocabulary=False)
        assert_trees_equal(got.params, params)
        assert got.kind == kind and got.cfg.dtype == "bfloat16" and got.cfg.n_embd == 32 and got.meta is None
    # a 64-token model is no GPT-2 BPE model: sampling it needs its characters
    with pytest.raises(FileNotFoundError, match="64-token vocabulary, not GPT-2's"):
        weights.load(tmp_path / "hf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no gptjax run"):
        weights.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="gpt2-medium"):
        weights.load("gpt5")
    with pytest.raises(FileNotFoundError):
        weights.load(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------ crosscheck


def test_crosscheck_passes_on_matching_checkpoints(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model, args = nanogpt_model(bias=False)
    save_like_nanogpt(model, args, tmp_path / "ckpt.pt", compiled=True)
    assert crosscheck.main([str(tmp_path / "ckpt.pt"), "--batch", "2", "--seq", "12"]) == 0
    assert "OK" in capsys.readouterr().out

    cfg = GPTConfig(**SMALL, activation="gelu_tanh")
    convert.save_hf(random_params(cfg), cfg, tmp_path / "hf")
    assert crosscheck.main([str(tmp_path / "hf")]) == 0
    assert transformers.GPT2LMHeadModel.__name__ in capsys.readouterr().out


def test_crosscheck_names_first_divergent_block():
    model, args = nanogpt_model()
    cfg = GPTConfig(**args)
    params = convert.params_from_state_dict(model.state_dict(), cfg)
    idx = tokens(2, 16, 64)
    report = crosscheck.compare(model, params, cfg, idx)
    assert report.ok and report.first_divergence is None
    assert [name for name, _, _ in report.stages] == ["embed", "h_0", "h_1", "ln_f", "logits"]

    kernel = params["h_1"]["mlp"]["c_fc"]["kernel"]
    perturbed = jax.tree_util.tree_map(lambda x: x, params)
    perturbed["h_1"]["mlp"]["c_fc"]["kernel"] = kernel.at[3, 5].add(0.5)
    report = crosscheck.compare(model, perturbed, cfg, idx)
    assert not report.ok and report.first_divergence == "h_1"
    assert report.stages[1][2] < TOL  # h_0 still agrees


def test_crosscheck_cli_fails_and_errors(tmp_path, capsys):
    # nanoGPT runs LayerNorm with eps 1e-5 whatever gptjax's config says: a real mismatch.
    cfg = GPTConfig(**SMALL, layer_norm_eps=0.5)
    convert.save_nanogpt(random_params(cfg), cfg, tmp_path / "ckpt.pt", allow_numerics_change=True)
    assert crosscheck.main([str(tmp_path / "ckpt.pt")]) == 1
    assert "first stage over tolerance: h_0" in capsys.readouterr().out

    assert crosscheck.main([str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "absent" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "empty").mkdir()
    assert crosscheck.main([str(tmp_path / "empty")]) == 2
    assert "unknown format" in capsys.readouterr().err

    model, args = nanogpt_model()
    torch.save({"model": model.state_dict(), "model_args": dict(args, n_layer=3)}, tmp_path / "bad.pt")
    assert crosscheck.main([str(tmp_path / "bad.pt")]) == 2
    assert "missing keys [h.2." in capsys.readouterr().err
