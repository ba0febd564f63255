"""gptjax.kernels: what `choose` picks for each backend and mesh, and every kernel choice, asked
for by name on this CPU, computing the plain model's loss and gradients; the GPU/TPU defaults
(XLA attention, XLA products) included."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import cpu, kernels
from gptjax.kernels import Kernels
from gptjax.model import GPT, GPTConfig, init_params
from gptjax.sharding import make_mesh
from gptjax.step import loss_fn

# T 64: two query blocks for the blocked attention
CFG = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def fake_device(platform="gpu", version="cuda 12080", capability="9.0"):
    """A jax device as gptjax reads it: an H100 unless told otherwise."""
    return SimpleNamespace(platform=platform, client=SimpleNamespace(platform_version=version),
                           compute_capability=capability)


CPU = jax.devices("cpu")[0]


@pytest.mark.parametrize("device, dtype, head_size, expected", [
    (fake_device(), jnp.bfloat16, 64, "cudnn"),  # H100, GPT-2's heads
    (fake_device(capability="8.0"), jnp.float16, 128, "cudnn"),  # A100
    (fake_device(), jnp.float32, 64, "xla"),  # cuDNN's flash attention is bf16/fp16 only
    (fake_device(), jnp.bfloat16, 12, "xla"),  # head size not a multiple of 8
    (fake_device(), jnp.bfloat16, 256, "xla"),  # above what every cuDNN GPU takes
    (fake_device(capability="7.0"), jnp.float16, 64, "xla"),  # V100: before Ampere
    (fake_device(version="rocm 6.2"), jnp.bfloat16, 64, "xla"),  # an AMD GPU: no cuDNN
    (fake_device(platform="tpu", version="PJRT C API"), jnp.bfloat16, 64, "xla"),
])
def test_fused_attention_impl_picks_cudnn_only_where_cudnn_takes_it(device, dtype, head_size, expected):
    assert kernels.fused_attention_impl(dtype, head_size, device) == expected


def test_choose_on_one_cpu_device():
    k = kernels.choose([CPU], dtype="float32", head_size=16)
    assert k == Kernels(attention="blocked", matmul="cpu", row_blocks=True, grad_reduce="xla")


def test_forward_only_programs_take_attention_by_head_groups_on_the_cpu():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    assert kernels.for_inference(cfg, CPU) == Kernels(attention="head_groups", matmul="cpu", row_blocks=True)
    assert kernels.for_inference(cfg, CPU, attention="blocked").attention == "blocked"  # named: as asked


def test_choose_on_a_gpu_and_a_tpu_takes_xla_everywhere_but_cudnn_attention():
    mesh = make_mesh()  # this process's one CPU device stands in for the layout
    gpu = kernels.choose([fake_device()], dtype="bfloat16", head_size=64, mesh=mesh)
    assert gpu == Kernels(attention="cudnn", cudnn_fallback=True, matmul="xla", row_blocks=False, grad_reduce="xla")
    tpu = kernels.choose([fake_device("tpu", "PJRT C API")], dtype="bfloat16", head_size=64)
    assert tpu == Kernels()
    named = kernels.choose([fake_device()], dtype="bfloat16", head_size=64, attention="cudnn")
    assert named.attention == "cudnn" and not named.cudnn_fallback  # asked for by name: no fallback


class _Mesh(SimpleNamespace):
    """The parts of a Mesh `choose` reads, for device counts this process does not have."""

    @property
    def size(self):
        return self.shape["data"] * self.shape["fsdp"]


def test_choose_reduces_flat_only_for_pure_data_parallelism_on_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "NamedSharding", lambda mesh, spec: ("pinned", spec))
    dp, fsdp = _Mesh(shape={"data": 2, "fsdp": 1}), _Mesh(shape={"data": 1, "fsdp": 2})
    flat = kernels.choose([CPU], dtype="float32", head_size=16, mesh=dp)
    assert (flat.grad_reduce, flat.row_blocks, flat.batch_sharding) == ("flat", True, None)
    # dropout stays with the global program; so does FSDP, and an accelerator's data parallelism
    for k in (kernels.choose([CPU], dtype="float32", head_size=16, mesh=dp, dropout=0.1),
              kernels.choose([CPU], dtype="float32", head_size=16, mesh=fsdp),
              kernels.choose([fake_device()], dtype="bfloat16", head_size=64, mesh=dp)):
        assert k.grad_reduce == "xla" and not k.row_blocks and k.batch_sharding is not None
    assert kernels.choose([CPU], dtype="float32", head_size=16, mesh=dp, grad_reduce="xla").grad_reduce == "xla"
    with pytest.raises(ValueError, match="grad_reduce='flat' needs pure data parallelism"):
        kernels.choose([CPU], dtype="float32", head_size=16, mesh=fsdp, grad_reduce="flat")
    with pytest.raises(ValueError, match="attention='fast' is not one of"):
        kernels.choose([CPU], dtype="float32", head_size=16, attention="fast")


def test_dot_library_is_chosen_on_the_cpu_only():
    assert kernels.choose([CPU], dtype="float32", head_size=16).dot_library == "xla"  # "auto" without a record
    onednn = kernels.choose([CPU], dtype="float32", head_size=16, dot_library="onednn")
    assert (onednn.dot_library, onednn.row_blocks) == ("onednn", False)  # row blocks are YNNPACK's
    assert onednn.compiler_options["xla_cpu_use_onednn"] and Kernels().compiler_options is None
    eigen = kernels.choose([CPU], dtype="float32", head_size=16, dot_library="eigen")
    assert (eigen.dot_library, eigen.row_blocks) == ("eigen", False) and "xla_cpu_use_onednn" not in eigen.compiler_options
    for library in ("onednn", "eigen"):
        with pytest.raises(ValueError, match=f"dot_library='{library}' is for XLA's CPU backend, not gpu"):
            kernels.choose([fake_device()], dtype="bfloat16", head_size=64, dot_library=library)
    with pytest.raises(ValueError, match="dot_library='mkl' is not one of"):
        kernels.choose([CPU], dtype="float32", head_size=16, dot_library="mkl")


def dots_in_ynn_fusions(hlo: str) -> int:
    """How many dots of a compiled program's text sit inside YNNPACK's fusions."""
    bodies = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.M | re.S))
    called = re.findall(r"= [^\n]* fusion\([^\n]*calls=%?([\w.\-]+)[^\n]*\"kind\":\"__ynn_fusion\"", hlo)
    return sum(bodies.get(name, "").count(" dot(") for name in called)


def test_the_train_step_compiles_for_the_chosen_dot_library():
    """jit_steps hands the kernels' compiler options to XLA for the train step: oneDNN or Eigen
    takes its products, YNNPACK keeps its reductions (without it XLA splits them into
    reduce-windows); the eval step keeps XLA's own library."""
    from gptjax.optim import lr_schedule, make_optimizer
    from gptjax.config import TrainConfig
    from gptjax.step import create_train_state, jit_steps

    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=64)
    mesh = make_mesh()
    optimizer = make_optimizer(cfg, mesh)
    state, shardings = create_train_state(cfg.model_config(64), optimizer, mesh, 0)
    xy = (jnp.zeros((1, 2, 16), jnp.int32),) * 2
    reduce_windows = {}
    for library, fusion in (("xla", "ynn_fusion"), ("onednn", "onednn_fusion"), ("eigen", "ynn_fusion")):
        k = kernels.choose([CPU], dtype="float32", head_size=16, dot_library=library)
        train_step, eval_step = jit_steps(cfg.model_config(64), k, optimizer, lr_schedule(cfg), shardings, mesh)
        train_text = train_step.lower(state, xy).compile().as_text()
        assert fusion in train_text and ("onednn_fusion" in train_text) == (library == "onednn"), library
        assert (dots_in_ynn_fusions(train_text) > 0) == (library == "xla"), library
        reduce_windows[library] = train_text.count(" reduce-window(")
        eval_text = eval_step.lower(state.params, xy).compile().as_text()
        assert "ynn_fusion" in eval_text and "onednn_fusion" not in eval_text
    assert max(reduce_windows["onednn"], reduce_windows["eigen"]) <= reduce_windows["xla"], reduce_windows


