"""gptjax.model numerics against PyTorch: HF GPT2LMHeadModel and nanoGPT's model on the same
random weights, causality, parameter counts, nanoGPT's init, dropout and crop_block_size.

Relative difference everywhere: max|jax - torch| / max|torch| over all logits."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import kernels
from gptjax.convert import load_hf, load_nanogpt, params_from_state_dict
from gptjax.model import GPT, GPTConfig, crop_block_size, init_params, num_params

F32_TOL = 1e-4
BF16_TOL = 5e-2  # bf16 keeps ~3 significant digits; errors compound over layers


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize_(model, seed: int, std: float = 0.2):
    """Every parameter random (LayerNorm weights around 1), so no mapping hides behind a zero."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ".ln_" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))
    return model.eval()


def random_params(cfg: GPTConfig, seed: int = 0, std: float = 0.2) -> dict:
    """Every leaf random (LayerNorm scales around 1, biases nonzero) so a swapped or dropped
    tensor shows; numpy-drawn on init_params' shapes, which skips compiling JAX's RNG."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))

    def draw(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + std * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tokens(B, T, V, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def logits(params, cfg, idx_BxT, **kw):
    with jax.default_matmul_precision("highest"):  # a float32 check: no TF32 when run on a GPU
        return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(idx_BxT), **kw))


HF_CASES = [
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=97, activation_function="gelu_new"),
    dict(n_layer=1, n_head=3, n_embd=48, vocab_size=64, activation_function="gelu"),
    dict(n_layer=3, n_head=2, n_embd=32, vocab_size=80, activation_function="gelu_new",
         layer_norm_epsilon=1e-3),
]


@pytest.fixture(scope="module", params=range(len(HF_CASES)), ids=lambda i: f"hf{i}")
def hf_model(request, tmp_path_factory):
    """A random GPT2LMHeadModel saved with save_pretrained, its torch logits and the import."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hc = transformers.GPT2Config(
        n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, **HF_CASES[request.param],
    )
    model = randomize_(transformers.GPT2LMHeadModel(hc), seed=request.param)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    idx = tokens(2, 16, hc.vocab_size, seed=request.param)
    with torch.no_grad():
        ref = model(torch.as_tensor(idx)).logits.numpy()
    params, cfg = load_hf(path)
    return params, cfg, idx, ref


def test_logits_match_hf_float32(hf_model):
    params, cfg, idx, ref = hf_model
    out = logits(params, cfg, idx)
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    assert rel_diff(out, ref) < F32_TOL


def test_logits_match_hf_bfloat16(hf_model):
    params, cfg, idx, ref = hf_model
    out = logits(params, dataclasses.replace(cfg, dtype="bfloat16"), idx)
    assert out.dtype == np.float32
    err = rel_diff(out, ref)
    assert err < BF16_TOL
    assert err > 1e-6  # bf16 compute really happened


@pytest.mark.parametrize("bias", [False, True])
def test_logits_match_nanogpt(bias, tmp_path):
    """nanoGPT's model (exact GELU, bias on/off) -> ckpt.pt -> gptjax, same logits."""
    torch = pytest.importorskip("torch")
    from gptjax import torch_ref

    tc = torch_ref.GPTConfig(block_size=16, vocab_size=72, n_layer=2, n_head=4, n_embd=32, bias=bias)
    model = randomize_(torch_ref.GPT(tc), seed=int(bias))
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(tc)}, tmp_path / "ckpt.pt")
    params, cfg = load_nanogpt(tmp_path / "ckpt.pt")
    assert cfg.activation == "gelu" and cfg.bias == bias
    idx = tokens(3, 16, 72)
    with torch.no_grad():
        ref, loss = model(torch.as_tensor(idx), torch.as_tensor(idx))
    assert ref.shape == (3, 16, 72)
    assert rel_diff(logits(params, cfg, idx), ref.numpy()) < F32_TOL


