"""gptjax.generate: the KV-cache loop samples exactly what nanoGPT's recompute-everything generate
(and Hugging Face's) would, inside and past block_size, batched, ragged, filtered and stopped."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import generate as G
from gptjax import kvcache
from gptjax.kernels import Kernels
from gptjax.kvcache import KVCache, init_cache
from gptjax.model import GPT, GPTConfig, init_params, to_scan_layout
from gptjax.sampling_bench import generate_recompute

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
# cached vs recomputed float32 logits: different attention code paths and summation orders
ATOL, RTOL = 1e-5, 1e-4


def spread_params(cfg, seed=0):
    """Random weights large enough that greedy decoding wanders over many tokens (nanoGPT's 0.02
    init makes a tiny random model repeat one token, which would prove little)."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    new = []
    for (path, x), k in zip(leaves, keys):
        name = jax.tree_util.keystr(path)
        noise = jax.random.normal(k, x.shape)
        if "kernel" in name:
            new.append(2.0 * noise / np.sqrt(x.shape[0]))
        elif "embedding" in name:
            new.append(0.3 * noise)
        elif "scale" in name:
            new.append(1.0 + 0.1 * noise)
        else:
            new.append(0.1 * noise)
    return jax.tree_util.tree_unflatten(treedef, new)


def prompts(B, T, vocab, seed=1):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, vocab), np.int32)


@pytest.fixture(scope="module")
def tiny_params():
    return spread_params(TINY)


@pytest.mark.parametrize(
    "cfg, T, N, seed",
    [
        (TINY, 5, 30, 0),  # runs 19 tokens past block_size: incremental, then the recompute regime
        (dataclasses.replace(TINY, n_layer=1, n_head=4, bias=False, activation="gelu_tanh"), 3, 10, 1),
        (TINY, 21, 6, 0),  # prompt longer than block_size: cropped as nanoGPT
    ],
)
@pytest.mark.parametrize("key_bucket", [None, 4])  # 4: the cache in blocks of 4 rows
def test_greedy_cache_equals_recompute(cfg, T, N, seed, key_bucket):
    params = spread_params(cfg, seed)
    prompt = prompts(2, T, cfg.vocab_size)
    cached = np.asarray(G.generate(params, cfg, prompt, jax.random.PRNGKey(0), N, temperature=0,
                                   key_bucket=key_bucket))
    reference = generate_recompute(params, cfg, prompt, jax.random.PRNGKey(0), N, temperature=0)
    assert cached.shape == (2, N)
    np.testing.assert_array_equal(cached, reference)
    assert len(np.unique(cached)) > min(N, 8) // 2, "degenerate sequence: the check would be weak"


@pytest.mark.parametrize("key_bucket", [G.default_key_bucket(TINY), 3])  # 3: the cache in blocks of 3 rows
def test_cached_logits_match_full_forward(tiny_params, key_bucket):
    """Teacher-forced: at every context length, the prefill / one-token decode / cropped-window
    logits the loop uses equal GPT.__call__ on the cropped context (rows of unequal length)."""
    cfg, bs = TINY, TINY.block_size
    model = GPT(cfg)
    apply = jax.jit(model.apply)
    window = jax.jit(functools.partial(G._window_logits, model), static_argnums=(3,))
    layout = init_cache(cfg, 2, key_bucket=key_bucket).kv  # the blocks the window's cache fills

    @jax.jit
    def decode(params, tok_BxT, kv, pos):
        logits, cache = model.apply(params, tok_BxT, cache=KVCache(kv, pos))
        return logits, cache.kv
    ctx_BxM = prompts(2, 26, cfg.vocab_size, seed=3)
    len_B = np.array([3, 7], np.int32)

    inside_BxbsxV = apply({"params": tiny_params}, ctx_BxM[:, :bs])

    def full(b, L):  # nanoGPT: forward the last block_size tokens, read the last position
        if L <= bs:  # causal: position L-1 of a longer forward is the forward of the first L
            return inside_BxbsxV[b, L - 1]
        return apply({"params": tiny_params}, ctx_BxM[b : b + 1, L - bs : L])[0, -1]

    logits_BxV, kv = window(tiny_params, ctx_BxM, len_B, 7, layout)
    for b in range(2):
        np.testing.assert_allclose(logits_BxV[b], full(b, len_B[b]), atol=ATOL, rtol=RTOL)
    checked = 0
    for t in range(1, 26 - 7):
        L_B = len_B + t
        tok_B = ctx_BxM[np.arange(2), L_B - 1]
        # rows at their own positions in one call
        inc_Bx1xV, kv = decode({"params": tiny_params}, tok_B[:, None], kv, np.minimum(L_B - 1, bs - 1))
        inc_BxV = inc_Bx1xV[:, 0]
        win_BxV, _ = window(tiny_params, ctx_BxM, L_B, bs, layout)
        for b in range(2):
            want = full(b, L_B[b])
            np.testing.assert_allclose(win_BxV[b], want, atol=ATOL, rtol=RTOL)
            if L_B[b] <= bs:  # past the block the cache is stale by design
                np.testing.assert_allclose(inc_BxV[b], want, atol=ATOL, rtol=RTOL)
                checked += 1
    assert checked > 10
    # one shared position for every row (equal prompts) against the same reference
    for key_bucket in (0, key_bucket):
        kv = init_cache(cfg, 2, key_bucket=key_bucket).kv
        for L in range(1, bs + 1):
            step_Bx1xV, kv = decode({"params": tiny_params}, ctx_BxM[:, L - 1 : L], kv, L - 1)
            for b in range(2):
                np.testing.assert_allclose(step_Bx1xV[b, 0], full(b, L), atol=ATOL, rtol=RTOL)