def test_a_run_takes_the_dot_library_recorded_for_this_host(tmp_path, monkeypatch):
    from gptjax import autotune
    from gptjax.config import TrainConfig

    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
    cfg = TrainConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=64)
    mesh = make_mesh()
    key = autotune.run_key(cfg, cfg.model_config(64), mesh)
    agree = {"xla": 0.0, "onednn": 1e-7}  # the first steps' disagreement with XLA's default
    assert autotune.for_run(cfg, cfg.model_config(64), mesh).dot_library == "xla"  # nothing measured
    # each library's ms per step in each alternating round
    verdict = autotune.record_verdict(key, {"xla": [10, 10, 10], "onednn": [9.7, 9.7, 9.6]}, agree)
    assert verdict["dot_library"] == "xla"  # within the margin
    assert autotune.for_run(cfg, cfg.model_config(64), mesh).dot_library == "xla"
    # 20% faster in the median but slower in one round: the host's drift, not the library
    verdict = autotune.record_verdict(key, {"xla": [10, 12, 10], "onednn": [8, 8, 10.5]}, agree)
    assert (verdict["dot_library"], verdict["rounds_faster_than_xla"], verdict["rounds"]) == ("xla", {"onednn": 2}, 3)
    assert verdict["ms_per_step"] == {"xla": 10.0, "onednn": 8.0}
    assert autotune.for_run(cfg, cfg.model_config(64), mesh).dot_library == "xla"
    assert autotune.record_verdict(key, {"xla": [10, 12, 10], "onednn": [8, 8, 9]}, agree)["dot_library"] == "onednn"
    chosen = autotune.for_run(cfg, cfg.model_config(64), mesh)
    assert (chosen.dot_library, chosen.row_blocks) == ("onednn", False)
    # another width is another verdict; a named library is taken as it is
    wider = dataclasses.replace(cfg, n_embd=64)
    assert autotune.for_run(wider, wider.model_config(64), mesh).dot_library == "xla"
    other_attention = dataclasses.replace(cfg, attention="xla")  # another program: not vetted by that verdict
    assert autotune.for_run(other_attention, other_attention.model_config(64), mesh).dot_library == "xla"
    named = dataclasses.replace(cfg, dot_library="xla")
    assert autotune.for_run(named, named.model_config(64), mesh).dot_library == "xla"
    # the fastest library computing another step is refused; the fastest of the rest is taken
    verdict = autotune.record_verdict(key, {"xla": [10], "onednn": [7], "eigen": [8]},
                                      {"xla": 0.0, "onednn": 0.03, "eigen": 3e-7})
    assert (verdict["dot_library"], verdict["refused"]) == ("eigen", ["onednn"])
    assert autotune.for_run(cfg, cfg.model_config(64), mesh).dot_library == "eigen"
    verdict = autotune.record_verdict(key, {"xla": [10], "onednn": [7]}, {"xla": 0.0, "onednn": float("inf")})
    assert (verdict["dot_library"], verdict["refused"]) == ("xla", ["onednn"])
    (tmp_path / "autotune.json").write_text("{not json")
    with pytest.warns(UserWarning, match="delete it and measure again"):
        assert autotune.for_run(cfg, cfg.model_config(64), mesh).dot_library == "xla"


