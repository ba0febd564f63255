"""The benchmark CLI produces the documented rows, and the CPU device split picks a sane count."""

import json
import os
import subprocess
import sys
import time

import pytest

from gptjax import bench, perf, torch_bench

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--vocab_size=64", "--dataset=none"]


def test_bench_json_rows_against_torch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    out = tmp_path / "bench.json"
    rows = bench.run(TINY + ["--steps=2", "--rounds=2", "--compare=torch", "--no-torch-compile",
                             "--name=tiny", f"--json={out}"])
    payload = json.loads(out.read_text())
    # every table records its host: the CPU model, its cores, and the versions of what it ran
    from gptjax.perf import cpu_model

    assert payload["host"].startswith(f"{cpu_model()} ({os.cpu_count()} cores)")
    assert all(f"{name} " in payload["host"] for name in ("jax", "jaxlib", "flax", "optax", "torch"))
    # 2 blocks of weights and LayerNorm scales (no biases: nanoGPT's default), ln_f, wte (the tied head)
    n_params = 2 * (12 * 32 * 32 + 2 * 32) + 32 + 64 * 32
    tiny_flops_per_token = 6 * n_params + 12 * 2 * 16 * 32
    assert [r["impl"] for r in payload["rows"]] == ["gptjax", "torch"]
    for row in payload["rows"]:
        assert {"impl", "config", "ms_per_iter", "tokens_per_s", "mfu", "compile_s"} <= row.keys()
        assert row["config"] == "tiny" and row["ms_per_iter"] > 0 and 0 < row["mfu"] < 1.5
        # tokens/s is the step's tokens over its time: 2 x 4 x 16 tokens per step
        assert row["tokens_per_s"] == pytest.approx(128 / (row["ms_per_iter"] / 1e3), rel=1e-6)
        # model FLOP/s: nanoGPT's count per token (6N + 12 L T C) at that rate, the same for both
        assert row["flops_per_s"] == pytest.approx(row["tokens_per_s"] * tiny_flops_per_token, rel=1e-6)
    assert rows[0].compile_s > 0
    # on a GPU, JAX leaves the memory the PyTorch process needs (XLA preallocates 75% otherwise)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    printed = capsys.readouterr().out
    assert "gptjax / torch:" in printed and "tokens/s" in printed and f"host: {payload['host']}" in printed


@pytest.mark.slow
def test_bench_sampling_rows_alone_against_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "sample.json"
    rows = bench.run(TINY + ["--steps=0", "--sample=12", "--compare=torch", "--name=tiny", f"--json={out}"])
    payload = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in payload] == [r.impl for r in rows] == [
        "gptjax-sample-cache", "gptjax-sample-recompute", "gptjax-sample-cache-b8", "hf-generate", "hf-generate-b8",
        "torch-sample-recompute"]
    for row in payload:
        # tokens/s of generated tokens; ms/iter is the time per generated token
        assert row["tokens_per_s"] > 0 and row["tokens_per_s"] == pytest.approx(1e3 / row["ms_per_iter"], rel=1e-6)
    printed, progress = capsys.readouterr()
    assert "gptjax-sample-cache / torch-sample-recompute:" in printed
    assert "gptjax-sample-cache / gptjax-sample-recompute:" in printed
    assert "gptjax-sample-cache / hf-generate:" in printed and "gptjax-sample-cache-b8 / hf-generate-b8:" in printed
    # each phase is named on stderr, and the token-by-token loops show a progress bar
    for phase in (" at batch 1: gptjax KV cache", " at batch 8: gptjax KV cache", ": gptjax full recomputation",
                  ": PyTorch (nanoGPT's generate", " at batch 8: transformers' generate with its KV cache"):
        assert f"sampling 12 tokens{phase}" in progress
    assert "12/12" in progress and "torch recompute" in progress


def test_sampling_runs_take_turns_and_each_keeps_its_median():
    from gptjax.sampling_bench import alternating_seconds

    order, seen, naps = [], [], iter([0.15, 0.01, 0.05])
    runs = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    runs["c"] = lambda: (order.append("c"), time.sleep(next(naps)))
    seconds = alternating_seconds(runs, 3, lambda name, r: seen.append((name, r)))
    # reversed every other round, so no run always follows the same one
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert seen == [(name, r) for r, names in enumerate(["abc", "cba", "abc"]) for name in names]
    assert set(seconds) == {"a", "b", "c"} and 0.05 <= seconds["c"] < 0.15  # the middle of its three


@pytest.mark.parametrize("flags, problem", [
    (["--steps=0"], "--steps=0 times no train step"),
    (["--steps=0", "--sample=4", "--vs=--attention=plain"], "--steps=0 times no train step"),
    (["--steps=0", "--sample=4", "--tune"], "--steps=0 times no train step"),
    (["--steps=-1"], "give --steps >= 0"),
    (["--rounds=0"], "--rounds >= 1"),
])
def test_bench_rejects_counts_that_time_nothing(capsys, flags, problem):
    assert bench.main(TINY + flags) == 2
    assert problem in capsys.readouterr().err