def test_cache_blocks_take_new_rows_as_one_whole_cache():
    """Rows written into a cache in blocks of 5 (of 16 positions), one token or three, at one
    position for every row or one per row: exactly what writing into the whole cache and
    splitting it gives; every other row of every block keeps its value."""
    cache_BxNxSxH = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 16, 4))
    blocks = tuple(cache_BxNxSxH[:, :, i:i + 5] for i in range(0, 16, 5))
    write = jax.jit(kvcache.write)

    def whole(new_BxNxTxH, pos):  # each row written into its whole cache at its position
        return np.stack([jax.lax.dynamic_update_slice_in_dim(cache_BxNxSxH[b], new_BxNxTxH[b], p, 1)
                         for b, p in enumerate(np.broadcast_to(pos, (3,)))])

    for T, positions in ((1, [0, 4, 5, 9, 15, np.array([0, 7, 15])]), (3, [0, 4, 13, np.array([0, 4, 13])])):
        new_BxNxTxH = jax.random.normal(jax.random.PRNGKey(T), (3, 2, T, 4))
        for pos in positions:
            got = write(blocks, new_BxNxTxH, jnp.asarray(pos))
            assert [b.shape[2] for b in got] == [5, 5, 5, 1]
            np.testing.assert_array_equal(np.concatenate(got, axis=2), whole(new_BxNxTxH, pos))


def test_matches_huggingface_greedy():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # spread the weights out so greedy decoding is not one repeated token
        for name, p in hf.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3 if "wte" in name or "wpe" in name else 2.0 * p.shape[0] ** -0.5)
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)  # LayerNorm scale / biases
    sd = {k: v.detach().numpy() for k, v in hf.transformer.state_dict().items()}
    cfg = GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=32, activation="gelu_tanh")
    params = {"wte": {"embedding": sd["wte.weight"]}, "wpe": {"embedding": sd["wpe.weight"]},
              "ln_f": {"scale": sd["ln_f.weight"], "bias": sd["ln_f.bias"]}}
    for i in range(2):
        p = lambda n: sd[f"h.{i}.{n}"]  # noqa: E731  (HF Conv1D weights are (in, out) like ours)
        params[f"h_{i}"] = {
            "ln_1": {"scale": p("ln_1.weight"), "bias": p("ln_1.bias")},
            "ln_2": {"scale": p("ln_2.weight"), "bias": p("ln_2.bias")},
            "attn": {n: {"kernel": p(f"attn.{n}.weight"), "bias": p(f"attn.{n}.bias")}
                     for n in ("c_attn", "c_proj")},
            "mlp": {n: {"kernel": p(f"mlp.{n}.weight"), "bias": p(f"mlp.{n}.bias")} for n in ("c_fc", "c_proj")},
        }
    prompt = prompts(2, 6, 100, seed=5)
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False, max_new_tokens=20,
                           attention_mask=torch.ones(prompt.shape, dtype=torch.long))[:, 6:].numpy()
    got = G.generate(params, cfg, prompt, jax.random.PRNGKey(0), 20, temperature=0, vocab_limit=100)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert len(np.unique(want)) > 8