def plain_batch():
    x = jax.random.randint(jax.random.PRNGKey(1), (2, CFG.block_size), 0, CFG.vocab_size)
    return x, jnp.roll(x, -1, axis=1)


def plain_reference(batch):
    """Loss and gradients of the plain model: the masked softmax written out, XLA's products."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    with jax.default_matmul_precision("highest"):
        return params, jax.value_and_grad(loss_fn)(params, GPT(CFG, Kernels(attention="plain")), *batch)


@pytest.fixture(scope="module")
def batch():
    return plain_batch()


@pytest.fixture(scope="module")
def reference(batch):
    return plain_reference(batch)


def check_matches_plain_model(chosen, batch, reference):
    """float32: loss within 1e-6 relative, gradients within 1e-4 (reassociation only)."""
    params, (ref_loss, ref_grads) = reference
    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1,
                              compiler_options=chosen.compiler_options)(params, GPT(CFG, chosen), *batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads)) > 1e-2
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chosen", [
    Kernels(attention="xla"),  # the GPU/TPU default (and cuDNN's fallback)
    Kernels(attention="blocked"),
    Kernels(attention="xla", matmul="cpu"),
    Kernels(attention="blocked", matmul="cpu", row_blocks=True),  # the CPU default
    Kernels(attention="blocked", matmul="cpu", dot_library="eigen"),  # weight gradients without the copy
], ids=lambda k: f"{k.attention}-{k.matmul}{'-rows' if k.row_blocks else ''}-{k.dot_library}")
def test_every_kernel_choice_matches_the_plain_model(chosen, batch, reference):
    check_matches_plain_model(chosen, batch, reference)


def test_attention_by_head_groups_matches_the_plain_model(monkeypatch, batch, reference):
    monkeypatch.setattr(cpu, "MIN_HEAD_GROUP_LENGTH", CFG.block_size)  # this tiny model's sequences loop
    monkeypatch.setattr(cpu, "l2_cache_bytes", lambda: 0)
    check_matches_plain_model(Kernels(attention="head_groups", matmul="cpu"), batch, reference)


def test_first_step_disagreement_reads_relative_to_each_array():
    from gptjax.autotune import first_step_disagreement

    reference = (jnp.float32(2.5), {"mu": jnp.array([1e-3, -2e-3, 4e-3]), "nu": jnp.array([1e-6, 4e-6, 0.0]),
                                    "count": jnp.int32(1), "empty": jnp.zeros((0,))})
    assert first_step_disagreement(reference, reference) == 0.0
    off = jax.tree_util.tree_map(lambda x: x, reference)
    off[1]["mu"] = off[1]["mu"].at[0].add(4e-5)  # 1% of mu's largest value, however small mu is
    assert first_step_disagreement(reference, off) == pytest.approx(0.01, rel=1e-3)
    off[1]["nu"] = off[1]["nu"].at[2].set(jnp.nan)
    assert first_step_disagreement(reference, off) == float("inf")


def onednn_check() -> dict:
    """What the tune's check says of oneDNN's train step on this host (a tiny model's first step,
    against XLA's default's), and whether oneDNN's loss and gradients match the plain model's."""
    from gptjax import autotune, bench
    from gptjax.config import TrainConfig

    cfg = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=2, vocab_size=CFG.vocab_size,
                      dataset="none")
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 2, 65)).astype(np.int32)
    first = {library: bench.gptjax_runner(dataclasses.replace(cfg, dot_library=library), tokens, CFG.vocab_size,
                                          keep_first_step=True).first_step for library in ("xla", "onednn")}
    b = plain_batch()
    try:
        check_matches_plain_model(Kernels(attention="blocked", matmul="cpu", dot_library="onednn"), b, plain_reference(b))
        mismatch = None
    except AssertionError as err:
        mismatch = str(err)[:800]
    return {"disagreement": autotune.first_step_disagreement(first["xla"], first["onednn"]), "mismatch": mismatch}


def test_onednn_dots_match_the_plain_model_where_the_tune_takes_them():
    """oneDNN's products computing the plain model's loss and gradients, on the hosts where the
    tune's check would let a run use them; and refused where they do not (on one AMD EPYC host
    they are 1% off). In a child process: XLA's oneDNN path is experimental and ends the process
    when it cannot build a program, which must fail this test, not the session."""
    from gptjax.autotune import AGREEMENT

    script = "import json, test_kernels as t; print('check', json.dumps(t.onednn_check()))"
    child = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu", "GPTJAX_CPU_DEVICES": "1"}, timeout=300)
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    check = json.loads(child.stdout.split("check ", 1)[1])
    assert (check["disagreement"] <= AGREEMENT) == (check["mismatch"] is None), check


def test_blocked_attention_really_runs_in_blocks(batch):
    params = init_params(CFG, jax.random.PRNGKey(0))
    count = lambda k: str(jax.make_jaxpr(lambda p: GPT(CFG, k).apply({"params": p}, batch[0]))(params)).count(  # noqa: E731
        "concatenate")
    assert count(Kernels(attention="blocked")) >= CFG.n_layer > count(Kernels(attention="xla"))


def test_the_model_asks_jax_for_the_named_attention(monkeypatch, batch):
    """jax.nn.dot_product_attention's own default is XLA's attention everywhere: the model passes
    the kernel the record names."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    asked = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, implementation="xla", **kwargs)  # this host has no cuDNN

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    for name in ("cudnn", "xla"):
        GPT(CFG, Kernels(attention=name)).apply({"params": params}, batch[0])
    assert asked == ["cudnn"] * CFG.n_layer + ["xla"] * CFG.n_layer


