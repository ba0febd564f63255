"""Checkpoints with orbax: the sharded train state plus a small JSON of run metadata.

Layout: OUT_DIR/checkpoints/<step>/{state, meta}. Orbax writes each step into a temporary
directory and renames it only once complete, so a run killed mid-save leaves the previous
checkpoints intact and `latest_step` never names a half-written one. Every host takes part in a
save or restore and writes or reads its own shards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptjax.model import GPTConfig

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir).absolute() / CHECKPOINT_SUBDIR


class Checkpointer:
    """Saves and restores train states under OUT_DIR/checkpoints, keeping the newest `keep`."""

    def __init__(self, out_dir: str | os.PathLike, keep: int = 2, create: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.directory = checkpoint_dir(out_dir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Start saving (asynchronously); the next save or `close` waits for it to finish."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default: newest), laid out as `abstract_state`'s shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self.restore_meta(step)
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not match this model: {err}".splitlines()[0]
            ) from err
        return restored.state, meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_model_matches(saved: dict[str, Any], current: GPTConfig, source: str) -> None:
    """A checkpoint's model config must equal the run's in every field that shapes parameters."""
    shape_fields = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias")
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {getattr(current, k)!r}"
             for k in shape_fields if saved.get(k) != getattr(current, k)]
    if diffs:
        raise ValueError(f"checkpoint {source} was written for a different model ({'; '.join(diffs)}); "
                         "pass matching --key=value overrides or another out_dir")


def load_inference(out_dir: str | os.PathLike, step: int | None = None):
    """(params, GPTConfig, run_config dict) from a training run's newest checkpoint, for sampling
    and evaluation. Only the parameters are read; they land on the default device."""
    directory = checkpoint_dir(out_dir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no checkpoint found in {directory}: train first (python -m gptjax.train ...) "
            "or pass --init_from=gpt2 / a path to a checkpoint"
        )
    ckpt = Checkpointer(out_dir, create=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    meta = ckpt.restore_meta(step)
    cfg = GPTConfig(**meta["model"])
    from gptjax.model import init_params  # local: only the shapes are needed

    abstract_params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    handler = ocp.PyTreeCheckpointer()
    params = handler.restore(
        directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": restore_args},
            partial_restore=True,
        ),
    )["params"]
    ckpt.close()
    return params, cfg, meta["run"]


def model_meta(cfg: GPTConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a truncated file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=lambda o: np.asarray(o).tolist()) + "\n")
    os.replace(tmp, path)
