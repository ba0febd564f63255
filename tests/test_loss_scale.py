"""float16 training with dynamic loss scaling (torch's GradScaler, which nanoGPT trains float16
with): the scaled backward gives float32's gradients, an overflow skips the update and halves the
scale without stopping the run, good steps grow it, and the scale is checkpointed and resumed."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_train
from gptjax import step as step_lib
from gptjax.train import setup, train
from test_train import step_records, tiny

# test_train's module fixtures, shared: the char dataset and the compilation cache
data_dir = test_train.data_dir
compilation_cache = test_train.compilation_cache


def fp16(data_dir, out_dir, **overrides):
    return tiny(data_dir, out_dir, dtype="float16", batch_size=8, gradient_accumulation_steps=1, **overrides)


def grads_of(run, batch, scale):
    """The gradient the train step would apply (unscaled), through the step's own helper."""
    params = run.state.params
    model = step_lib.GPT(run.model_cfg, run.kernels)
    loss, grads = jax.jit(lambda p, s: step_lib._accumulated_grads(p, *batch, None, model, s))(params, scale)
    return float(loss), grads


def test_scaled_float16_gradients_match_float32_where_unscaled_ones_underflow(data_dir, tmp_path):
    """Scaled by 2^16 (GradScaler's start), float16's gradients match float32's to float16 precision
    (rtol 2e-2 on the global norm, 5e-2 elementwise on the large ones); unscaled, many of the small
    ones flush to zero in float16, which is what the scaling is for."""
    run16 = setup(fp16(data_dir, tmp_path / "16"))
    run32 = setup(dataclasses.replace(run16.cfg, dtype="float32", out_dir=str(tmp_path / "32")))
    batch = run16.to_device(run16.batch("train", 0))
    loss32, g32 = grads_of(run32, batch, None)
    loss16, g16 = grads_of(run16, batch, jnp.float32(step_lib.LOSS_SCALE_INIT))
    _, g16_unscaled = grads_of(run16, batch, None)
    for run in (run16, run32):
        run.close()
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    leaves32, leaves16 = jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16)
    norm = lambda leaves: float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves)))
    assert norm(leaves16) == pytest.approx(norm(leaves32), rel=2e-2)
    for a, b in zip(leaves16, leaves32):
        a, b = np.asarray(a), np.asarray(b)
        large = np.abs(b) > 1e-2 * np.abs(b).max()
        np.testing.assert_allclose(a[large], b[large], rtol=5e-2, atol=1e-3 * np.abs(b).max())
    small32 = np.concatenate([np.abs(np.asarray(x)).ravel() for x in leaves32])
    small16 = np.concatenate([np.abs(np.asarray(x)).ravel() for x in jax.tree_util.tree_leaves(g16_unscaled)])
    lost = (small16 == 0) & (small32 > 0)
    assert lost.sum() > 10 * ((np.concatenate([np.abs(np.asarray(x)).ravel() for x in leaves16]) == 0)
                              & (small32 > 0)).sum(), "the unscaled float16 backward should lose gradients"


def test_overflow_skips_the_update_halves_the_scale_and_the_run_goes_on(data_dir, tmp_path):
    run = setup(fp16(data_dir, tmp_path))
    state = run.state.replace(loss_scale=step_lib.LossScale(scale=jnp.float32(2.0**100),
                                                            good_steps=jnp.int32(5)))
    params0 = jax.device_get(state.params)
    batch = run.to_device(run.batch("train", 0))
    state, metrics = run.train_step(state, batch)
    assert not bool(metrics["nonfinite"]) and np.isfinite(float(metrics["loss"]))
    assert not np.isfinite(float(metrics["grad_norm"])) and int(metrics["skipped"]) == 1
    assert float(state.loss_scale.scale) == 2.0**99 and int(state.loss_scale.good_steps) == 0
    for a, b in zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(jax.device_get(state.params))):
        np.testing.assert_array_equal(a, b)
    for _ in range(200):  # halving until the gradients fit, then updates apply again
        state, metrics = run.train_step(state, batch)
        if np.isfinite(float(metrics["grad_norm"])):
            break
    run.close()
    assert np.isfinite(float(metrics["grad_norm"])) and float(state.loss_scale.scale) < 2.0**30
    assert int(state.step) - int(state.skipped) == 1  # exactly one update applied
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(jax.device_get(state.params))))