def test_cudnn_falls_back_to_xla_when_it_refuses_and_was_chosen_automatically(monkeypatch, batch):
    """cuDNN chosen by 'auto' but refused by jax's checks (as with too old a cuDNN): the layer
    warns and computes XLA's attention. Asked for by name, the error stands."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    want = GPT(cfg, Kernels(attention="xla")).apply({"params": params}, batch[0])
    real = jax.nn.dot_product_attention

    def cudnn_refuses(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            raise RuntimeError("JAX requires cuDNN >= 8.9.4 to use flash cross attention.")
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_refuses)
    with pytest.warns(UserWarning, match=r"cuDNN attention is not available here \(JAX requires cuDNN"):
        got = GPT(cfg, Kernels(attention="cudnn", cudnn_fallback=True)).apply({"params": params}, batch[0])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(RuntimeError, match="requires cuDNN"):
        GPT(cfg, Kernels(attention="cudnn")).apply({"params": params}, batch[0])


def test_model_code_detects_no_backend():
    """What a config builds depends only on the record it is given (the issue this module solves)."""
    from pathlib import Path

    import gptjax

    root = Path(gptjax.__file__).parent
    for name in ("model.py", "attention.py", "generate.py", "step.py"):
        text = (root / name).read_text()
        for probe in ("default_backend(", "jax.devices(", "get_abstract_mesh(", "device_count("):
            assert probe not in text, f"{name} calls {probe}"