def test_seeds_streaming_and_top_k_1(tiny_params):
    cfg = TINY
    prompt = prompts(2, 5, cfg.vocab_size)  # the shapes of the first greedy case: no new compile

    def run(seed, **kw):
        return np.asarray(G.generate(tiny_params, cfg, prompt, jax.random.PRNGKey(seed), 30, **kw))

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5
    chunks = list(G.generate_stream(tiny_params, cfg, prompt, jax.random.PRNGKey(7), 30, chunk_size=8))
    assert [x.shape[1] for x in chunks] == [8, 8, 8, 6]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), a)
    # same fold_in keys and sampler: the recompute reference draws the same samples
    reference = generate_recompute(tiny_params, cfg, prompt, jax.random.PRNGKey(7), 30)
    np.testing.assert_array_equal(reference, a)
    greedy = run(0, temperature=0)
    np.testing.assert_array_equal(run(3, top_k=1, temperature=0.9), greedy)
    np.testing.assert_array_equal(run(3, top_p=1e-6), greedy)  # a nucleus of one token


def test_kth_largest_equals_lax_top_k():
    x_BxV = jax.random.normal(jax.random.PRNGKey(0), (4, 300)) * 3
    x_BxV = x_BxV.at[0, :40].set(-jnp.inf).at[1, 10:20].set(1.5).at[2, :5].set(0.0).at[2, 5:9].set(-0.0)
    kth_largest = jax.jit(G._kth_largest)
    for k in (1, 2, 7, 12, 150, 300):
        np.testing.assert_array_equal(kth_largest(x_BxV, k), jax.lax.top_k(x_BxV, k)[0][:, -1:])
    # top-k sampling never leaves the k most likely tokens (ties aside, and there are none here)
    tok = np.asarray(jax.jit(G.sample_logits)(jnp.tile(x_BxV[3:], (5000, 1)), jax.random.PRNGKey(1),
                                              G.Sampling(temperature=2.0, top_k=5)))
    assert set(tok.tolist()) == set(np.asarray(jax.lax.top_k(x_BxV[3], 5)[1]).tolist())


def test_top_p_filter_on_known_logits():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)
    perm = np.array([3, 0, 4, 1, 2])  # shuffled so sorting is exercised
    logits_1xV = jnp.asarray(np.log(probs[perm]))[None]
    cases = [(0.5, {0}), (0.6, {0, 1}), (0.71, {0, 1, 2}), (0.9, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})]
    for top_p, nucleus in cases:
        kept = np.isfinite(np.asarray(G.filter_logits(logits_1xV, G.Sampling(top_p=top_p))[0]))
        assert {int(perm[i]) for i in np.flatnonzero(kept)} == nucleus, top_p
    # top-k then top-p, as HF: of the top 2 (renormalised 5/7, 2/7), 0.7 keeps just one
    kept = np.isfinite(np.asarray(G.filter_logits(logits_1xV, G.Sampling(top_k=2, top_p=0.7))[0]))
    assert {int(perm[i]) for i in np.flatnonzero(kept)} == {0}
    # statistically: 20000 draws land only in the nucleus, in proportion to the renormalised probs
    logits_BxV = jnp.tile(logits_1xV, (20000, 1))
    tok = np.asarray(G.sample_logits(logits_BxV, jax.random.PRNGKey(0), G.Sampling(top_p=0.71)))
    freq = np.bincount(perm[tok], minlength=5) / tok.size
    np.testing.assert_allclose(freq, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0], atol=0.015)


