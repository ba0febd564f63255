"""GPT-2 weights in and out of gptjax: Hugging Face GPT-2 directories and nanoGPT `ckpt.pt` files.

Both formats name tensors the GPT-2 way (`transformer.h.0.attn.c_attn.weight`, ...). HF stores
Conv1D weights (in, out), as gptjax does; nanoGPT stores nn.Linear weights (out, in), which are
transposed. Both tie `lm_head.weight` to the token embedding, so the head is not a parameter here.
Safetensors read and write without torch; only `.pt`/`.bin` files need it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from gptjax.faults import first_line
from gptjax.model import PRESETS, GPTConfig, init_params

HUB_FILES = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# Causal-mask buffers that old transformers and non-flash nanoGPT keep in their state dicts.
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_NANOGPT_LN_EPS = 1e-5  # hard-coded in nanoGPT's LayerNorm


# ----------------------------------------------------------------------------- shapes and names


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: GPTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    tree = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    return {_path(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


def _first(items: list, n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(x) for x in items[:n]) + more


def check_params(params, cfg: GPTConfig) -> None:
    """Raise ValueError unless `params` has exactly the tree and shapes `init_params(cfg)` makes."""
    want = _param_shapes(cfg)
    got = {_path(p): tuple(np.shape(leaf)) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = ["/".join(p) for p in want if p not in got]
    unexpected = ["/".join(p) for p in got if p not in want]
    if missing or unexpected:
        raise ValueError(
            f"parameters do not match {_describe(cfg)}: missing [{_first(missing)}], "
            f"unexpected [{_first(unexpected)}]"
        )
    for p, shape in want.items():
        if got[p] != shape:
            raise ValueError(
                f"parameter {'/'.join(p)} has shape {got[p]} but {_describe(cfg)} needs {shape}"
            )


def _describe(cfg: GPTConfig) -> str:
    return (
        f"the config (n_layer={cfg.n_layer}, n_head={cfg.n_head}, n_embd={cfg.n_embd}, "
        f"block_size={cfg.block_size}, vocab_size={cfg.vocab_size}, bias={cfg.bias})"
    )


def _layout(cfg: GPTConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(GPT-2 tensor name without `transformer.`, gptjax param path, is a Dense kernel)."""
    entries = [("wte.weight", ("wte", "embedding"), False), ("wpe.weight", ("wpe", "embedding"), False)]

    def add(name: str, path: tuple[str, ...], dense: bool):
        entries.append((f"{name}.weight", path + ("kernel" if dense else "scale",), dense))
        if cfg.bias:
            entries.append((f"{name}.bias", path + ("bias",), False))

    for i in range(cfg.n_layer):
        add(f"h.{i}.ln_1", (f"h_{i}", "ln_1"), False)
        add(f"h.{i}.attn.c_attn", (f"h_{i}", "attn", "c_attn"), True)
        add(f"h.{i}.attn.c_proj", (f"h_{i}", "attn", "c_proj"), True)
        add(f"h.{i}.ln_2", (f"h_{i}", "ln_2"), False)
        add(f"h.{i}.mlp.c_fc", (f"h_{i}", "mlp", "c_fc"), True)
        add(f"h.{i}.mlp.c_proj", (f"h_{i}", "mlp", "c_proj"), True)
    add("ln_f", ("ln_f",), False)
    return entries


