"""The modern recipe's options against their PyTorch definitions (tests/modern_ref.py): logits of
each piece alone and all together, KV-cache sampling with rotary positions, the scanned layout,
Muon's update against modded-nanogpt's, and the formats that cannot hold such a model.

Relative difference as in test_model: max|jax - torch| / max|torch| over all logits."""

import dataclasses

import jax
import numpy as np
import pytest

from gptjax import generate as G
from gptjax.config import TrainConfig
from gptjax.convert import save_hf, save_nanogpt
from gptjax.model import GPTConfig, init_params, num_params, to_scan_layout
from gptjax.optim import make_optimizer, param_groups
from gptjax.sampling_bench import generate_recompute
import test_train
from test_generate import prompts, spread_params
from test_model import F32_TOL, logits, random_params, rel_diff, tokens

data_dir = test_train.data_dir
compilation_cache = test_train.compilation_cache

# odd sizes: batch 3, 13 tokens, vocab 67, three heads of 12 (rotary needs an even head size)
ODD = GPTConfig(block_size=24, vocab_size=67, n_layer=2, n_head=3, n_embd=36)
MODERN = dict(pos_embedding="rotary", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
              logit_softcap=15.0, bias=False)
OPTIONS = [dict(pos_embedding="rotary"), dict(pos_embedding="rotary", rope_theta=100.0), dict(norm="rmsnorm"),
           dict(qk_norm=True), dict(activation="relu2"), dict(tie_embeddings=False), dict(logit_softcap=2.0),
           MODERN]


def torch_logits(cfg, params, idx_BxT):
    torch = pytest.importorskip("torch")
    import modern_ref

    model = modern_ref.load_params(modern_ref.GPT(cfg), jax.device_get(params))
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(idx_BxT), dtype=torch.long)).numpy()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_logits_match_pytorch(options):
    cfg = dataclasses.replace(ODD, **options)
    params = random_params(cfg, seed=3)
    idx = tokens(3, 13, cfg.vocab_size)
    ours = logits(params, cfg, idx)
    if cfg.logit_softcap:
        assert np.abs(ours).max() < cfg.logit_softcap  # the cap bit
    assert rel_diff(ours, torch_logits(cfg, params, idx)) < F32_TOL


def test_parameter_tree_of_the_options():
    params = init_params(dataclasses.replace(ODD, **MODERN), jax.random.PRNGKey(0))
    assert "wpe" not in params and params["lm_head"].shape == (36, 67)
    assert "ln_f" not in params and "ln_1" not in params["h_0"]  # RMSNorm without parameters
    # the untied head counts, the embedding lookup does not
    C, V = 36, 67
    assert num_params(params) == num_params(params, non_embedding=False) - V * C
    zero = init_params(dataclasses.replace(ODD, zero_init_proj=True), jax.random.PRNGKey(0))
    for block in ("h_0", "h_1"):
        assert not np.any(zero[block]["attn"]["c_proj"]["kernel"]) and not np.any(zero[block]["mlp"]["c_proj"]["kernel"])
        assert np.std(zero[block]["mlp"]["c_fc"]["kernel"]) > 0.01


@pytest.mark.parametrize("scan_layers", [False, True])
def test_rotary_cache_equals_recompute(scan_layers):
    cfg = dataclasses.replace(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32), **MODERN)
    params = spread_params(cfg, 2)
    prompt = prompts(2, 5, cfg.vocab_size)
    reference = generate_recompute(params, cfg, prompt, jax.random.PRNGKey(0), 24, temperature=0)
    if scan_layers:
        cfg, params = dataclasses.replace(cfg, scan_layers=True), to_scan_layout(params, cfg.n_layer)
    cached = np.asarray(G.generate(params, cfg, prompt, jax.random.PRNGKey(0), 24, temperature=0, key_bucket=4))
    np.testing.assert_array_equal(cached, reference)
    assert len(np.unique(cached)) > 4, "degenerate sequence: the check would be weak"


