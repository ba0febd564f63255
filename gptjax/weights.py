"""Weights from wherever a checkpoint path is taken, with the vocabulary their tokens mean.

`load(init_from)` takes a gptjax run directory, a nanoGPT `ckpt.pt` (or its out_dir), a Hugging
Face GPT-2 directory or a GPT-2 hub name. Character-level models bring their `meta.pkl`, looked
up as the program that wrote them would: a gptjax run's own copy or its dataset's; for nanoGPT,
beside `ckpt.pt` or at `data/<config['dataset']>/meta.pkl` (where nanoGPT's sample.py looks); for
Hugging Face, in the directory (gptjax's export writes it there).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from gptjax import convert, data, paths
from gptjax.checkpoint import CHECKPOINT_SUBDIR
from gptjax.model import PRESETS, GPTConfig

GPT2_VOCAB = 50257  # a smaller vocabulary is a character (or other custom) one


@dataclasses.dataclass
class Weights:
    params: Any
    cfg: GPTConfig
    meta: dict | None  # the character vocabulary (meta.pkl); None: GPT-2's BPE
    kind: str  # "gptjax" | "nanogpt" | "hf"
    path: Path  # the run directory (an epath.Path on a bucket), the ckpt.pt file or the HF directory
    run: dict = dataclasses.field(default_factory=dict)  # a gptjax run's config; a nanoGPT ckpt's 'config'
    iter_num: int = 0
    best_val_loss: float = float("inf")

    def describe(self) -> str:
        """What the weights are, for logs: '<path> (gptjax run, iter 250)'."""
        what = {"gptjax": "gptjax run", "nanogpt": "nanoGPT ckpt.pt", "hf": "Hugging Face GPT-2"}[self.kind]
        at = f", iter {self.iter_num}" if self.kind != "hf" else ""
        return f"{self.path} ({what}{at})"


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a gptjax run's out_dir: its checkpoints/, or the config.json training
    writes (a run that has not saved yet), which an HF config.json never resembles."""
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        keys = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(keys, dict) and {"out_dir", "init_from"} <= keys.keys() and "model_type" not in keys


def load(init_from: str | os.PathLike, dtype: str = "float32", need_vocabulary: bool = True) -> Weights:
    """The weights `init_from` names (see the module docstring), parameters in float32 and the
    model computing in `dtype`. A model with fewer tokens than GPT-2's and no meta.pkl found is an
    error when its text is needed (need_vocabulary: sampling, export), else `meta` is None."""
    name = str(init_from)
    path = paths.resolve(name)
    if paths.is_remote(name) and not is_run_dir(path) and path.exists():
        # nanoGPT's and HF's readers (torch, safetensors) take local files: read a copy
        path = paths.local_tree(name)
    if path.is_file() or name.endswith(".pt"):
        return _nanogpt(path, dtype, need_vocabulary)
    if path.is_dir():
        if is_run_dir(path):
            return _gptjax_run(path, dtype, need_vocabulary)
        if (path / "ckpt.pt").is_file():
            return _nanogpt(path / "ckpt.pt", dtype, need_vocabulary)
        if (path / "config.json").is_file():
            return _hf(path, dtype, need_vocabulary)
        raise ValueError(f"{path} holds no gptjax run (checkpoints/), nanoGPT ckpt.pt or Hugging Face "
                         "config.json: pass the out_dir of a run, or a checkpoint")
    if name in PRESETS:
        return _hf(name, dtype, need_vocabulary)
    raise ValueError(
        f"cannot load {name!r}: it does not exist. Pass a gptjax run's out_dir, a nanoGPT ckpt.pt file or a "
        f"directory holding one, a Hugging Face GPT-2 directory (config.json + model.safetensors), or one of "
        f"{', '.join(PRESETS)}")