def _state_to_params(state: dict[str, Any], cfg: GPTConfig, transpose: bool, source: str) -> dict:
    """GPT-2-named arrays -> gptjax params. `state` may carry `transformer.`, `lm_head.weight`
    (must equal wte: only tied heads exist in gptjax) and causal-mask buffers."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    head = state.pop("lm_head.weight", None)
    state = {k: v for k, v in state.items() if not _MASK_BUFFER.match(k)}
    layout = _layout(cfg)
    names = [name for name, _, _ in layout]
    known = set(names)
    missing = [n for n in names if n not in state]
    unexpected = [k for k in state if k not in known]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {_describe(cfg)}: missing keys [{_first(missing)}], "
            f"unexpected keys [{_first(unexpected)}]"
        )
    shapes = _param_shapes(cfg)
    params: dict = {}
    for name, path, is_kernel in layout:
        arr = _to_numpy(state[name])
        want = shapes[path][::-1] if is_kernel and transpose else shapes[path]
        if arr.shape != want:
            raise ValueError(
                f"{source}: tensor {name} has shape {arr.shape} but {_describe(cfg)} needs {want}"
            )
        if is_kernel and transpose:
            arr = arr.T
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(arr, dtype=jnp.float32)
    if head is not None and not np.array_equal(_to_numpy(head), np.asarray(params["wte"]["embedding"])):
        raise ValueError(
            f"{source}: lm_head.weight differs from the token embedding; gptjax only supports "
            "GPT-2's tied output head"
        )
    return params


def _params_to_state(params, cfg: GPTConfig, transpose: bool) -> dict[str, np.ndarray]:
    check_params(params, cfg)
    state = {}
    for name, path, is_kernel in _layout(cfg):
        arr = params
        for key in path:
            arr = arr[key]
        arr = np.asarray(arr, dtype=np.float32)
        # A fresh, writable C-order copy: torch.from_numpy and safetensors both want one.
        state[f"transformer.{name}"] = np.array(arr.T if is_kernel and transpose else arr, order="C")
    return state


def params_from_state_dict(state: dict[str, Any], cfg: GPTConfig, fmt: str = "nanogpt") -> dict:
    """In-memory import of a torch state dict (tensors or arrays): fmt "nanogpt" (nn.Linear
    weights, `_orig_mod.` prefix allowed) or "hf" (GPT2LMHeadModel / GPT2Model, Conv1D)."""
    if fmt not in ("nanogpt", "hf"):
        raise ValueError(f"fmt={fmt!r} is not 'nanogpt' or 'hf'")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    return _state_to_params(state, cfg, transpose=fmt == "nanogpt", source=f"{fmt} state dict")


def nanogpt_state_dict(params, cfg: GPTConfig) -> dict:
    """torch tensors keyed as nanoGPT's `GPT.state_dict()` (tied lm_head), for load_state_dict."""
    torch = _import_torch("building a nanoGPT state dict")
    state = {k: torch.from_numpy(v) for k, v in _params_to_state(params, cfg, transpose=True).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one shared tensor, as nanoGPT
    return state


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; bf16 has no numpy dtype, so go through float32
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _import_torch(why: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{why} needs PyTorch: pip install 'gptjax[interop]' (or torch)") from e
    return torch


# ----------------------------------------------------------------------------- Hugging Face


def _hub_download(name: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILES))
    except Exception as e:  # offline mode, DNS, HTTP, ...: all mean "no weights from the hub"
        raise ConnectionError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); when offline, pass a local directory "
            "holding config.json and model.safetensors (or pytorch_model.bin) instead"
        ) from e


def _config_from_hf(hf: dict, dtype: str, source: str) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type is {hf['model_type']!r}; only GPT-2 ('gpt2') is supported")
    n_embd = hf.get("n_embd", 768)
    act = hf.get("activation_function", "gelu_new")
    unsupported = [
        (hf.get("n_inner") not in (None, 4 * n_embd), f"n_inner={hf.get('n_inner')} (gptjax uses 4*n_embd)"),
        (act not in HF_ACTIVATIONS, f"activation_function={act!r} (supported: {sorted(HF_ACTIVATIONS)})"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights=false"),
        (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx=true"),
        (hf.get("add_cross_attention", False), "add_cross_attention=true"),
    ]
    problems = [msg for bad, msg in unsupported if bad]
    if problems:
        raise ValueError(f"{source}: unsupported GPT-2 variant: {'; '.join(problems)}")
    # Dropout is a training choice (nanoGPT's from_pretrained also defaults it to 0).
    return GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
        dtype=dtype,
        activation=HF_ACTIVATIONS[act],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        try:
            return safetensors.numpy.load_file(path)
        except KeyError:  # numpy has no bfloat16; the flax reader does (via jax), still without torch
            from safetensors.flax import load_file

            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    except safetensors.SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: it is truncated or corrupt ({e}); "
                         "download or export it again") from e


def _read_hf_weights(directory: Path) -> dict[str, Any]:
    if (directory / "model.safetensors").is_file():
        return _load_safetensors(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in _load_safetensors(directory / shard).items()}
    if (directory / "pytorch_model.bin").is_file():
        return _torch_load(directory / "pytorch_model.bin")
    raise FileNotFoundError(
        f"{directory} has no model.safetensors or pytorch_model.bin: save the model with "
        "save_pretrained() or gptjax.convert.save_hf"
    )


def load_hf(path_or_name, dtype: str = "float32") -> tuple[dict, GPTConfig]:
    """Hugging Face GPT-2 -> (params, GPTConfig). `path_or_name` is a local directory
    (config.json + model.safetensors or pytorch_model.bin) or, when no such path exists, a hub
    name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), downloaded with huggingface_hub."""
    directory = Path(path_or_name)
    if not directory.exists():
        if str(path_or_name) not in PRESETS:
            raise FileNotFoundError(
                f"{str(path_or_name)!r} is neither an existing directory nor a GPT-2 hub name "
                f"({', '.join(PRESETS)})"
            )
        directory = _hub_download(str(path_or_name))
    if not directory.is_dir():
        raise ValueError(f"{directory} is a file; pass the directory holding config.json")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{directory / 'config.json'} is not valid JSON ({err}): is it truncated?") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{directory / 'config.json'} holds a {type(hf).__name__}, not a Hugging Face config")
    cfg = _config_from_hf(hf, dtype, str(directory))
    params = _state_to_params(_read_hf_weights(directory), cfg, transpose=False, source=str(directory))
    return params, cfg