@pytest.mark.parametrize("T, bias", [(16, True), (64, True), (64, False)])
def test_loss_and_gradients_match_nanogpt(T, bias, tmp_path):
    """The backward pass of the CPU's kernels (gptjax.cpu's weight-gradient layout and, at T 64,
    causal attention in 2 query blocks) against torch autograd through nanoGPT's model: the loss
    and every parameter's gradient, float32."""
    torch = pytest.importorskip("torch")
    from gptjax import torch_ref
    from gptjax.convert import nanogpt_state_dict
    from gptjax.step import loss_fn

    tc = torch_ref.GPTConfig(block_size=T, vocab_size=72, n_layer=2, n_head=4, n_embd=32, bias=bias)
    model = randomize_(torch_ref.GPT(tc), seed=3, std=0.1)
    torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(tc)}, tmp_path / "ckpt.pt")
    params, cfg = load_nanogpt(tmp_path / "ckpt.pt")
    x, y = tokens(3, T, 72, seed=4), tokens(3, T, 72, seed=5)
    _, ref_loss = model(torch.as_tensor(x), torch.as_tensor(y))
    ref_loss.backward()
    with jax.default_matmul_precision("highest"):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(
            params, GPT(cfg, kernels.for_inference(cfg)), jnp.asarray(x), jnp.asarray(y))
    assert abs(float(loss) - ref_loss.item()) < 1e-5 * ref_loss.item()
    ours = nanogpt_state_dict(grads, cfg)
    checked = 0
    for name, p in model.named_parameters():
        ref = p.grad.numpy()
        assert np.abs(ref).max() > 0, name
        assert rel_diff(ours[name].numpy(), ref) < F32_TOL, name
        checked += 1
    assert checked == len(jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_matches_torch_with_its_gradient(approximate):
    torch = pytest.importorskip("torch")
    from gptjax.layers import gelu

    x = np.linspace(-9.0, 9.0, 4001, dtype=np.float32)
    xt = torch.tensor(x, requires_grad=True)
    ref = torch.nn.functional.gelu(xt, approximate="tanh" if approximate else "none")
    ref.backward(torch.ones_like(ref))
    ours, grad = jax.jit(jax.value_and_grad(lambda x: gelu(x, approximate).sum()))(jnp.asarray(x))
    ours_each = np.asarray(jax.jit(lambda x: gelu(x, approximate))(jnp.asarray(x)))
    np.testing.assert_allclose(ours_each, ref.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=1e-5, atol=1e-5)  # d/dx is O(1)


def test_causal():
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    params = random_params(cfg)
    idx = tokens(2, 16, 64)
    changed = idx.copy()
    changed[:, 9:] = (changed[:, 9:] + 1 + tokens(2, 7, 60, seed=1)) % 64
    a, b = logits(params, cfg, idx), logits(params, cfg, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert np.abs(a[:, 9:] - b[:, 9:]).min(axis=-1).max() > 0  # later positions do see the change


def test_logits_at_one_or_several_positions_per_row_are_the_full_forwards():
    """The head applied only at the positions asked for: one per row (B, V) or K per row (B, K, V),
    repeated positions included, equal to the full forward's logits there."""
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    params = random_params(cfg, seed=2)
    idx = tokens(3, 16, 64, seed=3)
    full_BxTxV = logits(params, cfg, idx)
    one_B = np.array([15, 0, 7])
    at_BxK = np.array([[12, 13, 14, 15], [0, 0, 1, 2], [3, 9, 9, 5]])
    apply = jax.jit(lambda p, x, at: GPT(cfg).apply({"params": p}, x, logits_at=at))
    np.testing.assert_allclose(np.asarray(apply(params, idx, one_B)), full_BxTxV[np.arange(3), one_B],
                               rtol=1e-5, atol=1e-5)
    at_logits_BxKxV = np.asarray(apply(params, idx, at_BxK))
    assert at_logits_BxKxV.shape == (3, 4, 64)
    np.testing.assert_allclose(at_logits_BxKxV, np.take_along_axis(full_BxTxV, at_BxK[..., None], axis=1),
                               rtol=1e-5, atol=1e-5)


def test_causal_gradient():
    """d logits[t] / d (embeddings at positions > t) is exactly zero."""
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    params = random_params(cfg, seed=1)
    idx = jnp.asarray(tokens(2, 16, 64))
    t = 3

    def head_t(wpe):
        p = dict(params, wpe={"embedding": wpe})
        return GPT(cfg).apply({"params": p}, idx)[:, t].sum()

    grad_TxC = jax.jit(jax.grad(head_t))(params["wpe"]["embedding"])
    assert np.all(np.asarray(grad_TxC[t + 1:]) == 0)
    assert np.all(np.abs(np.asarray(grad_TxC[: t + 1])).sum(axis=-1) > 0)


@pytest.mark.parametrize("bias", [False, True])
def test_param_count_matches_pytorch(bias):
    pytest.importorskip("torch")
    from gptjax import torch_ref

    kw = dict(block_size=24, vocab_size=50, n_layer=3, n_head=3, n_embd=48, bias=bias)
    ref = torch_ref.GPT(torch_ref.GPTConfig(**kw))
    params = jax.eval_shape(lambda key: init_params(GPTConfig(**kw), key), jax.random.key(0))
    assert num_params(params, non_embedding=False) == sum(p.numel() for p in ref.parameters())
    assert num_params(params) == ref.get_num_params(non_embedding=True)


def test_init_matches_nanogpt_scheme():
    """std 0.02 for embeddings and Dense kernels, 0.02/sqrt(2L) for residual projections,
    zero biases, unit LayerNorm scales; the torch reference gets the same statistics."""
    L = 4
    cfg = GPTConfig(block_size=64, vocab_size=512, n_layer=L, n_head=4, n_embd=128)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))  # jit: faster than eager
    proj = 0.02 / math.sqrt(2 * L)
    h = params["h_1"]
    expected = {
        "wte": (params["wte"]["embedding"], 0.02),
        "c_attn": (h["attn"]["c_attn"]["kernel"], 0.02),
        "c_fc": (h["mlp"]["c_fc"]["kernel"], 0.02),
        "attn.c_proj": (h["attn"]["c_proj"]["kernel"], proj),
        "mlp.c_proj": (h["mlp"]["c_proj"]["kernel"], proj),
    }
    for name, (w, std) in expected.items():
        w = np.asarray(w)
        assert abs(w.std() / std - 1) < 0.03, name
        assert abs(w.mean()) < 5 * std / math.sqrt(w.size), name
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [k.key for k in path]
        if keys[-1] == "bias":
            assert np.all(np.asarray(leaf) == 0), keys
        if keys[-1] == "scale":
            assert np.all(np.asarray(leaf) == 1), keys

    pytest.importorskip("torch")
    from gptjax import torch_ref

    ref = torch_ref.GPT(torch_ref.GPTConfig(block_size=64, vocab_size=512, n_layer=L, n_head=4, n_embd=128))
    blk = ref.transformer.h[1]
    for name, w, std in [
        ("wte", ref.transformer.wte.weight, 0.02), ("c_attn", blk.attn.c_attn.weight, 0.02),
        ("attn.c_proj", blk.attn.c_proj.weight, proj), ("mlp.c_proj", blk.mlp.c_proj.weight, proj),
    ]:
        assert abs(w.detach().numpy().std() / std - 1) < 0.03, name
    assert float(blk.attn.c_attn.bias.detach().abs().max()) == 0
    assert float(blk.ln_1.weight.detach().min()) == 1


