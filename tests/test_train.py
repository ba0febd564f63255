"""The training path end to end on a tiny char model: learning, gradient accumulation, skipped
updates, logged losses, exact resume, errors, HF init, metrics records and bf16.

Compiling a train step takes far longer than running this file's few steps, so the tests share
three models (float32 with 2 micro-batches of 4, float32 with 1 batch of 8, and bfloat16 with
dropout), and a persistent compilation cache lets every run of a model reuse its executables.
"""

import dataclasses
import functools
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _compile_cache import session_compile_cache
from gptjax.checkpoint import load_inference
from gptjax.config import TrainConfig
from gptjax.data import BinDataset, get_batch
from gptjax.prepare import prepare_shakespeare_char
from gptjax.model import GPT
from gptjax.torch_ref import nanogpt_lr
from gptjax import train as train_module
from gptjax.optim import make_optimizer
from gptjax.step import abstract_train_state
from gptjax.train import main, setup, train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
STEP_KEYS = {"iter", "loss", "lr"}
TIMING_KEYS = {"dt_ms", "tokens_per_s", "mfu"}
EVAL_KEYS = {"iter", "train_loss", "val_loss"}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Session-wide compilation cache: runs of the same model reuse compiled steps."""
    with session_compile_cache(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not CORPUS.is_file():
        pytest.skip(f"tiny-shakespeare corpus not found at {CORPUS}")
    out = tmp_path_factory.mktemp("shakespeare_char")
    prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8")[:50_000], out)
    return out


def tiny(data_dir, out_dir, **overrides) -> TrainConfig:
    """2 layers, width 32, context 16, 2 micro-batches of 4, vocab 65 (nanoGPT's shakespeare_char).
    gelu_tanh is HF GPT-2's gelu_new, so a run initialised from an HF directory is the same model."""
    fields = dict(
        out_dir=str(out_dir), dataset="shakespeare_char", data_dir=str(data_dir), vocab_size=65,
        n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2,
        activation="gelu_tanh", max_iters=20, eval_interval=10, eval_iters=2, log_interval=1,
        always_save_checkpoint=True, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=40,
        dropout=0.0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def bf16_dropout(data_dir, out_dir, **overrides) -> TrainConfig:
    """The resume model: dropout on, so the per-step dropout keys matter, in bfloat16 compute
    (nanoGPT's default on GPUs)."""
    return tiny(data_dir, out_dir, dropout=0.1, dtype="bfloat16", **overrides)


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def step_records(out_dir) -> list[dict]:
    return [r for r in records(out_dir) if "loss" in r]


def eval_records(out_dir) -> list[dict]:
    return [r for r in records(out_dir) if "val_loss" in r]


@functools.lru_cache(maxsize=None)
def _forward(model_cfg):
    return jax.jit(lambda params, x_BxT: GPT(model_cfg).apply({"params": params}, x_BxT))


def reference_loss(params, model_cfg, x_AxBxT, y_AxBxT) -> float:
    """Mean cross entropy over every position, from a plain forward (logits) and float64 numpy."""
    T = x_AxBxT.shape[-1]
    logits = np.asarray(_forward(model_cfg)(params, jnp.asarray(x_AxBxT.reshape(-1, T))), np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, y_AxBxT.reshape(-1, T)[..., None], -1)[..., 0]
    return float((lse - picked).mean())


def initial_params(cfg: TrainConfig):
    """(params, model config) a run of `cfg` starts from (setup only: nothing is trained)."""
    run = setup(cfg)
    params, model_cfg = jax.device_get(run.state.params), run.model_cfg
    run.close()
    return params, model_cfg


@pytest.fixture(scope="module")
def dropout_run(data_dir, tmp_path_factory):
    """20 uninterrupted bf16 iterations with dropout 0.1, evaluated and checkpointed at 10 and 20."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(bf16_dropout(data_dir, out))
    return out, result


# ----------------------------------------------------------------------------- learning


def test_loss_falls_when_overfitting_one_batch(data_dir, tmp_path):
    run = setup(tiny(data_dir, tmp_path, batch_size=8, gradient_accumulation_steps=1))
    batch = run.to_device(run.batch("train", 0))
    losses = []
    for _ in range(30):
        run.state, metrics = run.train_step(run.state, batch)
        losses.append(float(metrics["loss"]))
    run.close()
    assert losses[0] == pytest.approx(np.log(65), abs=0.3)  # untrained: about uniform over 65 chars
    # measured on CPU: 4.17 -> 0.96, falling at every step
    assert losses[-1] < 0.35 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25, losses


def test_accumulation_matches_one_big_batch(data_dir, tmp_path):
    """2 micro-batches of 4 give the update of one batch of 8 (dropout 0): the same loss, the same
    (clipped) mean gradient, which AdamW keeps as mu = (1 - beta1) * g after the first step, and the
    same parameters, up to float32 summation order."""
    micro = setup(tiny(data_dir, tmp_path / "micro"))
    whole = setup(tiny(data_dir, tmp_path / "whole", batch_size=8, gradient_accumulation_steps=1))
    start = jax.device_get(micro.state.params)
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(whole.state.params)):
        np.testing.assert_array_equal(a, b)  # same seed, same initialisation
    x_AxBxT, y_AxBxT = micro.batch("train", 0)
    assert x_AxBxT.shape == (2, 4, 16)
    micro_state, micro_m = micro.train_step(micro.state, micro.to_device((x_AxBxT, y_AxBxT)))
    whole_batch = (x_AxBxT.reshape(1, 8, 16), y_AxBxT.reshape(1, 8, 16))
    whole_state, whole_m = whole.train_step(whole.state, whole.to_device(whole_batch))
    micro.close()
    whole.close()

    assert float(micro_m["loss"]) == pytest.approx(float(whole_m["loss"]), abs=1e-6)
    assert float(micro_m["grad_norm"]) == pytest.approx(float(whole_m["grad_norm"]), rel=1e-6)
    lr, beta1 = float(micro_m["lr"]), micro.cfg.beta1
    micro_g = [np.asarray(m) / (1 - beta1) for m in jax.tree_util.tree_leaves(
        optax.tree_utils.tree_get(jax.device_get(micro_state.opt_state), "mu"))]
    whole_g = [np.asarray(m) / (1 - beta1) for m in jax.tree_util.tree_leaves(
        optax.tree_utils.tree_get(jax.device_get(whole_state.opt_state), "mu"))]
    named = jax.tree_util.tree_flatten_with_path(jax.device_get(micro_state.params))[0]
    covered = total = 0
    moved = 0.0
    for (path, a), b, s, g_micro, g in zip(named, jax.tree_util.tree_leaves(jax.device_get(whole_state.params)),
                                          jax.tree_util.tree_leaves(start), micro_g, whole_g):
        name = jax.tree_util.keystr(path)
        # the mean gradient: float32 summation order only
        np.testing.assert_allclose(g_micro, g, rtol=0, atol=2e-6 * np.abs(g).max(), err_msg=name)
        # AdamW's first step is lr * g / (|g| + eps), which turns a difference d in g into about
        # lr * eps * d / (|g| + eps)^2: where |g| is near eps (e.g. a key bias, whose exact gradient
        # is 0 because softmax ignores it) float noise in g decides the step. Compare elsewhere.
        clear = lr * 1e-8 * np.abs(g_micro - g) / (np.abs(g) + 1e-8) ** 2 < 1e-7
        np.testing.assert_allclose(a[clear], b[clear], rtol=0, atol=1e-6, err_msg=name)
        assert np.abs(a - b).max() <= 2 * lr + 1e-6, name
        covered, total = covered + clear.sum(), total + clear.size
        moved = max(moved, float(np.abs(a - s).max()))
    assert covered / total > 0.99, covered / total
    assert moved > 1e-3  # the step moved parameters by ~lr, far beyond the tolerance


def test_skipped_update_is_as_if_the_batch_never_came(data_dir, tmp_path):
    """With nonfinite=skip a batch giving a NaN loss changes nothing: the next step applies (and
    logs) the update a run that never saw that batch applies next, bitwise."""
    cfg = tiny(data_dir, tmp_path, batch_size=8, gradient_accumulation_steps=1, nonfinite="skip")
    dataset = BinDataset(data_dir, cfg.block_size, 65)
    x0, y0 = get_batch(dataset, "train", 0, cfg.batch_size, cfg.block_size, cfg.seed)
    x1, y1 = get_batch(dataset, "train", 1, cfg.batch_size, cfg.block_size, cfg.seed)
    bad = x1.copy()
    bad[0, 0, 0] = 10**6  # far outside the vocabulary: the embedding lookup gives NaN
    logged, params = [], []
    for batches in ([(x0, y0), (bad, y1), (x1, y1)], [(x0, y0), (x1, y1)]):
        run = setup(cfg)
        for xy in batches:
            run.state, metrics = run.train_step(run.state, run.to_device(xy))
        run.close()
        logged.append({k: float(v) for k, v in metrics.items()})
        params.append(jax.device_get(run.state.params))
    assert logged[0]["skipped"] == 1, "the out-of-vocabulary batch should give a non-finite loss"
    assert logged[1]["skipped"] == 0
    assert logged[0]["loss"] == logged[1]["loss"] and logged[0]["lr"] == logged[1]["lr"]
    assert logged[0]["lr"] == pytest.approx(nanogpt_lr(1, cfg), rel=1e-6)  # the 2nd applied update
    for a, b in zip(jax.tree_util.tree_leaves(params[0]), jax.tree_util.tree_leaves(params[1])):
        np.testing.assert_array_equal(a, b)


def test_logged_loss_is_the_true_batch_mean(data_dir, tmp_path):
    """The iter-0 step loss and the iter-0 eval losses equal plain float32 forwards over exactly
    the batches the loader draws (1e-5 relative)."""
    cfg = tiny(data_dir, tmp_path, max_iters=2)
    params, model_cfg = initial_params(cfg)
    train(cfg)
    dataset = BinDataset(data_dir, cfg.block_size, model_cfg.vocab_size)
    x, y = get_batch(dataset, "train", 0, cfg.batch_size, cfg.block_size, cfg.seed, accum_steps=2)
    first = step_records(tmp_path)[0]
    assert first["iter"] == 0
    assert first["loss"] == pytest.approx(reference_loss(params, model_cfg, x, y), rel=1e-5)
    evals = eval_records(tmp_path)
    assert evals[0]["iter"] == 0
    for split in ("train", "val"):
        want = np.mean([
            reference_loss(params, model_cfg, *get_batch(dataset, split, 0, cfg.batch_size, cfg.block_size,
                                                         cfg.seed, eval_index=k))
            for k in range(cfg.eval_iters)
        ])
        assert evals[0][f"{split}_loss"] == pytest.approx(want, rel=1e-5), split


# ----------------------------------------------------------------------------- resume


def test_resume_reproduces_the_uninterrupted_run(dropout_run, data_dir, tmp_path, monkeypatch):
    """Stopping at 10 and resuming gives bitwise the losses and parameters of one run to 20, with
    dropout on, so the per-step dropout keys must be restored too. The resume restores into the
    state's shapes alone: no state is initialised only to be overwritten."""
    full_dir, full = dropout_run
    first = train(bf16_dropout(data_dir, tmp_path, max_iters=10))
    assert first["iter"] == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "create_train_state", lambda *a, **k: pytest.fail("a resume initialised a state"))
        resumed = train(bf16_dropout(data_dir, tmp_path, init_from="resume"))
    assert resumed["iter"] == 20

    full_steps, split_steps = step_records(full_dir), step_records(tmp_path)
    assert [r["iter"] for r in split_steps] == list(range(20))  # the resumed run starts at 10
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in split_steps] == [r[key] for r in full_steps], key
    assert resumed["val_loss"] == full["val_loss"] and resumed["train_loss"] == full["train_loss"]

    full_params, _, _ = load_inference(full_dir)
    split_params, _, _ = load_inference(tmp_path)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(full_params)[0],
                            jax.tree_util.tree_leaves(split_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    # the check is not vacuous: dropout really is on (the logged loss is not the deterministic one;
    # at nanoGPT's 0.02 init the logits are nearly uniform, so dropout moves the first loss ~1e-4,
    # against ~1e-6 for the two computations' rounding)
    params, model_cfg = initial_params(bf16_dropout(data_dir, tmp_path / "init"))
    dataset = BinDataset(data_dir, 16, model_cfg.vocab_size)
    x, y = get_batch(dataset, "train", 0, 4, 16, 1337, accum_steps=2)
    assert abs(full_steps[0]["loss"] - reference_loss(params, model_cfg, x, y)) > 1e-5


def test_abstract_train_state_is_the_created_state_without_its_values(data_dir, tmp_path):
    """What a resume restores into: the shapes, dtypes and shardings of the state a run creates."""
    cfg = tiny(data_dir, tmp_path, scan_layers=True)
    run = setup(cfg)
    abstract, shardings = abstract_train_state(run.model_cfg, make_optimizer(cfg, run.mesh), run.mesh, cfg.seed)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(run.state)
    for (path, a), x, s in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree_util.tree_leaves(run.state),
                               jax.tree_util.tree_leaves(shardings)):
        assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding) and a.sharding == s, jax.tree_util.keystr(path)
    run.close()


