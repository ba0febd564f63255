"""Run configuration: a frozen dataclass with nanoGPT's keys, config files and `--key=value` overrides.

nanoGPT's configurator exec()s files and literal_evals overrides into globals; here a config file
is a Python module in configs/ whose `get_config()` returns a `TrainConfig`, and overrides are
parsed and type-checked against the dataclass fields before anything compiles.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import traceback
from pathlib import Path
from typing import Any, Sequence

import jax

from gptjax import kernels, paths
from gptjax.kernels import cuda_major
from gptjax.model import RUN_SETTINGS, GPTConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "muon")  # gptjax.optim.make_optimizer


def auto_dtype(device=None) -> str:
    """The compute dtype nanoGPT's train.py picks for the device: bfloat16 where the hardware has it
    (TPUs, NVIDIA GPUs from Ampere on, AMD GPUs), float16 on older NVIDIA GPUs (T4, V100), float32
    on CPU."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return "float32"
    major = cuda_major(device)
    return "float16" if major is not None and major < 8 else "bfloat16"


def config_dirs() -> tuple[Path, ...]:
    """Where config names are looked up: ./configs, then the recipes shipped with gptjax (the
    repository's configs/, installed as the gptjax.configs package)."""
    here = Path(__file__).resolve().parent
    return (Path.cwd() / "configs", here / "configs", here.parent / "configs")