def test_padded_vocab_never_sampled(tiny_params):
    # the padded ids are made the model's favourites: only the mask keeps them out
    params = dict(tiny_params, wte={"embedding": tiny_params["wte"]["embedding"].at[50:].multiply(5.0)})
    prompt = prompts(2, 5, 50)
    out = np.concatenate([np.asarray(G.generate(params, TINY, prompt, jax.random.PRNGKey(seed), 30,
                                                temperature=1.5, vocab_limit=50)) for seed in range(4)])
    unmasked = np.asarray(G.generate(params, TINY, prompt, jax.random.PRNGKey(0), 30, temperature=1.5))
    assert out.max() < 50 and len(np.unique(out)) > 20 and (unmasked >= 50).mean() > 0.2
    logits_BxV = jnp.zeros((5000, 64)).at[:, 50:].set(10.0)
    tok = np.asarray(G.sample_logits(logits_BxV, jax.random.PRNGKey(1), G.Sampling(1.5, vocab_limit=50)))
    assert tok.max() < 50 and len(np.unique(tok)) == 50
    assert G.default_vocab_limit(GPTConfig()) == 50257 and G.default_vocab_limit(TINY) == 64


def test_stop_token_rows_stop_independently(tiny_params):
    cfg = TINY
    prompt = prompts(4, 3, cfg.vocab_size, seed=11)
    key = jax.random.PRNGKey(5)
    free = np.asarray(G.generate(tiny_params, cfg, prompt, key, 20))
    stop = int(free[0, 4])
    stopped = np.asarray(G.generate(tiny_params, cfg, prompt, key, 20, stop_token=stop))
    ends = []
    for row_free, row in zip(free, stopped):
        hits = np.flatnonzero(row_free == stop)
        end = hits[0] + 1 if hits.size else 20
        np.testing.assert_array_equal(row[:end], row_free[:end])  # same keys: same draws until then
        assert (row[end:] == stop).all()
        ends.append(end)
    assert ends[0] == 5 and len(set(ends)) > 1  # the rows stopped at different steps (or not at all)
    # identical greedy rows all stop together: the loop exits there instead of running on
    same = np.repeat(prompt[:1], 4, axis=0)
    greedy = np.asarray(G.generate(tiny_params, cfg, same, key, 20, temperature=0))
    stop = int(greedy[0, 6])
    first = np.flatnonzero(greedy[0] == stop)[0]
    prompt_BxT, len_B, sampling = G._check(cfg, same, 20, 0.0, None, None, None, None)
    state = G._start(cfg, prompt_BxT, len_B, 20, stop, G.default_key_bucket(cfg))
    state = G._decode(tiny_params, state, key, jnp.int32(20), sampling, jnp.int32(stop),
                      model=GPT(cfg), ragged=False)
    assert int(state.t) == first + 1 < 20
    np.testing.assert_array_equal(np.asarray(state.out_BxN)[0, : first + 1], greedy[0, : first + 1])


@pytest.mark.parametrize("key_bucket", [None, 4])  # 4: the per-row positions write and read blocks
# 18: each row crosses block_size at its own step (3 + 17 > 16); 6: none does, and the cache holds
# only the 13 positions the longest row reaches
@pytest.mark.parametrize("N", [18, 6])
def test_left_padded_prompts_equal_rows_alone(tiny_params, key_bucket, N):
    cfg = TINY
    lengths = np.array([3, 7, 5, 7])
    junk = prompts(4, 7, cfg.vocab_size, seed=2)  # padding holds real-looking ids, not zeros
    rows = [prompts(1, n, cfg.vocab_size, seed=20 + i)[0] for i, n in enumerate(lengths)]
    padded = junk.copy()
    for i, r in enumerate(rows):
        padded[i, 7 - len(r):] = r
    out = np.asarray(G.generate(tiny_params, cfg, padded, jax.random.PRNGKey(0), N, temperature=0,
                                prompt_lengths=lengths, key_bucket=key_bucket))
    for i, r in enumerate(rows):
        alone = generate_recompute(tiny_params, cfg, r[None], jax.random.PRNGKey(0), N, temperature=0)
        np.testing.assert_array_equal(out[i], alone[0])