@pytest.mark.slow
def test_bench_times_variants_in_the_same_rounds(capsys):
    rows = bench.run(TINY + ["--steps=1", "--rounds=2", "--name=tiny", "--vs=--attention=plain",
                             "--vs=--remat=full --dtype=bfloat16"])
    assert [(r.impl, r.config, r.variant) for r in rows] == [
        ("gptjax", "tiny", ""), ("gptjax", "tiny", "--attention=plain"),
        ("gptjax", "tiny", "--remat=full --dtype=bfloat16")]
    assert all(r.ms_per_iter > 0 for r in rows)
    printed, progress = capsys.readouterr()
    assert "compiling gptjax's train step with --attention=plain" in progress
    assert "timing" in progress and "6/6" in progress  # 2 rounds of 3 rows
    assert "gptjax / gptjax --attention=plain:" in printed
    assert "gptjax / gptjax --remat=full --dtype=bfloat16:" in printed


def test_bench_tune_records_the_faster_dot_library_for_this_host(tmp_path, monkeypatch):
    """`python -m gptjax.bench ... --tune`, as a user runs it (in a process of its own: XLA's oneDNN
    path ends the process it cannot build a program in), records the faster library for the run
    that config describes, and that run takes it."""
    from gptjax import autotune
    from gptjax.config import parse_args
    from gptjax.sharding import make_mesh

    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
    out = tmp_path / "rows.json"
    child = subprocess.run([sys.executable, "-m", "gptjax.bench", *TINY, "--steps=1", "--rounds=2", "--tune",
                            f"--json={out}"], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "GPTJAX_CPU_DEVICES": "1"})  # one device, as this process has
    assert child.returncode == 0, (child.returncode, child.stderr[-3000:])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["", "--dot_library=xla", "--dot_library=onednn", "--dot_library=eigen"]
    ms = {r["variant"].split("=")[1]: r["ms_per_iter"] for r in rows[1:]}
    cfg = parse_args(TINY)
    mesh = make_mesh(cfg.dp, cfg.fsdp)
    verdict = autotune.recorded(autotune.run_key(cfg, cfg.model_config(64), mesh))
    assert json.loads(out.read_text())["tune"] == verdict  # the table's file keeps it too
    assert verdict["ms_per_step"] == pytest.approx(ms, abs=1e-3)
    # each library's first step checked against XLA's default: Eigen's computes the same one
    disagreement = verdict["disagreement"]
    assert disagreement.keys() == ms.keys() and disagreement["xla"] == 0 and disagreement["eigen"] < 1e-5
    assert verdict["refused"] == [k for k in sorted(ms) if disagreement[k] > autotune.AGREEMENT]
    # taken: the fastest agreeing library that beat XLA's default by the margin and in each round
    rounds = {r["variant"].split("=")[1]: r["round_ms"] for r in rows[1:]}
    assert all(len(times) == 2 for times in rounds.values()) and verdict["rounds"] == 2
    steady = {k: v for k, v in ms.items() if k not in verdict["refused"]
              and (k == "xla" or all(a < b for a, b in zip(rounds[k], rounds["xla"])))}
    fastest = min(steady, key=steady.get)
    faster = fastest if ms[fastest] < (1 - autotune.MARGIN) * ms["xla"] else "xla"
    assert verdict["dot_library"] == faster
    assert autotune.for_run(cfg, cfg.model_config(64), mesh).dot_library == faster
    assert "recorded for this host and model" in child.stderr
    (kept,) = json.loads((tmp_path / perf.PEAK_RECORDS).read_text()).values()  # the peak, for later runs' MFU
    assert kept["flops"] == pytest.approx(json.loads(out.read_text())["peak_flops"])


def test_bench_variant_may_not_change_the_batch(capsys):
    assert bench.main(TINY + ["--vs=--batch_size=8"]) == 2
    assert "changes batch_size" in capsys.readouterr().err
    assert bench.main(TINY + ["--vs=--no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_torch_rows_run_where_gptjax_runs_and_need_cuda_on_a_gpu():
    """On this CPU host the PyTorch rows run on the CPU; asked for the GPU, a PyTorch without CUDA
    is a clear error rather than a CPU row passed off as a GPU one."""
    import numpy as np
    import torch

    from gptjax.config import parse_args

    assert torch_bench.torch_device() == "cpu"
    cfg = parse_args(TINY)
    tokens = np.zeros((2, 4, 17), np.int32)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="this PyTorch has no CUDA"):
            torch_bench.torch_runner(cfg, tokens, 64, compile=False, device="cuda")
    runner = torch_bench.torch_runner(cfg, tokens, 64, compile=False, device="cpu")
    assert runner.impl == "torch" and runner.run(2) > 0


def test_bench_rejects_bad_keys(capsys):
    assert bench.main(["--no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
