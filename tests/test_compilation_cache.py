"""The command-line tools keep compiled programs across runs (gptjax.perf.enable_compilation_cache)."""

import os
import subprocess
import sys

from gptjax import perf
from test_train import ROOT, step_records


def _train(out_dir, data_dir, env):
    cmd = [sys.executable, "-m", "gptjax.train", "--dataset=shakespeare_char", f"--data_dir={data_dir}",
           f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
           "--gradient_accumulation_steps=1", "--max_iters=4", "--eval_interval=4", "--eval_iters=2",
           "--warmup_iters=1", "--lr_decay_iters=4"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_second_run_reuses_the_first_runs_programs(char_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "GPTJAX_CACHE_DIR")}
    # every program kept: one whose compile time straddles the 0.2 s default would be written
    # by whichever run compiled it more slowly
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), GPTJAX_CPU_DEVICES="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    _train(tmp_path / "first", char_data, env)
    cache = tmp_path / "cache" / "gptjax" / "jax"
    entries = {p.name: p.stat().st_mtime_ns for p in cache.glob("*-cache")}  # (the -atime files: LRU's)
    assert any(name.startswith("jit_train_step-") for name in entries)
    assert any(name.startswith("jit_eval_step-") for name in entries)
    _train(tmp_path / "second", char_data, env)
    # every program came from the cache: nothing compiled, nothing written, and the same numbers
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*-cache")} == entries
    assert step_records(tmp_path / "second") == [
        {**r, **{k: v for k, v in s.items() if k in ("dt_ms", "tokens_per_s", "mfu")}}
        for r, s in zip(step_records(tmp_path / "first"), step_records(tmp_path / "second"))]


def test_the_cache_directory_is_the_users_choice_first(monkeypatch, tmp_path):
    import jax

    saved = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert perf.enable_compilation_cache() == str(tmp_path / "mine")
        monkeypatch.setenv("GPTJAX_COMPILATION_CACHE", "0")
        assert perf.enable_compilation_cache() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved)


def test_the_users_compile_time_threshold_is_kept(monkeypatch, tmp_path):
    """gptjax keeps programs from 0.2 s of compile time, unless the user set JAX's threshold."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_compilation_cache_max_size", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    try:
        for env, want in ((None, 0.2), ("0", 0.0)):
            if env is not None:
                monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", env)
            jax.config.update("jax_compilation_cache_dir", None)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # as JAX reads that variable
            assert perf.enable_compilation_cache() == str(tmp_path / "jax")
            assert jax.config.jax_persistent_cache_min_compile_time_secs == want
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
