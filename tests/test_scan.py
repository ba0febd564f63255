"""Speed options change how the model is computed, never what: scan over layers, remat; and the
scanned model decodes on a KV cache like the per-layer one."""

import dataclasses

import jax
import numpy as np
import pytest

from gptjax.config import TrainConfig
from gptjax.kvcache import init_cache
from gptjax.model import GPT, GPTConfig, init_params, to_gpt2_layout, to_scan_layout
from gptjax.optim import decay_mask, make_optimizer
from gptjax.step import loss_fn

CFG = GPTConfig(block_size=16, vocab_size=64, n_layer=3, n_head=4, n_embd=32, dropout=0.0)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, CFG.vocab_size)


def test_stack_unstack_round_trip_is_exact(params):
    back = to_gpt2_layout(to_scan_layout(params, CFG.n_layer))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_scan_init_has_the_stacked_layout():
    scan_cfg = dataclasses.replace(CFG, scan_layers=True)
    shapes = jax.eval_shape(lambda k: init_params(scan_cfg, k), jax.random.PRNGKey(0))
    assert set(shapes) == {"wte", "wpe", "h", "ln_f"}
    assert shapes["h"]["block"]["mlp"]["c_fc"]["kernel"].shape == (3, 32, 128)


@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat="full"), dict(remat="dots"),
                                     dict(scan_layers=True, remat="dots")])
def test_variant_matches_plain_model_loss_and_grads(variant, params, tokens):
    """Same loss within 1e-6 and gradients within 1e-5 (float32 reassociation only)."""
    cfg = dataclasses.replace(CFG, **variant)
    p = to_scan_layout(params, CFG.n_layer) if cfg.scan_layers else params
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, GPT(CFG), tokens, tokens)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(p, GPT(cfg), tokens, tokens)
    if cfg.scan_layers:
        grads = to_gpt2_layout(grads)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_scan_with_dropout_is_deterministic_per_key_and_differs_across_layers(params, tokens):
    cfg = dataclasses.replace(CFG, scan_layers=True, dropout=0.5)
    p = to_scan_layout(params, CFG.n_layer)
    run = lambda k: GPT(cfg).apply({"params": p}, tokens, deterministic=False, rngs={"dropout": k})
    a, b, c = run(jax.random.PRNGKey(5)), run(jax.random.PRNGKey(5)), run(jax.random.PRNGKey(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    eval_logits = GPT(cfg).apply({"params": p}, tokens)
    np.testing.assert_allclose(eval_logits, GPT(CFG).apply({"params": params}, tokens), atol=1e-5)


def test_weight_decay_mask_ignores_the_layer_axis(params):
    plain = decay_mask(params)
    stacked = decay_mask(to_scan_layout(params, CFG.n_layer))
    assert stacked["h"]["block"]["attn"]["c_attn"]["kernel"] is True
    assert stacked["h"]["block"]["attn"]["c_attn"]["bias"] is False
    assert stacked["h"]["block"]["ln_1"]["scale"] is False
    per_layer = jax.tree_util.tree_leaves(plain["h_0"])
    assert jax.tree_util.tree_leaves(stacked["h"]["block"]) == per_layer
    assert stacked["wte"]["embedding"] is True and stacked["ln_f"]["bias"] is False


@pytest.mark.slow
def test_optimizer_update_is_the_same_with_scan(params, tokens):
    """One AdamW step (with weight decay and clipping) lands on the same parameters."""
    opt = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_iters=0, weight_decay=0.1))
    grads = jax.grad(loss_fn)(params, GPT(CFG), tokens, tokens)
    updates, _ = opt.update(grads, opt.init(params), params)
    s_params = to_scan_layout(params, CFG.n_layer)
    s_grads = to_scan_layout(grads, CFG.n_layer)
    s_updates, _ = opt.update(s_grads, opt.init(s_params), s_params)
    for a, b in zip(jax.tree_util.tree_leaves(to_gpt2_layout(s_updates)), jax.tree_util.tree_leaves(updates)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_layout_conversions_reach_every_params_shaped_tree_of_a_train_state(params):
    """Adam's moments are shaped like the parameters: a whole optimizer state converts, and back."""
    opt = make_optimizer(TrainConfig(learning_rate=1e-2, warmup_iters=0))
    state = {"params": params, "opt": opt.init(params), "step": np.int32(3)}
    scanned = to_scan_layout(state, CFG.n_layer)
    mu = scanned["opt"][1][0].mu  # clip_by_global_norm, then AdamW's scale_by_adam
    assert mu["h"]["block"]["mlp"]["c_fc"]["kernel"].shape == (3, 32, 128)
    assert to_scan_layout(scanned, CFG.n_layer) is not scanned and "h" in to_scan_layout(scanned, CFG.n_layer)["params"]
    back = to_gpt2_layout(scanned)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_model_decodes_on_a_cache_as_the_full_forward(remat, params, tokens):
    """Prefill 10 tokens, then one at a time: the scanned (and rematerialised) model's cached
    logits equal its full forward's, within 1e-5."""
    cfg = dataclasses.replace(CFG, scan_layers=True, remat=remat)
    p = to_scan_layout(params, CFG.n_layer)
    model = GPT(cfg)
    full = model.apply({"params": p}, tokens)
    logits, cache = model.apply({"params": p}, tokens[:, :10], cache=init_cache(cfg, tokens.shape[0]))
    np.testing.assert_allclose(logits, full[:, :10], atol=1e-5)
    assert [block.shape for block in cache.kv["k"]] == [(3, 4, 4, 16, 8)]  # one block (L, B, N, S, H)
    for t in range(10, 16):
        logits, cache = model.apply({"params": p}, tokens[:, t:t + 1], cache=cache.replace(pos=t))
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