def _refuse_modern(cfg: GPTConfig, target: str) -> None:
    if options := cfg.not_gpt2():
        raise ValueError(f"{target} cannot hold this model ({', '.join(options)}): GPT-2's formats have "
                         "learned positions, LayerNorm, a tied head and no soft-cap; keep it as a gptjax run "
                         "(gptjax.sample, gptjax.train --init_from=resume read it)")


def save_hf(params, cfg: GPTConfig, out_dir) -> Path:
    """Write config.json + model.safetensors that `GPT2LMHeadModel.from_pretrained` loads.
    HF GPT-2 always has biases: a bias=False model is written with zero biases (same function)."""
    _refuse_modern(cfg, "HF's GPT-2")
    state = _params_to_state(params, cfg, transpose=False)
    if not cfg.bias:
        biased = dataclasses.replace(cfg, bias=True)
        for name, path, _ in _layout(biased):
            state.setdefault(f"transformer.{name}", np.zeros(_param_shapes(biased)[path], np.float32))
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
    }
    # GPT-2's <|endoftext|>; transformers' default of 50256 would be out of range in a small vocab.
    eot = 50256 if cfg.vocab_size > 50256 else None
    hf.update(bos_token_id=eot, eos_token_id=eot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    safetensors.numpy.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


# ----------------------------------------------------------------------------- nanoGPT


def _torch_load(path: Path):
    """torch.load(weights_only=True), its failures one ValueError naming the file."""
    torch = _import_torch(f"reading {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # a class or function to import: code would run, not garbage
            raise ValueError(
                f"{path} holds pickled objects beyond tensors and plain containers; refusing to "
                "unpickle it (arbitrary code). Re-save it with only tensors, numbers and strings"
            ) from e
        why = e
    except Exception as e:  # torch's readers meet a truncated zip or a text file with any error type at all
        why = e
    raise ValueError(f"{path} is not a readable PyTorch checkpoint: it is truncated, corrupt or not written by "
                     f"torch.save ({type(why).__name__}: {first_line(why)})") from why


def read_nanogpt_ckpt(ckpt_path) -> dict:
    """torch.load a nanoGPT checkpoint with weights_only=True and check its top-level layout."""
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no nanoGPT checkpoint at {path}")
    ckpt = _torch_load(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and isinstance(ckpt.get("model_args"), dict)):
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not a nanoGPT checkpoint: expected dicts under 'model' and 'model_args', "
            f"found {found}"
        )
    missing = [k for k in NANOGPT_ARGS if k not in ckpt["model_args"] and k != "dropout"]
    if missing:
        raise ValueError(f"{path}: model_args lacks {missing}")
    return ckpt


def load_nanogpt(ckpt_path, dtype: str = "float32") -> tuple[dict, GPTConfig]:
    """nanoGPT ckpt.pt (or a directory holding one) -> (params, GPTConfig); needs torch."""
    return nanogpt_params(read_nanogpt_ckpt(ckpt_path), dtype, str(ckpt_path))


def nanogpt_params(ckpt: dict, dtype: str, source: str) -> tuple[dict, GPTConfig]:
    """(params, GPTConfig) of a checkpoint `read_nanogpt_ckpt` read from `source`."""
    args = ckpt["model_args"]
    extra = ckpt.get("gptjax_config", {})  # written by save_nanogpt for non-nanoGPT numerics
    cfg = GPTConfig(
        **{k: args[k] for k in NANOGPT_ARGS if k in args},
        dtype=dtype,
        activation=extra.get("activation", "gelu"),
        layer_norm_eps=extra.get("layer_norm_eps", _NANOGPT_LN_EPS),
    )
    # torch.compile'd models save their state dict under `_orig_mod.`.
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    return _state_to_params(state, cfg, transpose=True, source=source), cfg


def nanogpt_optimizer_state(cfg: GPTConfig, learning_rate: float = 6e-4, betas=(0.9, 0.95),
                            weight_decay: float = 0.1, moments: tuple | None = None) -> dict:
    """`torch.optim.AdamW.state_dict()` as nanoGPT's `configure_optimizers` lays it out: group 0 the
    tensors of two or more dimensions (decayed), group 1 the rest, each in `GPT.named_parameters()`
    order (the tied lm_head is wte). Defaults: nanoGPT's train.py. `moments`: (updates applied,
    first moments, second moments), the moments as gptjax parameter trees (optax's mu and nu, which
    are torch's exp_avg and exp_avg_sq); None gives a fresh optimizer, whose state torch creates at
    its first step."""
    torch = _import_torch("writing nanoGPT's optimizer state")
    names = [f"transformer.{name}" for name, _, _ in _layout(cfg)]
    shapes = {f"transformer.{name}": _param_shapes(cfg)[path][::-1] if dense else _param_shapes(cfg)[path]
              for name, path, dense in _layout(cfg)}
    # on the meta device: the state dict only numbers the parameters, it never reads them
    tensors = {n: torch.nn.Parameter(torch.empty(shapes[n], device="meta")) for n in names}
    decay = [n for n in names if len(shapes[n]) >= 2]
    groups = [{"params": [tensors[n] for n in decay], "weight_decay": weight_decay},
              {"params": [tensors[n] for n in names if n not in decay], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas))
    if moments is not None:
        updates, mu, nu = moments
        exp_avg, exp_avg_sq = (_params_to_state(m, cfg, transpose=True) for m in (mu, nu))
        for n in names:
            optimizer.state[tensors[n]] = {"step": torch.tensor(float(updates)),
                                           "exp_avg": torch.from_numpy(exp_avg[n]),
                                           "exp_avg_sq": torch.from_numpy(exp_avg_sq[n])}
    return optimizer.state_dict()


def nanogpt_numerics_changes(cfg: GPTConfig) -> list[str]:
    """How nanoGPT's GPT, which always runs exact GELU and LayerNorm eps 1e-5, would compute this
    model differently (empty: as gptjax does)."""
    changes = []
    if cfg.activation != "gelu":
        changes.append(f"activation={cfg.activation!r} (nanoGPT uses exact 'gelu')")
    if cfg.layer_norm_eps != _NANOGPT_LN_EPS:
        changes.append(f"layer_norm_eps={cfg.layer_norm_eps} (nanoGPT uses 1e-5)")
    return changes


def save_nanogpt(params, cfg: GPTConfig, path, extra: dict | None = None,
                 allow_numerics_change: bool = False) -> Path:
    """Write a ckpt.pt that nanoGPT's train.py resumes and its sample.py samples (state dict keys as
    nanoGPT's `GPT.state_dict()`, tied `lm_head.weight`, no mask buffer, and a fresh AdamW state:
    nanoGPT_optimizer_state's). `extra` adds or overrides top-level entries (iter_num,
    best_val_loss, config, optimizer). nanoGPT always runs exact GELU and LayerNorm eps 1e-5; other
    settings are refused unless allow_numerics_change."""
    _refuse_modern(cfg, "nanoGPT's GPT")
    changes = nanogpt_numerics_changes(cfg)
    if changes and not allow_numerics_change:
        raise ValueError(
            f"nanoGPT would run this model differently: {'; '.join(changes)}. Export it for Hugging Face "
            "(save_hf, export --to=hf), or accept the change (allow_numerics_change=True, --allow_numerics_change)"
        )
    if extra and {"model", "model_args"} & set(extra):
        raise ValueError("extra may not override 'model' or 'model_args'")
    torch = _import_torch("writing a nanoGPT checkpoint")
    state = nanogpt_state_dict(params, cfg)
    model_args = {k: getattr(cfg, k) for k in NANOGPT_ARGS}
    ckpt = {
        "model": state,
        "model_args": model_args,
        "iter_num": 0,
        "best_val_loss": 1e9,  # nanoGPT's initial value
        "config": dict(model_args),
        "optimizer": nanogpt_optimizer_state(cfg),
        "gptjax_config": {"activation": cfg.activation, "layer_norm_eps": cfg.layer_norm_eps},
        **(extra or {}),
    }
    out = Path(path)
    if out.is_dir():
        out = out / "ckpt.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    return out
