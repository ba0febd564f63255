"""Run configuration: typed `--key=value` overrides, config files, the config.json a run writes,
and impossible values refused with one clear line before anything compiles."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from gptjax import config as config_lib
from gptjax.config import (TrainConfig, field_types, find_config_file, from_dict, load_config_file,
                           parse_args, parse_override)
from gptjax.model import GPTConfig
from gptjax.prepare import prepare_shakespeare_char
from gptjax.train import main, setup
from test_kernels import fake_device  # an accelerator as the device tables see it

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def test_int_is_accepted_for_a_float_key():
    key, value = parse_override("--learning_rate=1")
    assert (key, value, type(value)) == ("learning_rate", 1.0, float)
    assert parse_override("--min_lr=3e-5") == ("min_lr", 3e-5)


def test_float_is_refused_for_an_int_key():
    assert parse_override("--max_iters=100") == ("max_iters", 100)
    with pytest.raises(TypeError, match=r"'max_iters' .* must be int, got 1\.5"):
        parse_override("--max_iters=1.5")
    with pytest.raises(TypeError, match="'batch_size' must be int, got 'twelve'"):
        parse_override("--batch_size=twelve")


def test_bool_parsing():
    assert parse_override("--bias=False") == ("bias", False)
    assert parse_override("--decay_lr=true") == ("decay_lr", True)
    with pytest.raises(TypeError, match="'bias' .* must be bool"):
        parse_override("--bias=1")  # 1 is an int, not a bool: refused rather than guessed


def test_str_values_are_taken_verbatim():
    assert parse_override("--init_from=gpt2-xl") == ("init_from", "gpt2-xl")
    assert parse_override("--wandb_run_name=123") == ("wandb_run_name", "123")  # not read as an int
    assert parse_override("--out_dir=runs/a=b") == ("out_dir", "runs/a=b")


def test_malformed_override_says_the_form():
    with pytest.raises(ValueError, match="--key=value"):
        parse_override("--eval_only")
    with pytest.raises(ValueError, match="--key=value"):
        parse_override("max_iters=3")


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ValueError) as err:
        parse_args(["--n_embdd=64"])
    message = str(err.value)
    assert "unknown config key(s) ['n_embdd']" in message
    assert all(name in message for name in field_types())
    with pytest.raises(ValueError, match=r"\['colour'\] in run.json"):
        from_dict({"colour": "red"}, source="run.json")


def test_nanogpt_only_keys_say_what_to_do_instead():
    """nanoGPT README's CPU command passes --device=cpu --compile=False: both are named at once,
    each with what gptjax does instead."""
    with pytest.raises(ValueError) as err:
        parse_args(["shakespeare_char", "--device=cpu", "--compile=False", "--n_layer=2"])
    message = str(err.value)
    assert "unknown config key(s) ['compile', 'device']" in message
    assert "JAX_PLATFORMS=cpu" in message and "always compiled" in message


def test_config_file_by_name_and_by_path(tmp_path):
    by_name = parse_args(["shakespeare_char"])
    by_path = parse_args([str(ROOT / "configs" / "shakespeare_char.py")])
    assert by_name == by_path
    assert (by_name.dataset, by_name.n_layer, by_name.block_size, by_name.dropout) == ("shakespeare_char", 6, 256, 0.2)
    # overrides win over the file wherever they stand on the command line
    assert parse_args(["--max_iters=7", "shakespeare_char", "--dropout=0"]).max_iters == 7
    assert parse_args(["--max_iters=7", "shakespeare_char", "--dropout=0"]).dropout == 0.0
    custom = tmp_path / "mine.py"
    custom.write_text("from gptjax.config import TrainConfig\n\n"
                      "def get_config():\n    return TrainConfig(n_layer=3, n_head=4, n_embd=64)\n")
    assert parse_args([str(custom), "--n_embd=128"]) == TrainConfig(n_layer=3, n_head=4, n_embd=128)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config 'shakespeare_chars'; available: .*shakespeare_char"):
        find_config_file("shakespeare_chars")
    broken = tmp_path / "broken.py"
    broken.write_text("CONFIG = {}\n")
    with pytest.raises(ValueError, match="must define get_config"):
        load_config_file(str(broken))


@pytest.mark.parametrize("body, error, message", [
    ("TrainConfig(batch_size='4')", TypeError, "batch_size='4' must be int, not str"),
    ("TrainConfig(n_layer=2.0)", TypeError, "n_layer=2.0 must be int, not float"),
    ("TrainConfig(eval_interval=2.5)", TypeError, "eval_interval=2.5 must be int"),  # used to train, then
    # leave a config.json that TrainConfig.load refuses
    ("TrainConfig(n_layers=4)", TypeError, "unexpected keyword argument 'n_layers'.*valid keys: .*n_layer"),
    ("dict(n_layer=4)", TypeError, "get_config\\(\\) returned a dict, not a TrainConfig"),
])
def test_config_file_values_are_checked_and_name_the_file(tmp_path, body, error, message):
    path = tmp_path / "mine.py"
    path.write_text(f"from gptjax.config import TrainConfig\n\ndef get_config():\n    return {body}\n")
    with pytest.raises(error, match=f"config file {re.escape(str(path))}: .*{message}"):
        parse_args([str(path)])


def test_a_config_path_is_never_replaced_by_a_shipped_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config file configs/shakespeare_char.py does not exist"):
        parse_args(["configs/shakespeare_char.py"])  # nanoGPT's habit, run from another directory
    assert parse_args(["shakespeare_char.py"]) == parse_args(["shakespeare_char"])  # a name, not a path


def test_two_config_files_are_refused():
    with pytest.raises(ValueError, match="give one config file, got \\['shakespeare_char', 'eval_gpt2'\\]"):
        parse_args(["shakespeare_char", "eval_gpt2"])


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_")),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config_file(str(path))
    assert isinstance(cfg, TrainConfig)
    assert from_dict(cfg.to_dict(), source=path.name) == cfg


def test_config_json_in_out_dir_equals_the_config(tmp_path):
    if not CORPUS.is_file():
        pytest.skip(f"tiny-shakespeare corpus not found at {CORPUS}")
    prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8")[:20_000], tmp_path / "data")
    cfg = parse_args(["shakespeare_char", f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}",
                      "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
                      "--learning_rate=3e-3", "--max_iters=5", "--lr_decay_iters=5", "--warmup_iters=1"])
    run = setup(cfg)
    run.close()
    assert TrainConfig.load(tmp_path / "out" / "config.json") == cfg


@pytest.fixture
def traced():
    """Names of the functions jax traces (the first step of any compilation) while the test runs."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