def _gptjax_run(out_dir: Path, dtype: str, need_vocabulary: bool) -> Weights:
    from gptjax import checkpoint  # orbax: only for runs

    params, cfg, saved = checkpoint.load_inference(out_dir)
    run = saved.get("run") or {}
    return Weights(params, dataclasses.replace(cfg, dtype=dtype), run_vocabulary(out_dir, cfg, run, need_vocabulary),
                   "gptjax", out_dir, run, saved["iter_num"], saved["best_val_loss"])


def run_vocabulary(out_dir: Path, cfg: GPTConfig, run: dict, need_vocabulary: bool = True) -> dict | None:
    """A run's character vocabulary: its own copy (out_dir/meta.pkl), else its dataset's as
    training resolved it (an empty data_dir means data/<dataset>); None for GPT-2's BPE."""
    meta = data.load_meta(out_dir)
    if meta is not None:
        return meta
    data_dir = run.get("data_dir") or os.path.join("data", run.get("dataset", ""))
    meta = data.load_meta(data_dir)
    # training took vocab_size from meta.pkl unless given one: then they must agree
    if meta is not None and (meta["vocab_size"] > cfg.vocab_size
                             or (not run.get("vocab_size") and meta["vocab_size"] != cfg.vocab_size)):
        raise ValueError(
            f"{data_dir}/meta.pkl has {meta['vocab_size']} characters but the model in {out_dir} was trained on "
            f"{cfg.vocab_size}: the dataset was prepared again from another text since; prepare it from the "
            "text the model was trained on, or run from the directory training ran in")
    if meta is None and cfg.vocab_size < GPT2_VOCAB and need_vocabulary:
        raise FileNotFoundError(
            f"the model in {out_dir} has a {cfg.vocab_size}-token vocabulary but {data_dir}/meta.pkl (its "
            "character vocabulary) is missing: run from the directory training ran in, or prepare the "
            "dataset again there")
    return meta


def _nanogpt(ckpt_path: Path, dtype: str, need_vocabulary: bool) -> Weights:
    ckpt = convert.read_nanogpt_ckpt(ckpt_path)
    params, cfg = convert.nanogpt_params(ckpt, dtype, str(ckpt_path))
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    places = [ckpt_path.parent]
    if isinstance(config.get("dataset"), str):  # nanoGPT's sample.py: data/<dataset>/meta.pkl from its cwd
        places += [Path("data") / config["dataset"], ckpt_path.parent.parent / "data" / config["dataset"]]
    meta = _first_vocabulary(places, cfg, str(ckpt_path), need_vocabulary)
    best = ckpt.get("best_val_loss", float("inf"))
    return Weights(params, cfg, meta, "nanogpt", ckpt_path, config, int(ckpt.get("iter_num", 0)),
                   float(best.item() if hasattr(best, "item") else best))


def _hf(path_or_name, dtype: str, need_vocabulary: bool) -> Weights:
    params, cfg = convert.load_hf(path_or_name, dtype)
    path = Path(path_or_name)
    meta = _first_vocabulary([path], cfg, str(path), need_vocabulary) if path.is_dir() else None
    return Weights(params, cfg, meta, "hf", path)


def _first_vocabulary(places: list[Path], cfg: GPTConfig, source: str, need_vocabulary: bool) -> dict | None:
    """The first meta.pkl found in `places`, checked against the model's vocabulary size."""
    for place in places:
        meta = data.load_meta(place)
        if meta is None:
            continue
        if meta["vocab_size"] > cfg.vocab_size:
            raise ValueError(f"{place / 'meta.pkl'} has {meta['vocab_size']} characters but the model of {source} "
                             f"has a {cfg.vocab_size}-token vocabulary: it is another dataset's; move it away")
        return meta
    if cfg.vocab_size < GPT2_VOCAB and need_vocabulary:
        looked = ", ".join(str(p / "meta.pkl") for p in places)
        raise FileNotFoundError(
            f"the model of {source} has a {cfg.vocab_size}-token vocabulary, not GPT-2's, and its character "
            f"vocabulary (meta.pkl) is in none of {looked}: copy the meta.pkl of the data it was trained on "
            "beside it")
    return None