@dataclasses.dataclass(frozen=True)
class TrainConfig(GPTConfig):
    """Everything a training run needs: the model's fields, declared and checked in GPTConfig, and
    the run's. Defaults are nanoGPT's train.py (GPT-2 124M on OpenWebText)."""

    # model: GPTConfig's fields, with train.py's defaults where they differ from GPT-2's
    vocab_size: int = 0  # 0: the dataset's meta.pkl vocab, else GPT-2's 50304
    bias: bool = False  # nanoGPT's train.py default (GPT-2 checkpoints bring their own)
    dtype: str = "auto"  # compute: auto (auto_dtype: bfloat16 on accelerators, float32 on CPU) | float32 |
    # bfloat16 | float16 (loss-scaled); parameters stay float32
    # kernels (gptjax.kernels), 'auto': chosen for the devices the run uses
    attention: str = "auto"  # auto | xla | cudnn | plain | blocked (CPU) | head_groups (CPU, forward only is faster)
    matmul: str = "auto"  # auto | xla | cpu (the CPU Dense product)
    grad_reduce: str = "auto"  # auto | xla | flat (one flat all-reduce, CPU data parallelism)
    dot_library: str = "auto"  # auto (CPU: what `gptjax.bench --tune` recorded for this host, else xla) | xla | onednn | eigen
    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # save at every eval, not only when val improves
    init_from: str = "scratch"  # 'scratch' | 'resume' | 'gpt2*' | a gptjax out_dir, an HF dir or a nanoGPT ckpt.pt
    keep_checkpoints: int = 2  # newest checkpoints kept in out_dir/checkpoints
    # logging
    wandb_log: bool = False
    wandb_project: str = "owt"
    wandb_run_name: str = "gpt2"
    tensorboard: bool = True  # the logged scalars also as TensorBoard events in out_dir/tensorboard
    # downstream tasks of lm-evaluation-harness at every eval (pip install 'gptjax[eval]')
    eval_tasks: str = ""  # comma-separated lm-eval task names, e.g. hellaswag,arc_easy
    eval_tasks_limit: int = 0  # examples per task (0: all of them)
    eval_tasks_include_path: str = ""  # a directory of task YAML files of your own
    # data
    dataset: str = "openwebtext"
    data_dir: str = ""  # where train.bin/val.bin/meta.pkl live; '' means data/<dataset>
    data_input: str = ""  # local corpus to prepare shakespeare* from when the .bin files are missing
    gradient_accumulation_steps: int = 40  # micro-batches per optimizer step
    batch_size: int = 12  # micro-batch size, global over all devices and hosts
    prefetch: int = 2  # batches prepared ahead of the device on a host thread
    # optimizer: adamw | muon (Muon for the blocks' matrices, AdamW for embeddings, head, norms, biases)
    optimizer: str = "adamw"
    learning_rate: float = 6e-4  # AdamW's (muon: that of the norms and biases, and the schedule's peak)
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip gradients at this global norm; 0 disables
    muon_lr: float = 0.02  # muon: the block matrices' learning rate
    muon_momentum: float = 0.95  # muon: Nesterov momentum
    embedding_lr: float = 0.0  # muon: AdamW's learning rate for wte/wpe (0: learning_rate)
    head_lr: float = 0.0  # muon: AdamW's learning rate for an untied lm_head (0: learning_rate)
    # learning-rate schedule
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000  # ~= max_iters per Chinchilla
    min_lr: float = 6e-5  # ~= learning_rate / 10 per Chinchilla
    # system
    seed: int = 1337
    nonfinite: str = "stop"  # non-finite loss or grads: 'stop' the run, or 'skip' the update
    # devices: mesh axis sizes; -1 takes all remaining devices
    dp: int = -1
    fsdp: int = 1

    def __post_init__(self):
        _check_types(self)
        errors = self.model_problems(unresolved=("vocab_size", "dtype"))
        for name in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                     "keep_checkpoints"):
            if getattr(self, name) <= 0:
                errors.append(f"{name}={getattr(self, name)} must be positive")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "max_iters",
                     "warmup_iters", "lr_decay_iters", "prefetch", "muon_lr", "embedding_lr", "head_lr",
                     "eval_tasks_limit"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must not be negative")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.optimizer == "muon" and self.learning_rate <= 0:
            errors.append("optimizer='muon' scales every group's learning rate by the schedule of learning_rate, "
                          f"which is {self.learning_rate}: set a positive learning_rate")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            errors.append(f"warmup_iters={self.warmup_iters} is larger than lr_decay_iters={self.lr_decay_iters}")
        for name, allowed in (("attention", kernels.ATTENTION), ("matmul", kernels.MATMUL),
                              ("grad_reduce", kernels.GRAD_REDUCE), ("dot_library", kernels.DOT_LIBRARIES),
                              ("nonfinite", ("stop", "skip")),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                errors.append(f"{name}={getattr(self, name)!r} must be one of {', '.join(map(repr, allowed))}")
        if not self.out_dir.strip():
            errors.append("out_dir is empty: pass --out_dir=DIR, the directory the run writes")
        for name in ("out_dir", "data_dir", "init_from"):
            if (why := paths.problem(getattr(self, name), name)) is not None:
                errors.append(why)
        for name in ("dp", "fsdp"):
            if getattr(self, name) == 0 or getattr(self, name) < -1:
                errors.append(f"{name}={getattr(self, name)} must be a positive mesh size or -1")
        if errors:
            raise ValueError("invalid config: " + "; ".join(errors))

    @property
    def task_names(self) -> list[str]:
        return [name.strip() for name in self.eval_tasks.split(",") if name.strip()]

    @property
    def resolved_data_dir(self) -> str:
        return self.data_dir or os.path.join("data", self.dataset)

    @property
    def tokens_per_iter(self) -> int:
        return self.gradient_accumulation_steps * self.batch_size * self.block_size

    @property
    def resolved_dtype(self) -> str:
        """The compute dtype: `dtype`, with 'auto' decided for this process's devices."""
        return auto_dtype() if self.dtype == "auto" else self.dtype

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The GPTConfig of this run: its model fields, the vocab from the dataset when the config
        has 0 (else GPT-2's padded 50304), the dtype decided for the devices."""
        return GPTConfig.from_fields(self, vocab_size=self.vocab_size or vocab_size or 50304,
                                     dtype=self.resolved_dtype)

    def run_settings(self) -> dict[str, Any]:
        """The model fields (RUN_SETTINGS) this run sets on weights it loads, a checkpoint's or GPT-2's."""
        return {**{name: getattr(self, name) for name in RUN_SETTINGS}, "dtype": self.resolved_dtype}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        return from_dict(json.loads(Path(path).read_text()), source=str(path))


def field_types() -> dict[str, type]:
    return {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}


# nanoGPT train.py keys that gptjax has no use for, with what to do instead: its README's commands
# (e.g. the CPU recipe's --device=cpu --compile=False) are what users paste first.
NANOGPT_ONLY_KEYS = {
    "device": "JAX runs on the devices it finds; to force the CPU, set JAX_PLATFORMS=cpu",
    "compile": "the train step is always compiled (jax.jit); drop it",
    "backend": "devices and hosts communicate through jax.sharding; see docs/scaling.md for --dp/--fsdp",
}


def _check_keys(keys, source: str) -> None:
    valid = field_types()
    unknown = sorted(set(keys) - set(valid))
    if unknown:
        hints = "".join(f"; nanoGPT's {k}: {NANOGPT_ONLY_KEYS[k]}" for k in unknown if k in NANOGPT_ONLY_KEYS)
        raise ValueError(
            f"unknown config key(s) {unknown} in {source}{hints}; valid keys: {', '.join(sorted(valid))}"
        )


_WRONG_TYPE = object()


def _as_field_type(want: type, value: Any) -> Any:
    """`value` as a field declared `want` takes it (an int where a float is declared becomes a
    float), or _WRONG_TYPE. The one typing rule of config files, dicts and the command line."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value if type(value) is want else _WRONG_TYPE


def _check_types(cfg: TrainConfig) -> None:
    """Every field of its declared type, so a config file's mistakes are named like a command line's."""
    wrong = []
    for name, want in field_types().items():
        value = getattr(cfg, name)
        typed = _as_field_type(want, value)
        if typed is _WRONG_TYPE:
            wrong.append(f"{name}={value!r} must be {want.__name__}, not {type(value).__name__}")
        elif typed is not value:
            object.__setattr__(cfg, name, typed)  # frozen: the one place a field is rewritten
    if wrong:
        raise TypeError("invalid config: " + "; ".join(wrong))


def _coerce(key: str, value: Any, source: str) -> Any:
    want = field_types()[key]
    typed = _as_field_type(want, value)
    if typed is _WRONG_TYPE:
        raise TypeError(
            f"config key {key!r} from {source} must be {want.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return typed


def from_dict(values: dict[str, Any], source: str = "dict") -> TrainConfig:
    _check_keys(values, source)
    return TrainConfig(**{k: _coerce(k, v, source) for k, v in values.items()})


def parse_override(arg: str) -> tuple[str, Any]:
    """'--key=value' -> (key, typed value), the value read as a Python literal like nanoGPT."""
    if not arg.startswith("--") or "=" not in arg:
        raise ValueError(f"cannot parse {arg!r}: overrides look like --key=value")
    key, raw = arg[2:].split("=", 1)
    _check_keys([key], "the command line")
    want = field_types()[key]
    if want is str:
        return key, raw
    if want is bool and raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise TypeError(f"config key {key!r} must be {want.__name__}, got {raw!r}") from None
    return key, _coerce(key, value, "the command line")


def find_config_file(name: str) -> Path:
    """A config given as a path, or a name of a file in configs/."""
    path = Path(name)
    if path.is_dir():
        raise IsADirectoryError(f"config {name} is a directory: pass a config file (a .py that defines get_config())")
    if path.suffix == ".py" and path.exists():
        return path
    if len(path.parts) > 1:  # a path: never silently replaced by the shipped config of that name
        raise FileNotFoundError(f"config file {name} does not exist (relative paths start from {Path.cwd()})")
    for folder in config_dirs():
        candidate = folder / f"{path.stem}.py"
        if candidate.exists():
            return candidate
    available = sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.py") if p.stem != "__init__"})
    raise FileNotFoundError(f"no config {name!r}; available: {', '.join(available) or 'none'}")


def load_config_file(name: str) -> TrainConfig:
    path = find_config_file(name)
    spec = importlib.util.spec_from_file_location(f"gptjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's code: a SyntaxError, an ImportError, a NameError, ...
        where = next((f" (line {f.lineno})" for f in reversed(traceback.extract_tb(err.__traceback__))
                      if f.filename == str(path)), f" (line {err.lineno})" if isinstance(err, SyntaxError) else "")
        raise ValueError(f"config file {path} fails to run{where}: {type(err).__name__}: {err}") from None
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} must define get_config() returning a TrainConfig")
    try:
        config = module.get_config()
    except (TypeError, ValueError) as err:  # wrong types, bad values, unknown keyword arguments
        hint = (f"; valid keys: {', '.join(sorted(field_types()))}" if "unexpected keyword" in str(err) else "")
        raise type(err)(f"config file {path}: {err}{hint}") from None
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config file {path}: get_config() returned a {type(config).__name__}, not a TrainConfig "
                        "(return TrainConfig(key=value, ...))")
    return config


def parse_args(argv: Sequence[str], base: TrainConfig | None = None) -> TrainConfig:
    """`[CONFIG] [--key=value ...]` -> TrainConfig. Overrides are applied after the config file."""
    config = base or TrainConfig()
    _check_keys([a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and "=" in a], "the command line")
    files = [a for a in argv if not a.startswith("--")]
    if len(files) > 1:
        raise ValueError(f"give one config file, got {files}: a config file sets every key, so a second "
                         "would replace the first; put the rest in --key=value overrides")
    overrides = {}
    for arg in argv:
        if arg.startswith("--"):
            key, value = parse_override(arg)
            overrides[key] = value
        else:
            config = load_config_file(arg)
    return dataclasses.replace(config, **overrides)


def help_text() -> str:
    lines = ["usage: python -m gptjax.X [CONFIG] [--key=value ...]", "",
             "CONFIG: a configs/*.py file or its name. Keys and defaults:"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  --{f.name}={f.default!r}")
    return "\n".join(lines)