@pytest.mark.parametrize("T, N, positions", [(3, 10, 13), (5, 30, 16), (16, 1, 16)])
def test_the_cache_holds_the_positions_the_contexts_reach(T, N, positions):
    # a cache of block_size positions for a short generation costs its zeros, copies and writes
    # at every step; past block_size the window recomputes into a whole block
    state = G._start(TINY, np.ones((2, T), np.int32), np.full(2, T), N, -1, 4)
    blocks = state.kv[0]["k"]
    assert sum(block.shape[2] for block in blocks) == positions
    assert [block.shape[2] for block in blocks[:-1]] == [4] * (len(blocks) - 1)


@pytest.mark.slow
def test_remat_scanned_and_cpu_kernel_models_sample_as_the_plain_one(tiny_params):
    """A rematerialised (training-only: ignored on the cache), scanned (its cache stacked too) or
    CPU-kernel model samples the plain model's greedy tokens; a cached forward refuses dropout."""
    prompt = prompts(2, 4, TINY.vocab_size)
    plain = np.asarray(G.generate(tiny_params, TINY, prompt, jax.random.PRNGKey(0), 12, temperature=0))
    assert len(np.unique(plain)) > 3
    scanned_remat = dataclasses.replace(TINY, scan_layers=True, remat="full")
    stacked = to_scan_layout(tiny_params, TINY.n_layer)
    np.testing.assert_array_equal(
        np.asarray(G.generate(stacked, scanned_remat, prompt, jax.random.PRNGKey(0), 12, temperature=0)), plain)
    cpu_kernels = Kernels(attention="blocked", matmul="cpu", row_blocks=True)
    np.testing.assert_array_equal(np.asarray(G.generate(tiny_params, TINY, prompt, jax.random.PRNGKey(0), 12,
                                                        temperature=0, kernels=cpu_kernels)), plain)
    with pytest.raises(ValueError, match="deterministic=True"):
        GPT(dataclasses.replace(TINY, dropout=0.1)).apply(
            {"params": tiny_params}, prompt[:, :1], deterministic=False, cache=init_cache(TINY, 2),
            rngs={"dropout": jax.random.PRNGKey(0)})


def test_bfloat16_compute(tiny_params):
    cfg16 = dataclasses.replace(TINY, dtype="bfloat16")
    prompt = prompts(2, 5, TINY.vocab_size)
    prompt_BxT, len_B, sampling = G._check(cfg16, prompt, 30, 0.0, None, None, None, None)
    state = G._start(cfg16, prompt_BxT, len_B, 30, -1, G.default_key_bucket(cfg16))
    state = G._decode(tiny_params, state, jax.random.PRNGKey(0), jnp.int32(30), sampling, jnp.int32(-1),
                      model=GPT(cfg16), ragged=False)
    assert state.kv[0]["k"][0].dtype == jnp.bfloat16 and int(state.t) == 30
    g32 = np.asarray(G.generate(tiny_params, TINY, prompt, jax.random.PRNGKey(0), 30, temperature=0))
    # bf16 rounds activations to 8 mantissa bits: greedy paths may part later, not in the first steps
    np.testing.assert_array_equal(np.asarray(state.out_BxN)[:, :3], g32[:, :3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(vocab_limit=65), "vocab_limit"),
        (dict(prompt_lengths=[2, 5]), "prompt_lengths"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_tokens=np.full((2, 4), 64)), "token ids"),
        (dict(prompt_tokens=np.zeros((2, 0), np.int32)), "non-empty"),
        (dict(key_bucket=-1), "key_bucket"),
        (dict(key_bucket=2.5), "key_bucket"),
        (dict(temperature=float("nan")), "temperature=nan must be a number >= 0"),  # sampled token 0 forever
        (dict(prompt_lengths=[2.5, 4]), "prompt_lengths"),  # was truncated to 2
    ],
)
def test_bad_arguments(tiny_params, kwargs, match):
    args = dict(prompt_tokens=prompts(2, 4, 64), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        G.generate(tiny_params, TINY, key=jax.random.PRNGKey(0), **args)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.0, True])
def test_stream_chunk_size_is_checked_at_the_call(tiny_params, chunk_size):
    # -1 used to yield nothing at all, 0 to fail only at the first chunk
    with pytest.raises(ValueError, match="chunk_size"):
        G.generate_stream(tiny_params, TINY, prompts(1, 4, 64), jax.random.PRNGKey(0), 4, chunk_size=chunk_size)
