"""Checkpoints with orbax: the sharded train state plus a small JSON of run metadata.

Layout: OUT_DIR/checkpoints/<step>/{state, meta}, OUT_DIR a local directory or a gs:// URL. The
state's parameters (and the optimizer's moments shaped like them) are always in GPT-2's per-layer
layout, h_0 .. h_{L-1}, whether the run scans its layers or not, so any run can resume, sample or
export any checkpoint. Orbax writes each step into a temporary directory and renames it only once
complete (on a bucket, which has no rename, it writes the step in place and marks it complete with
a last object, commit_success.txt), so a run killed mid-save leaves the previous checkpoints intact
and `latest_step` never names a half-written one. Every host takes part in a save or restore and
writes or reads its own shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptjax import paths, sharding
from gptjax.faults import first_line
from gptjax.model import RUN_SETTINGS, GPTConfig, to_gpt2_layout, to_scan_layout

CHECKPOINT_SUBDIR = "checkpoints"
COMMIT_FILE = "commit_success.txt"  # orbax's mark of a finished save on a bucket


def checkpoint_dir(out_dir: str | os.PathLike):
    """OUT_DIR/checkpoints: a pathlib.Path, or an epath.Path on a bucket (paths.resolve)."""
    return paths.absolute(out_dir) / CHECKPOINT_SUBDIR


class Checkpointer:
    """Saves and restores train states under OUT_DIR/checkpoints, keeping the newest `keep`."""

    def __init__(self, out_dir: str | os.PathLike, keep: int = 2, writer: bool = False):
        # create=False: the directory appears with the first save, so a run that fails at set-up
        # leaves no empty checkpoints/ behind (one that a later command would take for a run).
        # writer: the one process that holds out_dir's lock, so no save is in flight but its own: it
        # removes the temporary directories of saves that a killed run left unfinished.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False, cleanup_tmp_directories=writer)
        self.directory = checkpoint_dir(out_dir)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})
        self._saving: int | None = None  # step of the save in flight, for error messages
        self._failed = False  # a save failed and its error was raised

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any]) -> None:
        """Start saving (asynchronously); the next save, `wait` or `close` waits for it to finish
        and raises OSError if it failed (disk full, ...), leaving older checkpoints in place."""
        self.wait()
        self._saving = step
        state = jax.jit(to_gpt2_layout)(state) if _scanned(state) else state
        with self._save_errors():
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    @contextlib.contextmanager
    def _save_errors(self):
        # Orbax reports a failed background write (ENOSPC, EFBIG, EACCES, ...) as whatever its storage
        # layer raised, often a bare Exception; name the step and what is still safe instead.
        try:
            yield
        except Exception as err:
            step, self._saving, self._failed = self._saving, None, True
            kept = complete_steps(self.directory)
            safe = (f"the newest complete checkpoint, step {kept[-1]}, is intact" if kept
                    else "there is no earlier complete checkpoint")
            raise OSError(
                f"could not save the checkpoint of step {step} in {self.directory} ({_storage_error(err)}); "
                f"{safe}. Free disk space or fix permissions, then resume with --init_from=resume"
            ) from err

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default: newest), laid out as `abstract_state` (ShapeDtypeStructs
        with shardings): per layer or scanned, its shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        meta = self.restore_meta(step)
        scanned = _scanned(abstract_state)
        saved = abstract_state
        if scanned:  # read per layer, laid out as such a run would lay it out, then stacked
            mesh = jax.tree_util.tree_leaves(abstract_state)[0].sharding.mesh
            per_layer = jax.eval_shape(to_gpt2_layout, abstract_state)
            saved = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           per_layer, sharding.state_shardings(per_layer, mesh))
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, saved)
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args))
            )
        except Exception as err:  # tensorstore raises bare Exceptions for unreadable data
            raise ValueError(
                f"cannot restore checkpoint {self.directory / str(step)}: it is corrupt or incomplete, or "
                f"was written for a different model or optimizer (e.g. grad_clip on/off, float16's loss scale) ({first_line(err)}). "
                "Delete that directory to resume from an older checkpoint, or pass another out_dir"
            ) from err
        state = restored.state
        if scanned:
            n_layer = jax.tree_util.tree_leaves(abstract_state.params["h"])[0].shape[0]
            shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_state)
            state = jax.jit(functools.partial(to_scan_layout, n_layer=n_layer), out_shardings=shardings)(state)
        return state, meta

    def restore_meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            if not isinstance(meta, dict) or not {"iter_num", "model"} <= meta.keys():
                raise ValueError(f"its metadata is {str(meta)[:80]!r}, not gptjax's")
        except Exception as err:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} is corrupt or incomplete: cannot read its "
                f"metadata ({first_line(err)}). Delete that directory to resume from an older checkpoint"
            ) from err
        return meta

    def check(self) -> None:
        """Raise the error of a background save that has failed, without waiting for one in flight:
        called every step, so a run stops where a failure is noticed, not at its next save."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()  # done: returns at once, raising if it failed

    def wait(self) -> None:
        with self._save_errors():
            self.manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        if self._failed:  # raised already, naming the step; orbax would raise its stored error again
            return
        self.wait()
        self.manager.close()


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: orbax's, except that one process writes each replicated array
    whole. Orbax's default (replica-parallel saving) has each replica write a slice of an array held
    by several devices, which pays when the replicas sit on different hosts; in one process it only
    costs eager slices of every array at every save, each compiled at the first (docs/benchmarks.md,
    "Log"). A checkpoint reads back the same either way."""
    scalars = ocp.type_handlers.ScalarHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, scalars), (float, scalars), (np.number, scalars),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints in `directory`, oldest first. Orbax writes a step into
    `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only when complete, so a bare number
    is a finished checkpoint and anything else is an interrupted write, ignored. On a bucket a
    step is finished once orbax's commit_success.txt is in it."""
    path = paths.resolve(directory)
    if not path.is_dir():
        return []
    steps = [p for p in path.iterdir() if p.name.isdigit() and p.is_dir()]
    if not isinstance(path, Path):
        steps = [p for p in steps if (p / COMMIT_FILE).exists()]
    return sorted(int(p.name) for p in steps)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)|\[Errno (\d+)\]")


