"""gptjax as a model of EleutherAI's lm-evaluation-harness (`lm_eval`), registered as "gptjax".

`GPTJaxLM` scores and generates with gptjax's own compiled forward and KV-cache generation;
everything about a task (prompts, few-shot, metrics) is lm-eval's. It follows lm-eval's `hf`
backend request by request, so that the same weights give the same numbers:
- loglikelihood: lm-eval's `TemplateLM` splits context and continuation into tokens; the input is
  the last block_size tokens of both before the last one, the continuation's log-probabilities are
  summed, and `is_greedy` says whether argmax would have produced it;
- loglikelihood_rolling: a document in disjoint windows of the model's context
  (`lm_eval.utils.get_rolling_token_windows`), the first conditioned on the prefix token;
- generate_until: the context's last block_size - max_gen_toks tokens, then greedy (or sampled)
  tokens until every row has produced one of `until` (or GPT-2's end-of-text) or max_gen_toks.

Requests are sorted by length and batched; batches are padded to `batch_size` rows (a task's last
batch less), and their length (the longest window when scoring, the longest prompt when
generating), each to one of four sizes per doubling, so a handful of compiled programs serve a
whole task. Scoring applies the head only at the last positions of each row, as many as the
batch's longest continuation (padded alike): for multiple-choice tasks that is a small share of
the positions, and the head over GPT-2's vocabulary is the largest product of the forward.

Character-level models (a meta.pkl vocabulary) have no end-of-text token: their prefix token (for
empty contexts and the first rolling window) is the newline, and generation stops only at `until`.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from gptjax import kernels as kernels_lib
from gptjax.generate import default_vocab_limit, generate_stream
from gptjax.model import GPT, GPTConfig
from gptjax.sample import Tokenizer

GPT2_EOT = 50256
MIN_LENGTH = 16  # the shortest padded length: shorter batches would each compile their own program
GENERATION_CHUNK = 16  # tokens generated between checks for `until`
SUPPORTED_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("model", "vocab_limit", "greedy"))
def _token_logprobs(params, inp_BxT, at_BxK, tgt_BxK, *, model: GPT, vocab_limit: int, greedy: bool):
    """log p(tgt_k | inp_..at_k) (B, K) in float32 at the K positions at_BxK of each row, the head
    applied only there, and (with `greedy`) whether tgt_k is the argmax, over the first vocab_limit
    logits (nanoGPT's padded ids are never a token)."""
    logits_BxKxV = model.apply({"params": params}, inp_BxT, logits_at=at_BxK).astype(jnp.float32)[..., :vocab_limit]
    max_BxKx1 = jnp.max(logits_BxKxV, axis=-1, keepdims=True)
    # the sum over the vocabulary as a product with ones: XLA's CPU backend runs a reduction this
    # long at half the speed of the matrix-vector product, which is as fast as PyTorch's log_softmax
    sum_BxK = jnp.exp(logits_BxKxV - max_BxKx1) @ jnp.ones((logits_BxKxV.shape[-1],), jnp.float32)
    tgt_logit_BxKx1 = jnp.take_along_axis(logits_BxKxV, tgt_BxK[..., None], axis=-1)
    logp_BxK = (tgt_logit_BxKx1 - max_BxKx1)[..., 0] - jnp.log(sum_BxK)
    return logp_BxK, (jnp.argmax(logits_BxKxV, axis=-1) == tgt_BxK) if greedy else None


def _padded(n: int, limit: int, least: int = 1) -> int:
    """n rounded up to 5/8, 6/8, 7/8 or the whole of the next power of two (at least `least`, at
    most `limit`): padding at most a quarter, with four shapes to compile per doubling."""
    eighth = max((1 << (n - 1).bit_length()) // 8, 1)
    return min(max(least, -(-n // eighth) * eighth), limit)


def _padded_length(n: int, limit: int) -> int:
    return _padded(n, limit, MIN_LENGTH)


@register_model("gptjax")
class GPTJaxLM(TemplateLM):
    """An lm-eval model over gptjax parameters. `meta`: the character vocabulary (None: GPT-2's
    BPE). From lm-eval's side: `simple_evaluate(model="gptjax", model_args="init_from=PATH")`."""

    def __init__(self, params, cfg: GPTConfig, meta: dict | None = None, batch_size: int = 16,
                 max_gen_toks: int = 256, seed: int = 1234, kernels=None):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a whole number of rows >= 1")
        self.params, self.cfg, self.codec = params, cfg, Tokenizer(meta)  # not `tokenizer`: lm-eval reads that as an HF one
        self._batch_size, self._max_gen_toks, self.seed = batch_size, max_gen_toks, seed
        self.kernels = kernels or kernels_lib.for_inference(cfg)
        self.model = GPT(cfg, self.kernels)
        self.vocab_limit = min(default_vocab_limit(cfg), self.codec.vocab_size)
        self._generations = 0  # batches sampled so far: batch k samples with fold_in(key, k)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "GPTJaxLM":
        """lm-eval's `--model_args init_from=PATH[,dtype=float32,max_gen_toks=256]`; `batch_size`
        comes from lm-eval's own option."""
        from lm_eval.utils import simple_parse_args_string

        args = {**simple_parse_args_string(arg_string), **{k: v for k, v in (additional_config or {}).items()
                                                           if k == "batch_size" and v is not None}}
        unknown = sorted(set(args) - {"init_from", "dtype", "batch_size", "max_gen_toks", "seed"})
        if unknown or "init_from" not in args:
            raise ValueError(f"gptjax model_args take init_from=PATH (required), dtype, max_gen_toks and seed; "
                             f"got {arg_string!r}" + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        return cls.from_weights(args.pop("init_from"), **{k: v if k == "dtype" else int(v) for k, v in args.items()})

    @classmethod
    def from_weights(cls, init_from: str, dtype: str = "float32", **kwargs) -> "GPTJaxLM":
        """From anything training's init_from takes: a gptjax run, a nanoGPT ckpt.pt, an HF directory
        or a GPT-2 name."""
        from gptjax import weights

        loaded = weights.load(init_from, dtype=dtype)
        return cls(loaded.params, loaded.cfg, loaded.meta, **kwargs)

    def _padded_rows(self, n: int) -> int:
        """Rows for a batch of n requests: batch_size, or fewer for a task's last, partial batch
        (its padding rows would cost as much as real ones)."""
        return _padded(n, self._batch_size)

    # --- what lm-eval asks of a model -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        if self.codec.meta is None:
            return GPT2_EOT
        stoi = self.codec.meta["stoi"]
        return stoi["\n"] if "\n" in stoi else 0

    @property
    def max_length(self) -> int:
        return self.cfg.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string, where="the task's text")

    def tok_decode(self, tokens) -> str:
        return self.codec.stream_decoder()(tokens, final=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, greedy: bool = True,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), is_greedy) per (request, context tokens, continuation
        tokens); greedy=False: is_greedy is not computed (False)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in order.get_batched(n=self._batch_size):
            windows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in chunk]
            T = _padded_length(max(len(w) - 1 for w in windows), self.max_length)
            # the head only at the last K positions of each row, which hold every continuation
            K = _padded_length(max(len(cont) for _, _, cont in chunk), T)
            B = self._padded_rows(len(chunk))
            inp_BxT, at_BxK, tgt_BxK = (np.zeros((B, n), np.int32) for n in (T, K, K))
            for b, w in enumerate(windows):
                inp_BxT[b, : len(w) - 1] = w[:-1]
                at_BxK[b] = np.maximum(np.arange(len(w) - 1 - K, len(w) - 1), 0)
                tgt_BxK[b] = np.asarray(w)[at_BxK[b] + 1]
            logp_BxK, greedy_BxK = jax.device_get(_token_logprobs(
                self.params, inp_BxT, at_BxK, tgt_BxK, model=self.model, vocab_limit=self.vocab_limit, greedy=greedy))
            for b, (request, _, cont) in enumerate(chunk):
                scored = slice(K - len(cont), K)  # the continuation's positions among the K
                answer = (float(logp_BxK[b, scored].sum(dtype=np.float64)),
                          greedy and bool(greedy_BxK[b, scored].all()))
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, greedy=False)):
            totals[i] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        order = Collator([r.args for r in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        for chunk in order.get_batched(n=self._batch_size):
            contexts, all_kwargs = zip(*chunk)
            for context, text in zip(contexts, self._generate(list(contexts), all_kwargs[0])):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return order.get_original(results)

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        unsupported = sorted(set(kwargs) - set(SUPPORTED_GEN_KWARGS))
        if unsupported:
            raise ValueError(f"generation_kwargs {', '.join(unsupported)} are not supported by gptjax; it takes "
                             f"{', '.join(SUPPORTED_GEN_KWARGS)}")
        bpe = self.codec.meta is None
        until = handle_stop_sequences(kwargs["until"], eos=self.tok_decode([GPT2_EOT]) if bpe else None)
        max_gen_toks = int(kwargs["max_gen_toks"])
        max_ctx = self.max_length - max_gen_toks
        if max_ctx < 1:
            raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                             f"{self.max_length} tokens: lower it (model_args max_gen_toks, or the task's)")
        prompts = [self.tok_encode(c)[-max_ctx:] or [self.prefix_token_id] for c in contexts]
        # the prefill is one forward over T positions: the longest prompt, padded as scoring pads
        T = _padded_length(max(map(len, prompts)), max_ctx)
        B = self._padded_rows(len(prompts))
        prompt_BxT = np.zeros((B, T), np.int32)
        len_B = np.ones((B,), np.int32)  # rows past the chunk's: one-token fillers
        for b, p in enumerate(prompts):
            prompt_BxT[b, T - len(p):], len_B[b] = p, len(p)
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self._generations)
        self._generations += 1
        tokens, texts = [[] for _ in prompts], [""] * len(prompts)
        for piece_BxK in generate_stream(
                self.params, self.cfg, prompt_BxT, key, max_gen_toks, temperature, kwargs.get("top_k"),
                kwargs.get("top_p"), stop_token=GPT2_EOT if bpe else None, vocab_limit=self.vocab_limit,
                prompt_lengths=len_B, chunk_size=GENERATION_CHUNK, kernels=self.kernels):
            for b in range(len(prompts)):
                tokens[b].extend(piece_BxK[b].tolist())
                texts[b] = self.tok_decode(tokens[b])
            if all(any(u and u in text for u in until) for text in texts):
                break
        return [postprocess_generated_text(text, until, None) for text in texts]


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """simple_evaluate's numbers as flat scalars for logs: {'hellaswag/acc_norm': 0.29, ...}
    (stderr left out; a filter other than lm-eval's 'none' is kept in the name)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for name, value in metrics.items():
            if "," not in name or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            metric, filter_name = name.split(",", 1)
            flat[f"{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
    return flat


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager for `tasks`, once every name is found (an unknown one is an error
    naming the near ones). Tasks all found in include_path skip indexing lm-eval's own thousands."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given: name lm-eval tasks, e.g. --tasks=hellaswag")
    if include_path:
        if not Path(include_path).is_dir():
            raise FileNotFoundError(f"include_path {include_path!r} is not a directory of task YAML files")
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        raise ValueError("unknown lm-eval task " + "; ".join(
            f"{t!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items())
            + ": `lm_eval ls tasks` lists them; tasks of your own go in a directory passed as include_path")
    return manager


def evaluate(lm: GPTJaxLM, tasks: list[str], manager=None, num_fewshot: int | None = None,
             limit: int | float | None = None, log_samples: bool = False, bootstrap_iters: int = 100000,
             evaluation_tracker=None, verbosity: str | None = None, source: str = "gptjax") -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on `tasks` (`manager`: from `task_manager`); `source`
    names the weights in lm-eval's results (and its output directory)."""
    import lm_eval

    results = lm_eval.simple_evaluate(
        model=lm, model_args={"model": source}, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
        task_manager=manager or task_manager(tasks), log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        evaluation_tracker=evaluation_tracker, verbosity=verbosity)
    if results is None:  # only on a process other than lm-eval's rank 0, which gptjax never is
        raise RuntimeError("lm-eval returned no results")
    return results


class TrainingTasks:
    """The run's eval_tasks, evaluated on the current parameters at each eval interval."""

    def __init__(self, cfg, model_cfg: GPTConfig, meta: dict | None):
        self.tasks, self.limit = cfg.task_names, cfg.eval_tasks_limit or None
        self.manager = task_manager(self.tasks, cfg.eval_tasks_include_path)
        self.model_cfg, self.meta, self.batch_size, self.seed = model_cfg, meta, cfg.batch_size, cfg.seed

    def __call__(self, params, step: int) -> dict[str, float]:
        # a new model object each time is free: equal modules share their compiled programs
        lm = GPTJaxLM(params, self.model_cfg, self.meta, batch_size=self.batch_size, seed=self.seed + step)
        return task_metrics(evaluate(lm, self.tasks, self.manager, limit=self.limit, bootstrap_iters=0,
                                     verbosity="WARNING", source=f"iter {step}"))