def test_good_steps_grow_the_scale(monkeypatch):
    monkeypatch.setattr(step_lib, "LOSS_SCALE_GROWTH_INTERVAL", 3)
    s = step_lib.LossScale(scale=jnp.float32(8.0), good_steps=jnp.int32(0))
    seen = []
    for finite in (True, True, True, True, False, True):
        s = s.update(jnp.bool_(finite))
        seen.append((float(s.scale), int(s.good_steps)))
    assert seen == [(8.0, 1), (8.0, 2), (16.0, 0), (16.0, 1), (8.0, 0), (8.0, 1)]


def test_float16_run_trains_checkpoints_the_scale_and_resumes_exactly(data_dir, tmp_path):
    full = fp16(data_dir, tmp_path / "full", max_iters=12, eval_interval=6)
    train(full)
    losses = [r["loss"] for r in step_records(full.out_dir)]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    scales = [r["loss_scale"] for r in step_records(full.out_dir)]
    # from GradScaler's 2^16, only halvings (an overflow) in 12 steps: growth waits 2000 good ones
    assert scales[0] == step_lib.LOSS_SCALE_INIT and scales == sorted(scales, reverse=True)
    assert all(np.log2(step_lib.LOSS_SCALE_INIT / s).is_integer() for s in scales)

    part = dataclasses.replace(full, out_dir=str(tmp_path / "part"), max_iters=6)
    train(part)
    train(dataclasses.replace(part, max_iters=12, init_from="resume"))
    resumed = setup(dataclasses.replace(part, max_iters=12, init_from="resume"))
    uninterrupted = setup(dataclasses.replace(full, init_from="resume"))
    for run in (resumed, uninterrupted):
        run.close()
    assert resumed.state.loss_scale is not None
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(resumed.state)),
                    jax.tree_util.tree_leaves(jax.device_get(uninterrupted.state))):
        np.testing.assert_array_equal(a, b)


STEPS_SCRIPT = """
import json, sys
from gptjax.config import TrainConfig
from gptjax.train import setup
run = setup(TrainConfig(**json.loads(sys.argv[1])))
out = []
for i in range(3):
    run.state, m = run.train_step(run.state, run.to_device(run.batch("train", i)))
    out.append({k: float(v) for k, v in m.items()})
run.close()
print(json.dumps({"devices": run.mesh.devices.size, "metrics": out}))
"""


@pytest.mark.slow
def test_float16_data_parallel_over_two_devices_matches_one(data_dir, tmp_path):
    """The flat all-reduce path (2 CPU devices, no dropout) takes the loss scale as one device does
    (both run the scaled backward through `_accumulated_grads`, tested above): the same scale, and
    losses and unscaled gradient norms within float16 reduction-order noise (rtol 1e-2, 2e-2)."""
    runs = {}
    for devices in (1, 2):
        cfg = fp16(data_dir, tmp_path / str(devices), dp=devices)
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        child = subprocess.run([sys.executable, "-c", STEPS_SCRIPT, json.dumps(dataclasses.asdict(cfg))],
                               env=env, capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stderr[-3000:]
        runs[devices] = json.loads(child.stdout.strip().splitlines()[-1])
    assert runs[2]["devices"] == 2 and runs[1]["devices"] == 1
    for one, two in zip(runs[1]["metrics"], runs[2]["metrics"]):
        assert two["loss_scale"] == one["loss_scale"] == step_lib.LOSS_SCALE_INIT
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-2)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=2e-2)  # unscaled on both paths
        assert two["skipped"] == one["skipped"] == 0


def test_other_dtypes_keep_the_checkpoint_layout(data_dir, tmp_path):
    run = setup(tiny(data_dir, tmp_path, dtype="bfloat16"))
    run.close()
    assert run.state.loss_scale is None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.state)[0]]
    assert paths and not any("loss_scale" in p for p in paths)  # no leaves: older checkpoints still restore
