"""gptjax.sharding and sharded training: the mesh, which arrays are split, clear errors, host data
shares, and the real train path on 8 simulated CPU devices giving one device's losses.

The multi-device runs happen in subprocesses (tests/_sharding_worker.py) because XLA fixes the
CPU device count when jax is first imported; this pytest process keeps its single device.
Tolerance: float32 sums reduced in a different order across devices; five AdamW steps agree to
rtol 1e-5 in the loss (measured: ~3e-7), gradients to 1e-5 of each tensor's largest entry
(measured: ~5e-7).
"""

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import _sharding_worker as worker
from gptjax import data, sharding
from gptjax.checkpoint import load_inference
from gptjax.config import TrainConfig
from gptjax.kernels import Kernels
from gptjax.optim import make_optimizer
from gptjax.step import _init_state
from gptjax.train import Run

pytestmark = pytest.mark.skipif(not worker.CORPUS.is_file(), reason=f"{worker.CORPUS} absent")
LOSS_RTOL = 1e-5
TIMEOUT_S = 400


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return worker.prepare_data(tmp_path_factory.mktemp("shakespeare_char"))


def test_make_mesh_errors_name_the_sizes():
    devices = [object()] * 8  # the size checks come before any device is used
    cases = [
        (dict(dp=3, fsdp=-1), "dp=3 does not divide the 8 devices; use a divisor of 8"),
        (dict(dp=-1, fsdp=3), "fsdp=3 does not divide the 8 devices; use a divisor of 8"),
        (dict(dp=-1, fsdp=-1), "only one of dp and fsdp may be -1"),
        (dict(dp=2, fsdp=2), "dp=2 x fsdp=2 = 4 does not match the 8 devices; use -1 on one axis"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sharding.make_mesh(devices=devices, **kwargs)


def test_distributed_env_needs_all_three_variables(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    sharding.maybe_initialize_distributed()  # a plain single process: nothing to join
    assert not jax.distributed.is_initialized()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES=None is not an integer: set JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed()
    assert not jax.distributed.is_initialized()


def test_make_mesh_fills_the_minus_one_axis():
    mesh = sharding.make_mesh(1, -1, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}


@pytest.mark.parametrize("shape, fsdp, spec", [
    ((64, 256), 4, P(None, "fsdp")),  # the largest dimension
    ((256, 64), 8, P("fsdp", None)),
    ((64, 64), 8, P("fsdp", None)),  # a tie takes the first
    ((65, 64), 8, P(None, "fsdp")),  # the largest does not divide: the next one
    ((65, 63), 8, P()),  # nothing divides: replicated
    ((50304, 768), 8, P("fsdp", None)),
    ((4096,), 8, P("fsdp")),  # exactly MIN_SHARD_SIZE
    ((2048,), 8, P()),  # below MIN_SHARD_SIZE: not worth a collective
    ((64, 256), 1, P()),  # no fsdp axis
    ((), 8, P()),
])
def test_param_spec(shape, fsdp, spec):
    assert sharding._param_spec(shape, fsdp) == spec


def test_state_shardings_split_big_params_and_their_adam_moments():
    cfg = dataclasses.replace(worker.tiny_config("unused", "unused"), bias=True)  # biases stay whole
    model_cfg = cfg.model_config()
    optimizer = make_optimizer(cfg)
    abstract = jax.eval_shape(lambda: _init_state(model_cfg, optimizer, 0))
    specs = sharding.state_shardings(abstract, AbstractMesh((2, 4), sharding.DATA_AXES))
    params = jax.tree_util.tree_map(lambda s: s.spec, specs.params)
    block = params["h_0"]
    assert block["attn"]["c_attn"]["kernel"] == P(None, "fsdp")  # (64, 192)
    assert block["attn"]["c_proj"]["kernel"] == P("fsdp", None)  # (64, 64)
    assert block["mlp"]["c_fc"]["kernel"] == P(None, "fsdp")  # (64, 256)
    assert block["mlp"]["c_proj"]["kernel"] == P("fsdp", None)  # (256, 64)
    assert params["wte"]["embedding"] == P(None, "fsdp")  # (65, 64): 65 does not divide by 4
    assert params["wpe"]["embedding"] == P()  # (16, 64): 1024 elements
    for small in (block["attn"]["c_attn"]["bias"], block["ln_1"]["scale"], params["ln_f"]["bias"]):
        assert small == P()
    # AdamW's moments are laid out as the parameters they track
    n_sharded_params = sum(s != P() for s in jax.tree_util.tree_leaves(params))
    opt_specs = [s.spec for s in jax.tree_util.tree_leaves(specs.opt_state)]
    assert n_sharded_params == 9 and sum(s != P() for s in opt_specs) == 2 * n_sharded_params
    assert specs.step.spec == P() and specs.rng.spec == P()


def test_kernels_pin_the_batch_dim_only_where_it_divides():
    mesh = sharding.make_mesh()
    pinned = Kernels(batch_sharding=jax.sharding.NamedSharding(mesh, P(sharding.DATA_AXES)))

    def constraints(kernels, rows):
        jaxpr = jax.make_jaxpr(lambda x: kernels.pin_batch(x) * 2)(jnp.ones((rows, 3)))
        return [e.params["sharding"].spec for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]

    assert constraints(pinned, 16) == [P(("data", "fsdp"))]
    assert constraints(Kernels(), 16) == []  # no batch sharding: sampling and one-device programs


def test_batch_that_does_not_divide_is_a_clear_error():
    mesh = AbstractMesh((2, 4), sharding.DATA_AXES)
    sharding.check_batch_divisible(16, mesh)
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide over the 8 data-parallel devices "
                                         r"\(data=2 x fsdp=4\); use a multiple of 8"):
        sharding.check_batch_divisible(12, mesh)


def test_train_cli_rejects_batch_not_dividing_the_devices(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "gptjax.train", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
           f"--out_dir={tmp_path}", "--batch_size=12", "--n_layer=1", "--n_embd=32", "--n_head=2",
           "--block_size=16", "--dp=2", "--fsdp=4"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, cwd=worker.ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: batch_size=12 does not divide over the 8 data-parallel devices (data=2 x fsdp=4); "
        "use a multiple of 8")


def test_host_shares_concatenate_to_the_single_process_batch(data_dir, monkeypatch):
    cfg = TrainConfig(dataset="shakespeare_char", batch_size=8, block_size=16, gradient_accumulation_steps=2,
                      seed=7)
    run = types.SimpleNamespace(cfg=cfg, dataset=data.BinDataset(data_dir, 16))
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    whole = {k: Run.batch(run, "train", 3, k) for k in (None, 0, 1)}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for eval_index, (x, y) in whole.items():
        shares = []
        for host in (0, 1):
            monkeypatch.setattr(jax, "process_index", lambda host=host: host)
            shares.append(Run.batch(run, "train", 3, eval_index))
        assert shares[0][0].shape == (x.shape[0], 4, 16)
        np.testing.assert_array_equal(np.concatenate([s[0] for s in shares], axis=1), x)
        np.testing.assert_array_equal(np.concatenate([s[1] for s in shares], axis=1), y)
    assert whole[None][0].shape == (2, 8, 16) and not np.array_equal(whole[0][0], whole[1][0])


def _run_worker(tmp_path, data_dir, devices_runs: dict[int, tuple[str, str]], overrides=()) -> dict[int, dict]:
    """Runs {devices: (runs, extras)} in parallel worker processes, with config `overrides`
    (--key=value); their results.json by device count."""
    procs = []
    for devices, (runs, extras) in devices_runs.items():
        argv = [str(Path(worker.__file__)), "steps", "--devices", str(devices), "--data", str(data_dir),
                "--out", str(tmp_path / f"d{devices}"), "--runs", runs, "--extras", extras, *overrides]
        log = tmp_path / f"d{devices}.log"
        procs.append((worker.launch(argv, log), log))
    worker.wait_all(procs, TIMEOUT_S)
    return {d: json.loads((tmp_path / f"d{d}" / "results.json").read_text()) for d in devices_runs}


def _load(path: Path) -> dict:
    with np.load(path) as f:
        return dict(f)


def _check_against_one_device(out: Path, name: str, got: dict, ref_out: Path, ref_name: str, ref: dict,
                              block_size: int = 16):
    dp, fsdp, accum = (int(n) for n in name.split("x"))
    assert got["mesh"] == {"data": dp, "fsdp": fsdp}
    assert max(ref["losses"]) - min(ref["losses"]) > 0.1  # the steps really train
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=LOSS_RTOL)

    lay = got["layouts"]
    assert lay["batch_x"] == {"spec": [None, ["data", "fsdp"], None], "shard_shapes": [[accum, 2, block_size]],
                              "n_devices": 8}
    sharded = fsdp > 1
    expect = {"c_fc_kernel": (64, 256, 1), "c_attn_kernel": (64, 192, 1), "wte": (65, 64, 1)}
    for key, (rows, cols, axis) in expect.items():
        spec = [None, "fsdp"] if sharded else []
        shard = [rows, cols // fsdp] if sharded else [rows, cols]
        assert lay[key] == {"spec": spec, "shard_shapes": [shard], "n_devices": 8}, key
    assert lay["ln_1_scale"]["spec"] == [] and lay["ln_1_scale"]["shard_shapes"] == [[64]]
    assert len(lay["c_fc_opt_moments"]) >= 2 and all(m == lay["c_fc_kernel"] for m in lay["c_fc_opt_moments"])

    if (out / name / "grads.npz").exists():
        grads, ref_grads = _load(out / name / "grads.npz"), _load(ref_out / ref_name / "grads.npz")
        assert grads.keys() == ref_grads.keys()
        for key, g in grads.items():
            scale = np.abs(ref_grads[key]).max()
            np.testing.assert_allclose(g, ref_grads[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)
        # AdamW divides each gradient entry by its own size, so rounding noise in near-zero entries
        # (the key biases' gradient is exactly zero: softmax ignores a shift) moves parameters by a
        # fraction of lr: after 5 steps of lr 1e-3, 5e-5 is 1% of the most any entry can move
        params, ref_params = _load(out / name / "params.npz"), _load(ref_out / ref_name / "params.npz")
        for key, p in params.items():
            np.testing.assert_allclose(p, ref_params[key], rtol=1e-5, atol=5e-5, err_msg=key)
        # evaluation and greedy sampling on the sharded parameters, and a sharded checkpoint
        # restored whole on this process's single device
        for split in ("train", "val"):
            np.testing.assert_allclose(got["eval"][split], ref["eval"][split], rtol=LOSS_RTOL)
        assert got["greedy"]["sharded"] == got["greedy"]["local"]
        assert got["logits_max_abs_diff"] < 1e-5
        restored, model_cfg, _ = load_inference(out / name)
        assert model_cfg.vocab_size == 65
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}
        assert flat.keys() == params.keys()
        for key, p in params.items():
            np.testing.assert_array_equal(flat[key], p, err_msg=key)


def test_sharded_training_with_accumulation_matches_one_device(data_dir, tmp_path):
    """dp=2 x fsdp=4 with two accumulated micro-batches, the hardest layout, and pure data
    parallelism (8x1), whose gradients meet in one flat all-reduce."""
    results = _run_worker(tmp_path, data_dir, {1: ("1x1x2", "1x1x2"), 8: ("2x4x2,8x1x2", "2x4x2")})
    for name in ("2x4x2", "8x1x2"):
        _check_against_one_device(tmp_path / "d8", name, results[8][name],
                                  tmp_path / "d1", "1x1x2", results[1]["1x1x2"])
    # loss and every gradient as one float32 vector, instead of one operand per parameter
    n_values = 1 + sum(int(np.prod(v.shape)) for v in _load(tmp_path / "d8" / "2x4x2" / "params.npz").values())
    assert results[8]["8x1x2"]["all_reduce_shapes"] == [f"f32[{n_values}]{{0}}"]
    assert results[1]["1x1x2"]["all_reduce_shapes"] == []


@pytest.mark.slow
def test_xla_data_parallel_reduction_matches_one_device(data_dir, tmp_path):
    """The GPU/TPU default for pure data parallelism: XLA's own gradient reductions (one all-reduce
    operand per parameter, which the partitioner may overlap with the backward pass) over 8 devices
    give one device's losses, gradients, parameters, evaluation and samples."""
    results = _run_worker(tmp_path, data_dir, {1: ("1x1x2", "1x1x2"), 8: ("8x1x2", "8x1x2")},
                          overrides=["--grad_reduce=xla"])
    _check_against_one_device(tmp_path / "d8", "8x1x2", results[8]["8x1x2"], tmp_path / "d1", "1x1x2",
                              results[1]["1x1x2"])
    n_values = 1 + sum(int(np.prod(v.shape)) for v in _load(tmp_path / "d8" / "8x1x2" / "params.npz").values())
    assert f"f32[{n_values}]{{0}}" not in results[8]["8x1x2"]["all_reduce_shapes"]  # not the flat buffer


@pytest.mark.slow
def test_query_block_attention_on_a_partitioned_mesh_matches_one_device(data_dir, tmp_path):
    """At block_size 64 the CPU attention runs in 2 query blocks (gptjax.attention): on global
    arrays split over a 2x4 mesh, where the partitioner sees the blocks' slices and concatenation,
    it gives one device's losses, gradients, parameters, evaluation and samples."""
    results = _run_worker(tmp_path, data_dir, {1: ("1x1x1", "1x1x1"), 8: ("2x4x1", "2x4x1")},
                          overrides=["--block_size=64"])
    _check_against_one_device(tmp_path / "d8", "2x4x1", results[8]["2x4x1"],
                              tmp_path / "d1", "1x1x1", results[1]["1x1x1"], block_size=64)


@pytest.mark.slow
def test_every_mesh_matches_one_device(data_dir, tmp_path):
    """Pure data parallel (8x1), mixed (2x4) and pure FSDP (1x8) against one device."""
    runs = "8x1x1,2x4x1,1x8x1"
    results = _run_worker(tmp_path, data_dir, {1: ("1x1x1", "1x1x1"), 8: (runs, "1x8x1")})
    for name in runs.split(","):
        _check_against_one_device(tmp_path / "d8", name, results[8][name],
                                  tmp_path / "d1", "1x1x1", results[1]["1x1x1"])