def _storage_error(err: BaseException) -> str:
    """`first_line(err)`, led by the OS's name for the failure ("No space left on device") when
    the error or its causes carry one: tensorstore puts it last, after paths long enough to be cut."""
    causes = []
    while err is not None and err not in causes:
        causes.append(err)
        err = err.__cause__ or err.__context__
    for cause in causes:
        code = cause.errno if isinstance(cause, OSError) and cause.errno else None
        found = _OS_ERROR_CODE.search(str(cause)) if code is None else None
        if found:
            code = int(found.group(1) or found.group(2))
        if code:
            return f"{os.strerror(code)}: {first_line(causes[0])}"
    return first_line(causes[0])


def check_model_matches(saved: dict[str, Any], current, source: str) -> None:
    """A checkpoint's model fields (`saved`, as its run gave them) must equal those of the
    resuming run's TrainConfig `current` in every field that says what the weights are (all of
    GPTConfig's but RUN_SETTINGS); fields a checkpoint does not record are not compared."""
    fields = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in RUN_SETTINGS]
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {getattr(current, k)!r}"
             for k in fields if k in saved and saved[k] != getattr(current, k)]
    if diffs:
        raise ValueError(f"checkpoint {source} was written for a different model ({'; '.join(diffs)}); "
                         "pass matching --key=value overrides or another out_dir")


def check_state_matches(meta: dict[str, Any], cfg, source: str) -> None:
    """Settings that change the layout of a train state, so that a checkpoint written under the other
    setting cannot be restored: gradient clipping on or off (a stage of the optimizer's state), and
    float16 or not (float16 carries a loss scale). `cfg`: the resuming run's TrainConfig."""
    run = meta.get("run") or {}
    problems = []
    if "grad_clip" in run and (run["grad_clip"] > 0) != (cfg.grad_clip > 0):
        problems.append(f"it was trained with grad_clip={run['grad_clip']} and this run has grad_clip={cfg.grad_clip} "
                        f"(clipping on or off changes the optimizer state): resume with --grad_clip={run['grad_clip']}")
    saved_dtype, dtype = meta["model"].get("dtype"), cfg.resolved_dtype
    if (saved_dtype == "float16") != (dtype == "float16"):
        problems.append(f"it was trained in {saved_dtype} and this run computes in {dtype} "
                        f"(float16 runs carry a loss scale in their state): resume with --dtype={saved_dtype}")
    if problems:
        raise ValueError(f"cannot resume from checkpoint {source}: {'; '.join(problems)}")


def load_inference(out_dir: str | os.PathLike, step: int | None = None):
    """(params, GPTConfig, metadata) from a training run's newest checkpoint (or `step`), for sampling,
    evaluation and export; the metadata holds iter_num, best_val_loss and the run's config ("run").
    Only the parameters are read; they land on the default device."""
    directory = checkpoint_dir(out_dir)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"no checkpoint found in {directory}: train first (python -m gptjax.train ...) "
            "or pass --init_from=gpt2 / a path to a checkpoint"
        )
    ckpt = Checkpointer(out_dir)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    meta = ckpt.restore_meta(step)
    cfg = dataclasses.replace(GPTConfig.from_fields(meta["model"]), scan_layers=False, remat="none")
    from gptjax.model import init_params  # local: only the shapes are needed

    abstract_params = jax.eval_shape(functools.partial(init_params, cfg), jax.random.PRNGKey(0))
    try:
        params = restore_part(out_dir, step, "params", abstract_params)
    finally:
        ckpt.close()
    return params, cfg, meta


def restore_part(out_dir: str | os.PathLike, step: int, name: str, abstract):
    """One field of a checkpoint's train state ("params", "opt_state"), in GPT-2's per-layer layout as
    `abstract` (ShapeDtypeStructs) describes it, on the default device; a clear error if unreadable."""
    directory = checkpoint_dir(out_dir)
    try:
        return ocp.PyTreeCheckpointer().restore(
            directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(item={name: abstract},
                                        restore_args={name: ocp.checkpoint_utils.construct_restore_args(abstract)},
                                        partial_restore=True),
        )[name]
    except Exception as err:  # tensorstore raises bare Exceptions for unreadable data
        older = [s for s in complete_steps(directory) if s < step]
        fallback = (f"; the older checkpoint {max(older)} is still there: move {directory / str(step)} "
                    "away to use it" if older else "")
        what = {"params": "parameters", "opt_state": "optimizer state"}.get(name, name)
        raise ValueError(f"cannot read the {what} of checkpoint {directory / str(step)}: it is corrupt or "
                         f"incomplete ({first_line(err)}){fallback}") from err


def model_meta(cfg: GPTConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _scanned(state) -> bool:
    """Whether a train state's parameters are in scan_layers' layout."""
    return "h" in state.params


def write_json(path, payload: dict[str, Any]) -> None:
    """Write so a crash never leaves a truncated file (paths.write_bytes)."""
    paths.write_bytes(path, (json.dumps(payload, indent=2, default=lambda o: np.asarray(o).tolist()) + "\n").encode())