def test_dropout_uses_rng_only_when_not_deterministic():
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.2)
    params = random_params(cfg)
    idx = tokens(2, 16, 64)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    train1 = logits(params, cfg, idx, deterministic=False, rngs={"dropout": k1})
    train1b = logits(params, cfg, idx, deterministic=False, rngs={"dropout": k1})
    train2 = logits(params, cfg, idx, deterministic=False, rngs={"dropout": k2})
    evaluated = logits(params, cfg, idx, deterministic=True)
    no_dropout = logits(params, dataclasses.replace(cfg, dropout=0.0), idx)
    np.testing.assert_array_equal(train1, train1b)
    assert rel_diff(train1, train2) > 1e-3
    assert rel_diff(train1, evaluated) > 1e-3
    np.testing.assert_array_equal(evaluated, no_dropout)


def test_crop_block_size_keeps_first_positions():
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    params = random_params(cfg, seed=3)
    idx = tokens(2, 16, 64)
    cropped, small = crop_block_size(params, cfg, 8)
    assert small.block_size == 8 and cropped["wpe"]["embedding"].shape == (8, 32)
    # float32 reassociation only: the products run over 8 instead of 16 keys
    np.testing.assert_allclose(logits(cropped, small, idx[:, :8]), logits(params, cfg, idx)[:, :8],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        crop_block_size(params, cfg, 32)
    with pytest.raises(ValueError, match="block_size"):
        logits(cropped, small, idx)


def test_torch_reference_generate_is_greedy_argmax_of_gptjax():
    """top_k=1 sampling in the nanoGPT reference picks gptjax's argmax at every step."""
    torch = pytest.importorskip("torch")
    from gptjax import torch_ref

    tc = torch_ref.GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    model = randomize_(torch_ref.GPT(tc), seed=5)
    prompt = torch.as_tensor(tokens(2, 4, 64, seed=5))
    out = model.generate(prompt, max_new_tokens=8, top_k=1).numpy()
    assert out.shape == (2, 12) and np.array_equal(out[:, :4], prompt.numpy())
    params = params_from_state_dict(model.state_dict(), GPTConfig(**dataclasses.asdict(tc)))
    greedy = logits(params, GPTConfig(**dataclasses.asdict(tc)), out).argmax(-1)
    np.testing.assert_array_equal(out[:, 4:], greedy[:, 3:-1])
