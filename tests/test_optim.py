"""The optimizer is nanoGPT's: its get_lr schedule, its weight-decay split, and torch's AdamW
with clip_grad_norm_, step for step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import TrainConfig
from gptjax.model import GPTConfig, init_params
from gptjax.optim import decay_mask, lr_schedule, make_optimizer
from gptjax.torch_ref import nanogpt_lr

SCHED = TrainConfig(learning_rate=6e-4, min_lr=6e-5, warmup_iters=100, lr_decay_iters=1000)
TINY = GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(TINY, jax.random.PRNGKey(0))


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 550, 999, 1000, 1001, 5000])
def test_schedule_matches_nanogpt_get_lr(step):
    want = nanogpt_lr(step, SCHED)
    got = float(jax.jit(lr_schedule(SCHED))(jnp.int32(step)))
    assert got == pytest.approx(want, rel=1e-7, abs=0)


def test_schedule_matches_nanogpt_get_lr_at_every_step():
    steps = np.arange(0, 1200)
    got = np.asarray(jax.jit(jax.vmap(lr_schedule(SCHED)))(jnp.asarray(steps, jnp.int32)), np.float64)
    want = np.array([nanogpt_lr(int(s), SCHED) for s in steps])
    # the schedule runs in float32: near the end of the cosine, 1 + cos(pi * ratio) cancels, so the
    # error is bounded by float32 ulps of the peak rate, not relative to the (small) result
    np.testing.assert_allclose(got, want, rtol=0, atol=2 * float(np.spacing(np.float32(SCHED.learning_rate))))


def test_schedule_constant_without_decay():
    cfg = dataclasses.replace(SCHED, decay_lr=False)
    for step in (0, 99, 100, 1000, 5000):
        assert nanogpt_lr(step, cfg) == cfg.learning_rate
        assert float(lr_schedule(cfg)(step)) == pytest.approx(cfg.learning_rate, rel=1e-7, abs=0)


def test_nanogpt_lr_against_hand_computed_values():
    # warmup: 6e-4 * (9 + 1) / (100 + 1)
    assert nanogpt_lr(9, SCHED) == pytest.approx(6e-3 / 101, rel=1e-12)
    # halfway through the decay the cosine coefficient is exactly 1/2: 6e-5 + (6e-4 - 6e-5) / 2
    assert nanogpt_lr(550, SCHED) == pytest.approx(3.3e-4, rel=1e-12)
    # a quarter of the way: coefficient (1 + cos(pi/4)) / 2
    quarter = 6e-5 + 0.5 * (1 + math.sqrt(0.5)) * 5.4e-4
    assert nanogpt_lr(325, SCHED) == pytest.approx(quarter, rel=1e-12)
    assert nanogpt_lr(1001, SCHED) == 6e-5


def _named_leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_decay_mask_is_nanogpts_split(params):
    mask = _named_leaves(decay_mask(params))
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {k for k in mask if k.endswith("['kernel']") or k.endswith("['embedding']")}
    assert all(("['bias']" in k or "['scale']" in k or "ln_" in k) for k in mask if not mask[k])
    assert "['wte']['embedding']" in decayed and "['h_0']['attn']['c_attn']['kernel']" in decayed
    assert "['h_0']['ln_1']['scale']" not in decayed and "['h_1']['mlp']['c_fc']['bias']" not in decayed


def test_weight_decay_reaches_only_masked_params(params):
    """With zero gradients Adam's step is zero, so what moves is weight decay alone."""
    cfg = dataclasses.replace(SCHED, warmup_iters=0, learning_rate=1e-2, weight_decay=0.5)
    opt = make_optimizer(cfg)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for (name, p), q, decays in zip(_named_leaves(params).items(), _named_leaves(new).values(),
                                    _named_leaves(decay_mask(params)).values()):
        expected = np.asarray(p) * (1 - 1e-2 * 0.5) if decays else np.asarray(p)
        np.testing.assert_allclose(np.asarray(q), expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_adamw_matches_torch_configure_optimizers(params):
    """Three steps of make_optimizer against nanoGPT's torch recipe: AdamW with param groups (decay
    only on >= 2-D tensors), clip_grad_norm_, and the group lr set from get_lr each iteration.
    Measured difference ~6e-8 (float32 rounding); tolerance 1e-6 absolute."""
    torch = pytest.importorskip("torch")
    cfg = dataclasses.replace(SCHED, learning_rate=1e-2, min_lr=1e-3, warmup_iters=2, lr_decay_iters=10,
                              weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0)
    start = params
    names = list(_named_leaves(params))
    treedef = jax.tree_util.tree_structure(params)
    rng = np.random.default_rng(0)
    # global grad norms ~3 and ~0.3: the first and last step are clipped, the middle one is not
    grads_seq = []
    for scale in (3.0, 0.3, 5.0):
        g = [rng.standard_normal(np.shape(x)).astype(np.float32) for x in _named_leaves(params).values()]
        norm = math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g))
        grads_seq.append([x * np.float32(scale / norm) for x in g])

    torch_params = [torch.nn.Parameter(torch.tensor(np.asarray(x))) for x in _named_leaves(params).values()]
    groups = [{"params": [p for p in torch_params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in torch_params if p.dim() < 2], "weight_decay": 0.0}]
    torch_opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  foreach=False)

    opt = make_optimizer(cfg)
    opt_state = opt.init(params)
    update = jax.jit(opt.update)
    for it, grads in enumerate(grads_seq):
        for group in torch_opt.param_groups:
            group["lr"] = nanogpt_lr(it, cfg)
        for p, g in zip(torch_params, grads):
            p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(torch_params, cfg.grad_clip)
        torch_opt.step()

        updates, opt_state = update(jax.tree_util.tree_unflatten(treedef, [jnp.asarray(g) for g in grads]),
                                    opt_state, params)
        params = optax.apply_updates(params, updates)
        for name, ours, theirs in zip(names, jax.tree_util.tree_leaves(params), torch_params):
            np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=0, atol=1e-6,
                                       err_msg=f"iter {it} {name}")
    # the comparison is not vacuous: every parameter moved by far more than the tolerance
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(start))]
    assert min(moved) > 1e-3