def test_eval_only_evaluates_and_exits(dropout_run, data_dir, tmp_path):
    full_dir, _ = dropout_run
    out = tmp_path / "run"
    shutil.copytree(full_dir, out)
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    metrics = (out / "metrics.jsonl").read_text()
    result = train(bf16_dropout(data_dir, out, init_from="resume", eval_only=True))
    # one eval of the step-20 checkpoint, equal to the one the run itself made at 20; no training,
    # and the run's files as they were
    want = eval_records(full_dir)[-1]
    assert result["iter"] == 20 and (result["train_loss"], result["val_loss"]) == (want["train_loss"], want["val_loss"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints
    assert (out / "metrics.jsonl").read_text() == metrics
    # random weights evaluated in a run's out_dir are refused: that user meant the run
    with pytest.raises(ValueError, match="evaluates random weights, not the run .*--init_from=resume"):
        train(bf16_dropout(data_dir, out, eval_only=True))


# ----------------------------------------------------------------------------- errors


def test_resume_without_checkpoint_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*--init_from=scratch$"):
        train(tiny(data_dir, tmp_path, init_from="resume"))
    (tmp_path / "ckpt.pt").write_bytes(b"")  # a nanoGPT out_dir
    with pytest.raises(FileNotFoundError, match=f"--init_from=scratch, or start from the weights of nanoGPT's "
                                                f".*--init_from={tmp_path / 'ckpt.pt'}"):
        train(tiny(data_dir, tmp_path, init_from="resume"))


def test_wandb_missing_is_said_before_any_set_up(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match="wandb_log=True needs wandb: pip install wandb"):
        train(tiny(data_dir, tmp_path / "out", wandb_log=True))
    assert not (tmp_path / "out").exists()


def test_missing_dataset_names_the_prepare_command(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"python -m gptjax\.prepare"):
        train(tiny(empty, tmp_path / "out", dataset="openwebtext"))


def test_resume_with_another_model_size_names_the_field(dropout_run, data_dir):
    full_dir, _ = dropout_run
    with pytest.raises(ValueError, match="different model.*n_embd: checkpoint 32 vs config 64"):
        train(bf16_dropout(data_dir, full_dir, init_from="resume", n_embd=64))


def test_new_run_leaves_an_earlier_runs_checkpoints_alone(dropout_run, data_dir, tmp_path):
    """A second scratch run into the same out_dir would have overwritten, rotated out or collided
    with the first run's checkpoints (and said nothing, or blamed the disk)."""
    full_dir, _ = dropout_run
    before = sorted(p.name for p in (full_dir / "checkpoints").iterdir())
    metrics = (full_dir / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds the checkpoints of a run \(newest: iter 20\).*"
                                         r"--init_from=resume.*another --out_dir.*remove .* to start over"):
        train(bf16_dropout(data_dir, full_dir))
    assert sorted(p.name for p in (full_dir / "checkpoints").iterdir()) == before
    assert (full_dir / "metrics.jsonl").read_text() == metrics


@pytest.mark.parametrize("change, message", [
    (dict(activation="gelu"), r"different model \(activation: checkpoint 'gelu_tanh' vs config 'gelu'\)"),
    (dict(grad_clip=0.0), "trained with grad_clip=1.0 .*resume with --grad_clip=1.0"),
    (dict(dtype="float16"), "trained in bfloat16 .*loss scale.*resume with --dtype=bfloat16"),
])
def test_resume_with_a_setting_the_checkpoint_cannot_take_says_what_to_pass(dropout_run, data_dir, change,
                                                                          message):
    full_dir, _ = dropout_run
    with pytest.raises(ValueError, match=message):
        train(dataclasses.replace(bf16_dropout(data_dir, full_dir, init_from="resume"), **change))


def test_run_keeps_its_vocabulary_and_resumes_only_on_it(data_dir, tmp_path):
    """vocab_size=0 takes meta.pkl's; resuming with it spelled out is the same model, and a data_dir
    prepared again from another text is refused (the run's copy of its vocabulary tells)."""
    from gptjax.data import load_meta

    run = dict(max_iters=10, vocab_size=0)
    train(tiny(data_dir, tmp_path, **run))
    meta = load_meta(data_dir)
    assert load_meta(tmp_path) == meta
    spelled_out = dict(run, vocab_size=meta["vocab_size"])
    assert train(tiny(data_dir, tmp_path, init_from="resume", **spelled_out))["iter"] == 10
    other = tmp_path / "other_text"
    prepare_shakespeare_char(CORPUS.read_text(encoding="utf-8")[:50_000].replace("e", ""), other)
    with pytest.raises(ValueError, match="no longer the character vocabulary this run was trained on"):
        train(tiny(other, tmp_path, init_from="resume", **run))


def test_cli_bad_key_exits_2_with_one_line(capsys):
    assert main(["--n_embdd=64", "--max_iters=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key(s) ['n_embdd']")
    assert "valid keys:" in err and "n_embd" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- init_from, metrics, dtype


def test_init_from_hf_directory_crops_block_size(data_dir, tmp_path):
    """A Hugging Face GPT-2 directory (n_positions 32) trains at block_size 16: the weights are
    HF's, wpe cropped, and the iter-0 eval loss is the HF model's own loss on those batches."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=65)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = tiny(data_dir, tmp_path / "out", init_from=str(tmp_path / "hf"), max_iters=2)

    params, model_cfg = initial_params(cfg)
    assert (model_cfg.block_size, model_cfg.vocab_size, model_cfg.n_embd) == (16, 65, 32)
    wpe = hf.transformer.wpe.weight.detach().numpy()
    np.testing.assert_array_equal(params["wpe"]["embedding"], wpe[:16])
    np.testing.assert_array_equal(params["wte"]["embedding"], hf.transformer.wte.weight.detach().numpy())

    result = train(cfg)
    assert np.isfinite(result["loss"]) and result["iter"] == 2
    dataset = BinDataset(data_dir, 16, 65)
    for split in ("train", "val"):
        losses = []
        for k in range(cfg.eval_iters):
            x, y = get_batch(dataset, split, 0, 4, 16, cfg.seed, eval_index=k)
            with torch.no_grad():
                logits = hf(torch.tensor(x[0], dtype=torch.long)).logits
            losses.append(torch.nn.functional.cross_entropy(logits.reshape(-1, 65),
                                                            torch.tensor(y[0].reshape(-1), dtype=torch.long)).item())
        assert eval_records(tmp_path / "out")[0][f"{split}_loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_run_from_hf_weights_resumes_with_the_same_command(data_dir, tmp_path):
    """The model of an HF-initialised run is HF's, whatever the config's n_layer/n_embd/activation
    keys say; `--init_from=resume` with the same keys continues that model (as nanoGPT takes the
    architecture from the checkpoint), while changing a key is still refused."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=65)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    # model keys that describe some other model: with init_from=<dir> they are not used
    keys = dict(n_layer=4, n_head=4, n_embd=64, activation="gelu", vocab_size=0, eval_interval=2)
    first = train(tiny(data_dir, tmp_path / "out", init_from=str(tmp_path / "hf"), max_iters=2, **keys))
    resumed = train(tiny(data_dir, tmp_path / "out", init_from="resume", max_iters=4, **keys))
    assert first["iter"] == 2 and resumed["iter"] == 4
    assert [r["iter"] for r in step_records(tmp_path / "out")] == [0, 1, 2, 3]
    params, model_cfg, _ = load_inference(tmp_path / "out")
    assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.activation, model_cfg.block_size) == (2, 32, "gelu_tanh", 16)
    from gptjax import crosscheck  # a tanh-GELU run is compared with transformers' GPT-2

    report, fmt, _ = crosscheck.crosscheck(tmp_path / "out")
    assert report.ok and fmt == "gptjax run vs Hugging Face GPT2LMHeadModel", (report, fmt)
    with pytest.raises(ValueError, match="n_layer: .*4 vs config 3"):
        train(tiny(data_dir, tmp_path / "out", init_from="resume", max_iters=6, **{**keys, "n_layer": 3}))


def test_metrics_records_have_the_documented_keys(dropout_run):
    full_dir, _ = dropout_run
    cfg = bf16_dropout("", full_dir)
    steps = step_records(full_dir)
    assert [r["iter"] for r in steps] == list(range(20))
    for r in steps:
        assert STEP_KEYS <= r.keys()
        assert r["lr"] == pytest.approx(nanogpt_lr(r["iter"], cfg), rel=1e-6)
        if r["iter"] in (0, 10):  # first step after the start or an eval: no step time by design
            assert not TIMING_KEYS & r.keys()
            continue
        assert TIMING_KEYS <= r.keys()
        assert r["dt_ms"] > 0 and r["mfu"] > 0
        assert r["tokens_per_s"] == pytest.approx(cfg.tokens_per_iter / (r["dt_ms"] / 1e3), rel=1e-6)
    evals = eval_records(full_dir)
    assert [r["iter"] for r in evals] == [0, 10, 20]
    assert all(r.keys() == EVAL_KEYS and np.isfinite(r["val_loss"]) for r in evals)


def test_bfloat16_trains_with_float32_state(dropout_run, data_dir, tmp_path):
    """bfloat16 compute keeps float32 parameters and optimizer state; its losses are finite and
    near float32's on the same parameters and batches, but not equal (bf16 really is used)."""
    full_dir, _ = dropout_run
    assert all(np.isfinite(r["loss"]) for r in step_records(full_dir))
    cfg = bf16_dropout(data_dir, tmp_path)
    run = setup(cfg)
    params0 = jax.device_get(run.state.params)
    for i in range(2):
        run.state, metrics = run.train_step(run.state, run.to_device(run.batch("train", i)))
        assert np.isfinite(float(metrics["loss"]))
    state = jax.device_get(run.state)
    run.close()
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
    moments = [x for x in jax.tree_util.tree_leaves(state.opt_state) if np.issubdtype(x.dtype, np.floating)]
    assert len(moments) == 2 * len(jax.tree_util.tree_leaves(state.params))  # AdamW's mu and nu
    assert all(x.dtype == np.float32 for x in moments)

    f32_cfg = dataclasses.replace(run.model_cfg, dtype="float32", dropout=0.0)
    dataset = BinDataset(data_dir, 16, 65)
    want = np.mean([reference_loss(params0, f32_cfg, *get_batch(dataset, "train", 0, 4, 16, cfg.seed, eval_index=k))
                    for k in range(cfg.eval_iters)])
    got = eval_records(full_dir)[0]["train_loss"]  # the bf16 run's iter-0 eval, dropout off
    assert 1e-5 < abs(got - want) < 0.05, (got, want)


# ----------------------------------------------------------------------------- layouts and streams


@pytest.mark.slow
def test_scanned_run_checkpoints_gpt2_layout_and_resumes_either_way(data_dir, tmp_path):
    """scan_layers trains on stacked layers but saves GPT-2's per-layer layout: a scanned run
    resumes bitwise from its own checkpoint, a per-layer run resumes from it too, and sampling
    reads it as any other."""
    scanned = functools.partial(tiny, data_dir, scan_layers=True, dropout=0.1)
    full = train(scanned(tmp_path / "full"))
    train(scanned(tmp_path / "split", max_iters=10))
    params, model_cfg, _ = load_inference(tmp_path / "split")
    assert "h_0" in params and "h" not in params and not model_cfg.scan_layers
    resumed = train(scanned(tmp_path / "split", init_from="resume"))
    assert [r["loss"] for r in step_records(tmp_path / "split")] == [r["loss"] for r in step_records(tmp_path / "full")]
    assert resumed["val_loss"] == full["val_loss"]
    shutil.copytree(tmp_path / "split", tmp_path / "unscanned", ignore=shutil.ignore_patterns("metrics.jsonl"))
    shutil.rmtree(tmp_path / "unscanned" / "checkpoints" / "20")
    unscanned = tiny(data_dir, tmp_path / "unscanned", init_from="resume", dropout=0.1)
    run = setup(unscanned)
    restored = jax.device_get(run.state.params)
    run.close()
    saved, _, _ = load_inference(tmp_path / "unscanned")
    assert restored.keys() == saved.keys()
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(saved)):
        np.testing.assert_array_equal(a, b)
    # the same training, but dropout draws its masks per layer module here and per scan step there
    per_layer = train(unscanned)
    assert per_layer["iter"] == 20 and abs(per_layer["val_loss"] - full["val_loss"]) < 0.05 * full["val_loss"]


def test_initialisation_and_dropout_draw_separate_streams_from_the_seed(data_dir, tmp_path):
    from gptjax.model import init_params
    from gptjax.step import seed_keys

    run = setup(tiny(data_dir, tmp_path, dropout=0.1))
    init_key, dropout_key = seed_keys(1337)
    assert not np.array_equal(np.asarray(init_key), np.asarray(dropout_key))
    np.testing.assert_array_equal(np.asarray(run.state.rng), np.asarray(dropout_key))
    want = init_params(run.model_cfg, init_key)
    for a, b in zip(jax.tree_util.tree_leaves(run.state.params), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    run.close()