@pytest.mark.parametrize("save", [save_hf, save_nanogpt])
def test_gpt2_formats_refuse_the_modern_model(tmp_path, save):
    cfg = dataclasses.replace(ODD, pos_embedding="rotary", tie_embeddings=False)
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"cannot hold this model \(pos_embedding='rotary', tie_embeddings=False\)"):
        save(params, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_option_values():
    with pytest.raises(ValueError, match="head_size=5 .* is odd"):
        GPTConfig(n_embd=10, n_head=2, pos_embedding="rotary")
    with pytest.raises(ValueError, match="norm='batchnorm' must be one of 'layernorm', 'rmsnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="logit_softcap=-1.0 must be positive"):
        GPTConfig(logit_softcap=-1.0)
    with pytest.raises(ValueError, match="optimizer='sgd' must be one of 'adamw', 'muon'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"beta1=2.0 must be in \[0, 1\).*beta2=-1.0 must be in"):
        TrainConfig(beta1=2.0, beta2=-1.0)
    with pytest.raises(ValueError, match="set a positive learning_rate"):
        TrainConfig(optimizer="muon", learning_rate=0.0)


# ----------------------------------------------------------------------------- Muon


def muon_config(**kw):
    base = dict(optimizer="muon", learning_rate=3e-3, muon_lr=0.05, embedding_lr=0.01, head_lr=2e-3,
                weight_decay=0.1, grad_clip=0.0, decay_lr=False, beta1=0.8, beta2=0.95)
    return TrainConfig(**{**base, **kw})


def test_param_groups():
    params = init_params(dataclasses.replace(ODD, **{**MODERN, "bias": True}), jax.random.PRNGKey(0))
    groups = param_groups(params)
    assert groups["wte"]["embedding"] == "embedding" and groups["lm_head"] == "head"
    assert groups["h_0"]["attn"]["c_attn"]["kernel"] == "muon" and groups["h_1"]["mlp"]["c_proj"]["kernel"] == "muon"
    assert groups["h_0"]["attn"]["c_attn"]["bias"] == "adamw"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_muon_updates_match_modded_nanogpt(scan_layers):
    """Three steps on the same gradients: each block matrix moves by -muon_lr * modded-nanogpt's
    Muon update (q, k and v orthogonalised apart); the momentum's Nesterov terms bias-corrected as
    optax's scale_by_muon does (test_muon_first_step... checks the uncorrected formula)."""
    torch = pytest.importorskip("torch")
    import modern_ref

    cfg = dataclasses.replace(ODD, **MODERN)
    train_cfg = muon_config()
    params = random_params(cfg, seed=1)
    grads = [random_params(cfg, seed=10 + s, std=1.0) for s in range(3)]
    if scan_layers:
        params, grads = to_scan_layout(params, cfg.n_layer), [to_scan_layout(g, cfg.n_layer) for g in grads]
    opt = make_optimizer(train_cfg)
    state = opt.init(params)
    momentum = {}
    with jax.default_matmul_precision("highest"):
        for step, g in enumerate(grads, start=1):
            updates, state = jax.jit(opt.update)(g, state, params)
            for layer in range(cfg.n_layer):
                for module, name in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
                    if scan_layers:
                        grad = g["h"]["block"][module][name]["kernel"][layer]
                        got = updates["h"]["block"][module][name]["kernel"][layer]
                    else:
                        grad, got = g[f"h_{layer}"][module][name]["kernel"], updates[f"h_{layer}"][module][name]["kernel"]
                    # torch's (out, in) layout; c_attn as its three (C, C) matrices
                    parts = np.split(np.asarray(grad).T, 3) if name == "c_attn" else [np.asarray(grad).T]
                    want = []
                    for i, part in enumerate(parts):
                        buf = momentum.setdefault((layer, module, name, i), torch.zeros(part.shape))
                        want.append(modern_ref.muon_update(torch.from_numpy(part.copy()), buf, step).numpy())
                    want = -train_cfg.muon_lr * np.concatenate(want).T
                    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max(), rtol=0)


def test_muon_first_step_is_modded_nanogpts_exactly():
    """From zero momentum both Nesterov forms point along the gradient, so the first update is
    modded-nanogpt's own (no bias correction) within 1e-5."""
    torch = pytest.importorskip("torch")
    import modern_ref

    cfg = dataclasses.replace(ODD, **MODERN)
    params, grad = random_params(cfg, seed=1), random_params(cfg, seed=2, std=1.0)
    opt = make_optimizer(muon_config())
    with jax.default_matmul_precision("highest"):
        updates, _ = jax.jit(opt.update)(grad, opt.init(params), params)
    g = np.asarray(grad["h_0"]["mlp"]["c_fc"]["kernel"]).T
    want = modern_ref.muon_update(torch.from_numpy(g.copy()), torch.zeros(g.shape), 1, bias_correction=False)
    want = -0.05 * want.numpy().T
    np.testing.assert_allclose(np.asarray(updates["h_0"]["mlp"]["c_fc"]["kernel"]), want,
                               atol=1e-5 * np.abs(want).max(), rtol=0)


def test_muon_adamw_groups_take_their_own_learning_rates():
    """The AdamW groups are optax.adamw at embedding_lr / head_lr / learning_rate: each equals a
    plain AdamW of that rate on its leaves."""
    import optax

    cfg = dataclasses.replace(ODD, **{**MODERN, "bias": True})
    train_cfg = muon_config()
    params, grad = random_params(cfg, seed=1), random_params(cfg, seed=2, std=1.0)
    opt = make_optimizer(train_cfg)
    updates, _ = opt.update(grad, opt.init(params), params)
    for lr, pick in ((0.01, lambda t: t["wte"]["embedding"]), (2e-3, lambda t: t["lm_head"]),
                     (3e-3, lambda t: t["h_0"]["attn"]["c_attn"]["bias"])):
        decay = 0.1 if pick(params).ndim >= 2 else 0.0
        alone = optax.adamw(lr, b1=0.8, b2=0.95, eps=1e-8, weight_decay=decay)
        want, _ = alone.update(pick(grad), alone.init(pick(params)), pick(params))
        np.testing.assert_allclose(np.asarray(pick(updates)), np.asarray(want), rtol=1e-6)


# ----------------------------------------------------------------------------- whole training steps

STEPS = 20


def torch_modern_losses(cfg, params, batches):
    """The same training in PyTorch: modern_ref's model, modded-nanogpt's Muon (bias-corrected
    Nesterov, as optax's) on the block matrices, torch AdamW groups for the rest, nanoGPT's
    schedule scaled to each group's rate, global-norm clipping."""
    torch = pytest.importorskip("torch")
    import modern_ref

    from gptjax.torch_ref import nanogpt_lr

    model = modern_ref.load_params(modern_ref.GPT(cfg.model_config()), params)
    matrices = [lin.weight for block in model.h for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                            block.mlp.c_proj)]
    embeddings = [model.wte.weight] + ([model.wpe.weight] if model.wpe is not None else [])
    head = [model.lm_head.weight] if model.lm_head is not None else []
    taken = {id(p) for p in matrices + embeddings + head}
    rest = [p for p in model.parameters() if id(p) not in taken]
    groups = [(embeddings, cfg.embedding_lr), (head, cfg.head_lr), (rest, cfg.learning_rate)]
    adamw_groups = []
    for ps, lr in groups:
        for decayed in (True, False):  # nanoGPT's split: weight decay on 2-D parameters only
            chosen = [p for p in ps if (p.dim() >= 2) == decayed]
            if chosen:
                adamw_groups.append({"params": chosen, "weight_decay": cfg.weight_decay if decayed else 0.0,
                                     "base_lr": lr})
    adamw = torch.optim.AdamW(adamw_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    momenta = [[torch.zeros(part.shape) for part in (p.detach().chunk(3) if i % 4 == 0 else [p.detach()])]
               for i, p in enumerate(matrices)]
    losses = []
    for it, (x_AxBxT, y_AxBxT) in enumerate(batches):
        scale = nanogpt_lr(it, cfg) / cfg.learning_rate
        total = 0.0
        for x_BxT, y_BxT in zip(x_AxBxT, y_AxBxT):
            logits = model(torch.as_tensor(x_BxT, dtype=torch.long))
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)),
                                                     torch.as_tensor(y_BxT, dtype=torch.long).view(-1))
            (loss / len(x_AxBxT)).backward()
            total += loss.item() / len(x_AxBxT)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        with torch.no_grad():
            for i, p in enumerate(matrices):
                grads = p.grad.chunk(3) if i % 4 == 0 else [p.grad]  # c_attn: q, k and v apart
                update = torch.cat([modern_ref.muon_update(g.clone(), m, it + 1, cfg.muon_momentum)
                                    for g, m in zip(grads, momenta[i])])
                p.add_(update, alpha=-cfg.muon_lr * scale)
        for group in adamw.param_groups:
            group["lr"] = group["base_lr"] * scale
        adamw.step()
        model.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def test_training_steps_match_pytorch(data_dir, tmp_path):
    from gptjax.train import setup
    from test_train import tiny

    cfg = tiny(data_dir, tmp_path / "out", **MODERN, optimizer="muon", max_iters=STEPS, warmup_iters=3, lr_decay_iters=STEPS, learning_rate=3e-3,
               min_lr=3e-4, muon_lr=0.03, embedding_lr=0.02, head_lr=5e-3, weight_decay=0.1, grad_clip=1.0,
               beta1=0.8, beta2=0.95)
    run = setup(cfg)
    start = jax.device_get(run.state.params)
    batches = [run.batch("train", it) for it in range(STEPS)]
    ours = []
    with jax.default_matmul_precision("highest"):
        for batch in batches:
            run.state, metrics = run.train_step(run.state, run.to_device(batch))
            ours.append(float(metrics["loss"]))
    run.close()
    theirs = torch_modern_losses(cfg, start, batches)
    assert ours[-1] < ours[0] - 0.5  # it learned: the comparison is not of a stalled run
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