def test_trace_listener_sees_compilation(traced):
    jax.jit(lambda x: x * 3)(1.0)  # the listener used below does notice a compilation
    assert traced


@pytest.mark.parametrize("args, message", [
    (["--n_embd=32", "--n_head=3"], "n_embd=32 is not divisible by n_head=3"),
    (["--learning_rate=-0.001"], "learning_rate=-0.001 must not be negative"),
    (["--warmup_iters=100", "--lr_decay_iters=50"], "warmup_iters=100 is larger than lr_decay_iters=50"),
    (["--batch_size=0"], "batch_size=0 must be positive"),
    (["--dropout=1.0"], "dropout=1.0 must be in [0, 1)"),
    (["--out_dir=s3://bucket/run"], "out_dir='s3://bucket/run' is not a local path or a gs:// URL"),
    (["--dtype=half"], "dtype='half' must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
])
def test_impossible_values_fail_in_one_line_before_compiling(args, message, traced, tmp_path, capsys):
    assert main(["shakespeare_char", f"--out_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config: ") and message in err
    assert err.count("\n") == 1, err
    assert traced == []
    assert not any(tmp_path.iterdir())  # nothing written either
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(TrainConfig(), **dict(parse_override(a) for a in args))


def test_help_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "gptjax.train", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name, default in dataclasses.asdict(TrainConfig()).items():
        assert f"--{name}={default!r}" in out.stdout, name


@pytest.mark.parametrize("device, expected", [
    (fake_device("cpu", version="cpu"), "float32"),
    (fake_device(capability="9.0"), "bfloat16"),  # H100
    (fake_device(capability="8.0"), "bfloat16"),  # A100
    (fake_device(capability="7.5"), "float16"),  # T4: no bfloat16, so float16 with loss scaling
    (fake_device(capability="7.0"), "float16"),  # V100
    (fake_device(version="rocm 6.2"), "bfloat16"),  # an AMD GPU
    (fake_device(platform="tpu", version="PJRT C API"), "bfloat16"),
])
def test_auto_dtype_is_what_nanogpt_picks_for_the_device(device, expected):
    assert config_lib.auto_dtype(device) == expected


def test_dtype_auto_resolves_for_this_host_and_explicit_dtypes_pass_through():
    assert TrainConfig().dtype == "auto"
    assert TrainConfig().resolved_dtype == TrainConfig().model_config(65).dtype == "float32"  # a CPU host
    for dtype in ("float32", "bfloat16", "float16"):
        assert TrainConfig(dtype=dtype).model_config(65).dtype == dtype


def test_model_fields_are_declared_once_in_gptconfig():
    """TrainConfig takes GPTConfig's fields (nanoGPT's flat keys) and its checks: a model mistake
    reads the same from either, and the run's model config carries every field."""
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert model_fields <= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = parse_args(["--n_layer=3", "--n_head=2", "--n_embd=64", "--layer_norm_eps=1e-6", "--remat=dots"])
    built = cfg.model_config(65)
    assert type(built) is GPTConfig
    assert {k: getattr(built, k) for k in model_fields} == {
        **{k: getattr(cfg, k) for k in model_fields}, "vocab_size": 65, "dtype": "float32"}
    for bad, message in ((dict(activation="relu"), "activation='relu' must be one of 'gelu', 'gelu_tanh'"),
                         (dict(layer_norm_eps=0.0), "layer_norm_eps=0.0 must be positive")):
        for cls in (GPTConfig, TrainConfig):
            with pytest.raises(ValueError, match=re.escape(message)):
                cls(**bad)
    with pytest.raises(ValueError, match="vocab_size=0 must be positive"):  # 0 means 'the dataset's' only in a run
        GPTConfig(vocab_size=0)


def test_a_model_config_reads_back_from_checkpoint_metadata_with_other_keys():
    """Metadata holds a run's whole model dict; keys that are not the model's (a kernel choice such
    as attention) are left out, so every checkpoint and config.json stays readable."""
    meta = {**dataclasses.asdict(GPTConfig(n_layer=2, n_embd=64, n_head=2)), "attention": "auto"}
    assert GPTConfig.from_fields(meta) == GPTConfig(n_layer=2, n_embd=64, n_head=2)
    run = TrainConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=65, dtype="float32")
    assert from_dict(run.to_dict()) == run
