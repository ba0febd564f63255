"""The benchmark CLI produces the documented rows, and the CPU device split picks a sane count."""

import json

import pytest

from gptjax import bench, perf

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--vocab_size=64", "--dataset=none"]


def test_bench_json_rows_against_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    rows = bench.run(TINY + ["--steps=2", "--rounds=2", "--compare=torch", "--no-torch-compile",
                             "--name=tiny", f"--json={out}"])
    payload = json.loads(out.read_text())
    assert [r["impl"] for r in payload["rows"]] == ["gptjax", "torch"]
    for row in payload["rows"]:
        assert {"impl", "config", "ms_per_iter", "tokens_per_s", "mfu", "compile_s"} <= row.keys()
        assert row["config"] == "tiny" and row["ms_per_iter"] > 0 and 0 < row["mfu"] < 1.5
        # tokens/s is the step's tokens over its time: 2 x 4 x 16 tokens per step
        assert row["tokens_per_s"] == pytest.approx(128 / (row["ms_per_iter"] / 1e3), rel=1e-6)
    assert rows[0].compile_s > 0
    printed = capsys.readouterr().out
    assert "gptjax / torch:" in printed and "tokens/s" in printed


def test_bench_rejects_bad_keys(capsys):
    assert bench.main(["--no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


@pytest.mark.parametrize("limit, batch, expected", [("2", 12, 2), ("8", 12, 6), ("4", 7, 1), ("1", 64, 1)])
def test_cpu_split_divides_the_batch(monkeypatch, limit, batch, expected):
    monkeypatch.setenv("XLA_FLAGS", "")  # setenv (not delenv of a missing key) restores it afterwards
    monkeypatch.setenv("GPTJAX_CPU_DEVICES", limit)
    assert perf.split_cpu_devices(batch) == expected
    flags = perf.os.environ.get("XLA_FLAGS", "")
    assert (f"device_count={expected}" in flags) == (expected > 1)


def test_cpu_split_respects_user_flags_and_a_started_backend(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert perf.split_cpu_devices(12) == 1
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.delenv("GPTJAX_CPU_DEVICES", raising=False)
    import jax

    jax.devices()  # the backend is up in this process: changing flags now would do nothing
    assert perf.split_cpu_devices(12) == 1
    assert "XLA_FLAGS" not in perf.os.environ
