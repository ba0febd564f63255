"""gptjax.checkpoint's orbax set-up: the train state's handler (one process writes each replicated
array whole) reads the checkpoints of orbax's standard handler, which earlier runs wrote, and its
own checkpoints read back with orbax's standard handler too."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from _trees import assert_trees_equal
from gptjax.checkpoint import Checkpointer, checkpoint_dir
from gptjax.optim import make_optimizer
from gptjax.config import TrainConfig
from gptjax import sharding
from gptjax.step import create_train_state

CFG = TrainConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=2, vocab_size=64)


def _state():
    mesh = sharding.make_mesh()
    optimizer = make_optimizer(CFG, mesh)
    state, _ = create_train_state(CFG.model_config(64), optimizer, mesh, seed=3)
    # moments that are not all zero, so a mix-up between leaves shows
    return state.replace(opt_state=jax.tree_util.tree_map(lambda x: x + 0.5 if x.ndim else x, state.opt_state))


def _abstract(state):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _meta(step):
    return {"iter_num": step, "best_val_loss": 1.0, "model": {"n_layer": CFG.n_layer}}


def _standard_manager(out_dir):
    return ocp.CheckpointManager(checkpoint_dir(out_dir), options=ocp.CheckpointManagerOptions(create=False),
                                 item_names=("state", "meta"))


def test_restores_a_checkpoint_of_orbaxs_standard_handler(tmp_path):
    state = _state()
    manager = _standard_manager(tmp_path)
    manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_meta(7))))
    manager.wait_until_finished()
    manager.close()
    restored, meta = Checkpointer(tmp_path).restore(_abstract(state))
    assert meta["iter_num"] == 7
    assert_trees_equal(restored, state)


def test_its_checkpoint_reads_back_with_orbaxs_standard_handler(tmp_path):
    state = _state()
    checkpointer = Checkpointer(tmp_path, writer=True)
    checkpointer.save(5, state, _meta(5))
    checkpointer.close()
    restored, meta = Checkpointer(tmp_path).restore(_abstract(state))
    assert_trees_equal(restored, state)
    manager = _standard_manager(tmp_path)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _abstract(state))
    standard = manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
    manager.close()
    assert_trees_equal(standard, state)


SAVE_ON_TWO_DEVICES = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, sys.argv[2])
    import jax
    from gptjax.checkpoint import Checkpointer
    from test_checkpoint import _meta, _state

    state = _state()
    assert jax.device_count() == 2
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    checkpointer = Checkpointer(sys.argv[1], writer=True)
    checkpointer.save(1, state, _meta(1))
    checkpointer.close()
    print(len(compiles))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="simulated CPU devices")
def test_saving_a_state_replicated_on_two_devices_compiles_nothing(tmp_path):
    # Orbax's replica-parallel saving would slice each replicated array between the two devices,
    # with eager slices compiled at the first save (one per array shape here).
    out = subprocess.run([sys.executable, "-c", SAVE_ON_TWO_DEVICES, str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0"
