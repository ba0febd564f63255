"""The PyTorch rows of `python -m gptjax.bench --compare=torch`: nanoGPT's training step (its
architecture, `gptjax.torch_ref`), eager or under torch.compile, each in a process of its own and
timed in the same alternating rounds as gptjax's (`bench.measure`)."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import time

import jax
import numpy as np

from gptjax.bench import Runner, timed, say
from gptjax.config import TrainConfig
from gptjax.model import flops_per_token


def torch_device() -> str:
    """Where the PyTorch rows run: on the GPU when gptjax's do, else on the CPU."""
    return "cuda" if jax.default_backend() == "gpu" else "cpu"


def torch_setup(cfg: TrainConfig, device: str):
    """(torch, autocast context) as nanoGPT's train.py sets them up: TF32 matmuls, and autocast to
    the run's dtype on the GPU (float32 on the CPU)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gptjax runs on the GPU but this PyTorch has no CUDA: install a CUDA build of "
                           "torch to compare on the same device, or drop --compare")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device == "cpu":
        return torch, contextlib.nullcontext()
    return torch, torch.amp.autocast(device_type=device, dtype=getattr(torch, cfg.resolved_dtype))


def torch_runner(cfg: TrainConfig, tokens: np.ndarray, vocab_size: int, compile: bool, device: str = "cpu") -> Runner:
    """nanoGPT's training step in PyTorch: same model, AdamW groups, clipping and batch; on the
    GPU with nanoGPT's autocast, fused AdamW and (float16) GradScaler, synchronised every step as
    gptjax's steps are."""
    from gptjax import torch_ref

    torch, autocast = torch_setup(cfg, device)
    torch.manual_seed(cfg.seed)
    model = torch_ref.GPT(torch_ref.GPTConfig(
        block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda" and cfg.resolved_dtype == "float16")
    forward = torch.compile(model) if compile else model
    x = torch.from_numpy(tokens[..., :-1].astype(np.int64)).to(device)
    y = torch.from_numpy(tokens[..., 1:].astype(np.int64)).to(device)

    def step():
        for micro in range(x.shape[0]):
            with autocast:
                _, loss = forward(x[micro], y[micro])
            scaler.scale(loss / x.shape[0]).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()  # torch.compile compiles here
    compile_s = time.perf_counter() - start if compile else 0.0
    step()
    flops = flops_per_token(cfg.model_config(vocab_size), model.get_num_params()) * cfg.tokens_per_iter
    return Runner("torch-compile" if compile else "torch", functools.partial(timed, step), flops, compile_s)


def torch_process_runner(cfg: TrainConfig, tokens: np.ndarray, vocab_size: int, compile: bool,
                         device: str = "cpu") -> Runner:
    """torch_runner in a child process, driven over a pipe. The PyTorch rows then run as a user's
    nanoGPT would, in a process of their own: without gptjax's malloc settings
    (cpu.keep_freed_memory), and without PyTorch's OpenMP threads, which busy-wait after each
    parallel region, taking cores from XLA's steps in between (on 2 cores that cost gptjax ~15%)."""
    say(f"starting PyTorch ({'torch.compile' if compile else 'eager'}) on {device}")
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX threads, no mallopt
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_torch_worker, args=(child_conn, cfg, tokens, vocab_size, compile, device),
                       daemon=True)
    proc.start()
    child_conn.close()
    status, *payload = conn.recv()
    if status == "error":
        proc.join()
        raise RuntimeError(f"the PyTorch benchmark process failed: {payload[0]}")
    impl, flops, compile_s = payload

    def run(n: int) -> float:
        conn.send(n)
        return conn.recv()

    def close():
        if proc.is_alive():
            conn.send(None)
        proc.join(timeout=30)

    return Runner(impl, run, flops, compile_s, close)


def _torch_worker(conn, cfg: TrainConfig, tokens: np.ndarray, vocab_size: int, compile: bool, device: str) -> None:
    try:
        runner = torch_runner(cfg, tokens, vocab_size, compile, device)
    except Exception as err:  # reported to the parent, which raises it there
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", runner.impl, runner.flops_per_iter, runner.compile_s))
    while (n := conn.recv()) is not None:
        conn.send(runner.run(n))
