"""Test-wide settings: everything runs offline."""

import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Never reach the network from a test: HF hub lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
# One compilation cache for the session's processes (the command-line tools keep one,
# gptjax.perf.enable_compilation_cache), so the many small runs compile each program once, and
# never the user's ~/.cache
_JAX_CACHE = tempfile.mkdtemp(prefix="gptjax-tests-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
# gptjax's own cache (bucket copies, the kernel choices measured on this host): the session's too
_GPTJAX_CACHE = tempfile.mkdtemp(prefix="gptjax-tests-cache-")
os.environ.setdefault("GPTJAX_CACHE_DIR", _GPTJAX_CACHE)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)
    shutil.rmtree(_GPTJAX_CACHE, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """nanoGPT's shakespeare_char prepared from the corpus's first 50,000 characters."""
    corpus = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if not corpus.is_file():
        pytest.skip(f"tiny-shakespeare corpus not found at {corpus}")
    from gptjax.prepare import prepare_shakespeare_char

    out = tmp_path_factory.mktemp("shakespeare_char")
    prepare_shakespeare_char(corpus.read_text(encoding="utf-8")[:50_000], out)
    return out


@pytest.fixture
def compilations():
    """XLA compilations seen while the test runs: bad input must be refused before any."""
    import jax.monitoring

    seen = []

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)