@pytest.mark.slow
def test_modern_run_resumes_bitwise_and_samples(data_dir, tmp_path):
    """A scanned Muon run stopped at 10 and resumed logs the losses of one run to 20 bitwise (the
    optimizer's state is in the checkpoint), and gptjax.sample reads it."""
    import shutil
    import subprocess
    import sys

    from gptjax.train import train
    from test_train import ROOT, step_records, tiny

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    run = lambda out, **kw: tiny(data, tmp_path / out, **MODERN, zero_init_proj=True, scan_layers=True,
                                 optimizer="muon", muon_lr=0.03, embedding_lr=0.02, **kw)
    full = train(run("full"))
    train(run("split", max_iters=10))
    resumed = train(run("split", init_from="resume"))
    assert [r["loss"] for r in step_records(tmp_path / "split")] == [r["loss"] for r in step_records(tmp_path / "full")]
    assert resumed["val_loss"] == full["val_loss"] < 3.5
    shutil.rmtree(data)  # sampling needs only the run (its meta.pkl)
    out = subprocess.run([sys.executable, "-m", "gptjax.sample", f"--out_dir={tmp_path / 'full'}", "--num_samples=1",
                          "--max_new_tokens=20", "--start=A"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split("---------------")[0].strip()) >= 20


def test_fine_tuning_gpt2_weights_refuses_modern_settings(data_dir, tmp_path):
    from gptjax.convert import save_hf as write_hf
    from gptjax.train import setup
    from test_train import tiny

    hf = tmp_path / "hf"
    write_hf(init_params(dataclasses.replace(ODD, vocab_size=65), jax.random.PRNGKey(0)),
             dataclasses.replace(ODD, vocab_size=65), hf)
    cfg = tiny(data_dir, tmp_path / "out", init_from=str(hf), n_layer=2, n_head=3, n_embd=36,
               block_size=16, pos_embedding="rotary", qk_norm=True)
    with pytest.raises(ValueError, match=r"cannot be run with pos_embedding='rotary', qk_norm=True: drop these"):
        setup(cfg)


SHARED_MUON = r"""
import dataclasses, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from gptjax import sharding
from gptjax.model import to_scan_layout
from gptjax.optim import make_optimizer
from test_modern import MODERN, ODD, muon_config
from test_model import random_params

cfg = dataclasses.replace(ODD, **MODERN, n_layer=4)
params = to_scan_layout(random_params(cfg, seed=1), 4)
grads = to_scan_layout(random_params(cfg, seed=2, std=1.0), 4)
mesh = sharding.make_mesh(2, 1)
params, grads = jax.device_put((params, grads), sharding.replicated(mesh))  # as a run's train state
with jax.default_matmul_precision("highest"):
    outs = []
    for m in (None, mesh):
        opt = make_optimizer(muon_config(), m)
        update = jax.jit(opt.update)
        outs.append(update(grads, opt.init(params), params)[0])
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
# the split run's block updates come out split by layer: each device computed its own share
kernel = outs[1]["h"]["block"]["mlp"]["c_fc"]["kernel"]
print(kernel.sharding.shard_shape(kernel.shape)[0], outs[0]["h"]["block"]["mlp"]["c_fc"]["kernel"].is_fully_replicated)
"""


@pytest.mark.slow
def test_muon_shares_the_layers_out_over_the_devices(tmp_path):
    """With the run's mesh, each of 2 devices orthogonalises half of a scanned model's layers: the
    same updates as without."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(__file__)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([tests, os.path.dirname(tests)])}
    out = subprocess.run([sys.executable, "-c", SHARED_MUON, tests], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "2 True"  # 2 of the 4 layers per device; unsplit: whole
