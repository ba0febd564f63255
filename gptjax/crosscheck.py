"""Check gptjax against PyTorch on a checkpoint: same random tokens, float32 logits compared.

    python -m gptjax.crosscheck PATH [--tol 1e-4] [--batch 2] [--seq 64] [--seed 0]

PATH is a Hugging Face GPT-2 directory (run through transformers' GPT2LMHeadModel), a nanoGPT
ckpt.pt (run through gptjax.torch_ref, nanoGPT's model) or a gptjax run's out_dir (through either,
as its GELU and LayerNorm eps say). Relative difference is
max|jax - torch| / max|torch|. Above tolerance, hidden states are compared stage by stage
(embeddings, each block, ln_f) to name the first one that diverges. Exit 0 within tolerance,
1 above, 2 on unusable input. Needs torch (and transformers for HF directories).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import kernels as kernels_lib
from gptjax import convert, paths, weights
from gptjax.model import GPT, GPTConfig


@dataclasses.dataclass
class Report:
    """Per-stage (name, max abs diff, relative diff), in forward order; the last is `logits`."""

    stages: list[tuple[str, float, float]]
    tol: float

    @property
    def max_abs(self) -> float:
        return self.stages[-1][1]

    @property
    def max_rel(self) -> float:
        return self.stages[-1][2]

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tol

    @property
    def first_divergence(self) -> str | None:
        return next((name for name, _, rel in self.stages if rel > self.tol), None)


def _rel(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = float(np.max(np.abs(a - b)))
    return diff, diff / max(float(np.max(np.abs(b))), np.finfo(np.float32).tiny)


def torch_stages(model, idx_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Embeddings, block outputs, ln_f output and logits of a GPT-2-shaped torch model
    (`model.transformer.{drop,h,ln_f}`: both HF's GPT2LMHeadModel and nanoGPT's GPT)."""
    import torch

    captured: dict[str, np.ndarray] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            captured[name] = out.detach().float().numpy()
        return hook

    tr = model.transformer
    modules = [("embed", tr.drop)] + [(f"h_{i}", b) for i, b in enumerate(tr.h)] + [("ln_f", tr.ln_f)]
    handles = [m.register_forward_hook(keep(name)) for name, m in modules]
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(idx_BxT, dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    logits = out[0] if isinstance(out, tuple) else out.logits
    stages = {name: captured[name] for name, _ in modules}
    stages["logits"] = logits.detach().float().numpy()
    return stages


def jax_stages(params, cfg: GPTConfig, idx_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """The same stages from gptjax, captured from the top-level submodules' outputs."""
    def forward(params, idx_BxT):
        top_level = lambda mdl, method: method == "__call__" and len(mdl.path) == 1  # noqa: E731
        return GPT(cfg, kernels_lib.for_inference(cfg)).apply(
            {"params": params}, idx_BxT, capture_intermediates=top_level, mutable=["intermediates"]
        )

    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this is a float32 check
        logits, state = jax.jit(forward)(params, jnp.asarray(idx_BxT))
    inter = state["intermediates"]
    stages = {"embed": np.asarray(inter["drop"]["__call__"][0])}
    for i in range(cfg.n_layer):
        stages[f"h_{i}"] = np.asarray(inter[f"h_{i}"]["__call__"][0][0])  # Block returns (x, cache)
    stages["ln_f"] = np.asarray(inter["ln_f"]["__call__"][0])
    stages["logits"] = np.asarray(logits)
    return stages


def compare(torch_model, params, cfg: GPTConfig, idx_BxT: np.ndarray, tol: float = 1e-4) -> Report:
    """Run idx through both models in float32 and report the differences stage by stage."""
    cfg = dataclasses.replace(cfg, dtype="float32")
    ref = torch_stages(torch_model, idx_BxT)
    got = jax_stages(params, cfg, idx_BxT)
    if ref["logits"].shape != got["logits"].shape:
        raise ValueError(f"logit shapes differ: torch {ref['logits'].shape}, gptjax {got['logits'].shape}")
    return Report([(name, *_rel(got[name], ref[name])) for name in ref], tol)


def _torch_nanogpt(model_args: dict, state: dict):
    """nanoGPT's model (gptjax.torch_ref) holding a nanoGPT state dict."""
    from gptjax import torch_ref
    from gptjax.convert import _MASK_BUFFER

    fields = {f.name for f in dataclasses.fields(torch_ref.GPTConfig)}
    model = torch_ref.GPT(torch_ref.GPTConfig(**{k: v for k, v in model_args.items() if k in fields}))
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    # Non-flash nanoGPT saved its causal mask as `attn.bias`; the reference computes it instead.
    state = {k: v for k, v in state.items() if not _MASK_BUFFER.match(k.removeprefix("transformer."))}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _torch_hf(directory):
    from transformers import GPT2LMHeadModel

    # .float(): transformers may load in the file's dtype; this is a float32 comparison.
    return GPT2LMHeadModel.from_pretrained(directory).float().eval()


def load_both(path):
    """(torch model, params, cfg, format name) for a gptjax run, an HF directory or a nanoGPT
    ckpt.pt. A gptjax run is compared with nanoGPT's model, or with transformers' GPT-2 when it
    computes GELU with tanh or another LayerNorm eps (as HF-initialised runs do)."""
    p = paths.resolve(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if paths.is_remote(p) and not weights.is_run_dir(p):
        p = paths.local_tree(str(p))  # torch and transformers read local files
    if p.is_dir() and weights.is_run_dir(p):
        w = weights.load(p, need_vocabulary=False)
        if options := w.cfg.not_gpt2():
            raise ValueError(f"{p} is a gptjax run with {', '.join(options)}, which PyTorch's GPT-2 models "
                             "(nanoGPT's, transformers') do not have: crosscheck compares GPT-2 models")
        if not convert.nanogpt_numerics_changes(w.cfg):
            model_args = {k: getattr(w.cfg, k) for k in convert.NANOGPT_ARGS}
            torch_model = _torch_nanogpt(model_args, convert.nanogpt_state_dict(w.params, w.cfg))
            return torch_model, w.params, w.cfg, "gptjax run vs nanoGPT's GPT"
        with tempfile.TemporaryDirectory() as tmp:
            convert.save_hf(w.params, w.cfg, tmp)
            return _torch_hf(tmp), w.params, w.cfg, "gptjax run vs Hugging Face GPT2LMHeadModel"
    if p.is_file() or (p / "ckpt.pt").is_file():
        ckpt_path = p if p.is_file() else p / "ckpt.pt"
        ckpt = convert.read_nanogpt_ckpt(ckpt_path)
        params, cfg = convert.nanogpt_params(ckpt, "float32", str(ckpt_path))  # first: gptjax's shape checks
        return _torch_nanogpt(ckpt["model_args"], ckpt["model"]), params, cfg, "nanoGPT ckpt.pt"
    if (p / "config.json").is_file():
        params, cfg = convert.load_hf(p)
        return _torch_hf(p), params, cfg, "Hugging Face GPT2LMHeadModel"
    raise ValueError(f"{p}: unknown format; pass a gptjax run's out_dir, a nanoGPT ckpt.pt or a Hugging Face "
                     "directory with config.json")


def crosscheck(path, tol: float = 1e-4, batch: int = 2, seq: int | None = None, seed: int = 0):
    """Load PATH both ways and compare on random tokens. Returns (Report, format name, cfg)."""
    torch_model, params, cfg, fmt = load_both(path)
    T = min(seq or 64, cfg.block_size)
    idx_BxT = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, T))
    return compare(torch_model, params, cfg, idx_BxT, tol), fmt, cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptjax.crosscheck",
        description="Compare gptjax's float32 logits with PyTorch's on a checkpoint. Relative "
        "difference = max|jax - torch| / max|torch| over all logits.",
    )
    parser.add_argument("path", help="Hugging Face GPT-2 directory, nanoGPT ckpt.pt or gptjax out_dir")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    parser.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens each (default min(64, block_size))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    args = parser.parse_args(argv)
    if args.batch < 1 or (args.seq is not None and args.seq < 1) or args.tol < 0:
        parser.error("--batch and --seq must be positive, --tol non-negative")
    try:
        report, fmt, cfg = crosscheck(args.path, args.tol, args.batch, args.seq, args.seed)
    except (OSError, ValueError, ImportError, RuntimeError) as e:  # RuntimeError: torch refusing a state dict
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2  # could not load: 1 means only "loaded, and the numbers differ"
    T = min(args.seq or 64, cfg.block_size)
    print(f"{args.path} ({fmt}): n_layer={cfg.n_layer} n_embd={cfg.n_embd} vocab={cfg.vocab_size}, "
          f"B={args.batch} T={T} seed={args.seed}, float32")
    verdict = "OK" if report.ok else "FAIL"
    print(f"logits: max abs diff {report.max_abs:.3e}, max relative diff {report.max_rel:.3e} "
          f"(tolerance {args.tol:.1e}): {verdict}")
    if not report.ok:
        print(f"first stage over tolerance: {report.first_divergence}")
        for name, diff, rel in report.stages:
            print(f"  {name:>8}: max abs {diff:.3e}  relative {rel:.3e}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
