"""Sample text from a trained run or GPT-2 weights, as nanoGPT's sample.py, streamed as it comes.

    python -m gptjax.sample --out_dir=out-shakespeare-char
    python -m gptjax.sample --init_from=gpt2 --start="What is the answer?" --num_samples=3
    python -m gptjax.sample --init_from=path/to/hf_dir --start=FILE:prompt.txt --top_p=0.9
    python -m gptjax.sample --out_dir=../nanoGPT/out-shakespeare-char   # nanoGPT's run, its meta.pkl

Sample k is drawn with key fold_in(PRNGKey(seed), k), so a run is reproducible sample by sample.
Tokens come in chunks of a compiled loop that carries its KV cache from chunk to chunk: the text is
exactly what one `generate` call would give.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from gptjax import kernels as kernels_lib
from gptjax import paths, perf
from gptjax.config import DTYPES, auto_dtype
from gptjax.generate import check_sampling, generate_stream

SEPARATOR = "---------------"
DEFAULT_TOP_K = 200  # nanoGPT's; capped at the vocabulary when not given explicitly
CHUNK = 32  # tokens per compiled call between prints


def load_model(init_from: str, out_dir: str, dtype: str):
    """(params, GPTConfig with compute `dtype`, char-vocabulary meta dict or None for GPT-2 BPE):
    init_from 'resume' reads out_dir (a gptjax run, or nanoGPT's out_dir with its ckpt.pt)."""
    if init_from == "resume" and not paths.resolve(out_dir).is_dir():
        raise FileNotFoundError(f"out_dir {out_dir!r} does not exist: train first, or pass --out_dir "
                                "or --init_from=gpt2 / a checkpoint path")
    from gptjax import weights

    loaded = weights.load(out_dir if init_from == "resume" else init_from, dtype=dtype)
    return loaded.params, loaded.cfg, loaded.meta


class Tokenizer:
    """nanoGPT's two codecs: a meta.pkl character vocabulary, or tiktoken's GPT-2 BPE."""

    def __init__(self, meta: dict | None):
        self.meta = meta
        if meta is None:
            from gptjax.prepare import gpt2_encoding

            self.bpe = gpt2_encoding()
            self.vocab_size = self.bpe.n_vocab
        else:
            self.vocab_size = meta["vocab_size"]

    def encode(self, text: str, where: str = "--start") -> list[int]:
        """Token ids of `text`; `where` names the text in the error for a character out of the vocabulary."""
        if self.meta is None:
            return self.bpe.encode(text, allowed_special={"<|endoftext|>"})
        stoi = self.meta["stoi"]
        for ch in text:
            if ch not in stoi:
                raise ValueError(f"character {ch!r} (U+{ord(ch):04X}) is not in the model's "
                                 f"{self.vocab_size}-character vocabulary: remove it from {where}")
        return [stoi[ch] for ch in text]

    def stream_decoder(self):
        """A function tokens -> text for consecutive pieces of one sequence (call with no tokens and
        final=True at the end). BPE tokens can split a UTF-8 character, which is held back until
        complete, so the pieces join into exactly tiktoken's decode of the whole sequence."""
        if self.meta is not None:
            itos = self.meta["itos"]
            return lambda tokens, final=False: "".join(itos[int(i)] for i in tokens)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda tokens, final=False: utf8.decode(self.bpe.decode_bytes([int(i) for i in tokens]), final)


def read_start(start: str) -> str:
    """--start text, or the contents of the file it names as FILE:path."""
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        if not path.is_file():
            raise FileNotFoundError(f"--start names {str(path)!r}, which is not a file")
        try:
            start = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--start file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}): "
                             "save it as UTF-8") from None
    if not start:
        raise ValueError("the prompt (--start) is empty: give at least one character, e.g. --start='\\n'")
    return start


def write_samples(params, cfg, tok: Tokenizer, start_ids: list[int], args, out=None) -> None:
    """Stream args.num_samples samples to `out` (stdout), each the prompt and its continuation."""
    out = sys.stdout if out is None else out
    vocab_limit = min(cfg.vocab_size, tok.vocab_size)
    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    prompt_1xT = np.asarray([start_ids], np.int32)
    key = jax.random.PRNGKey(args.seed)
    kernels = kernels_lib.for_inference(cfg)
    for k in range(args.num_samples):
        decode = tok.stream_decoder()
        out.write(decode(start_ids))
        chunks = generate_stream(
            params, cfg, prompt_1xT, jax.random.fold_in(key, k), args.max_new_tokens, args.temperature,
            top_k, args.top_p, vocab_limit=vocab_limit, chunk_size=CHUNK, kernels=kernels,
        )
        for tokens_1xK in chunks:
            out.write(decode(tokens_1xK[0]))
            out.flush()
        out.write(decode([], final=True) + "\n" + SEPARATOR + "\n")
        out.flush()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gptjax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--init_from", default="resume",
                   help="'resume' (from --out_dir), a GPT-2 name (gpt2, gpt2-medium, ...), a Hugging Face "
                        "directory, a nanoGPT ckpt.pt or a gptjax run's out_dir")
    p.add_argument("--out_dir", default="out", help="the run to sample (gptjax's, or nanoGPT's with its ckpt.pt)")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=None,
                   help=f"keep the k most likely tokens (default {DEFAULT_TOP_K}, capped at the vocabulary)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep the top tokens "
                   "whose probabilities add up to top_p")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="compute dtype (auto: bfloat16 on an accelerator, float32 on CPU)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dtype == "auto":
        args.dtype = auto_dtype()
    try:
        if args.num_samples < 1 or args.max_new_tokens < 1:
            raise ValueError("--num_samples and --max_new_tokens must be at least 1")
        check_sampling(args.temperature, args.top_k, args.top_p, prefix="--")
        start = read_start(args.start)
        params, cfg, meta = load_model(args.init_from, args.out_dir, args.dtype)
        tok = Tokenizer(meta)
        start_ids = tok.encode(start)
        if not start_ids:
            raise ValueError("the prompt (--start) encodes to no tokens")
        vocab = min(cfg.vocab_size, tok.vocab_size)
        if args.top_k is not None and args.top_k > vocab:
            raise ValueError(f"--top_k={args.top_k} is more than the {vocab} tokens of the vocabulary")
    except (ValueError, OSError, ImportError) as err:  # OSError: files, and downloads (ConnectionError)
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(start_ids) > cfg.block_size:
        print(f"warning: the prompt is {len(start_ids)} tokens, longer than the model's context of "
              f"{cfg.block_size}: only its last {cfg.block_size} tokens condition the samples",
              file=sys.stderr)
    write_samples(params, cfg, tok, start_ids, args)
    return 0


if __name__ == "__main__":
    perf.enable_compilation_cache()
    sys.exit(main())
