"""Test-wide settings: everything runs offline."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Never reach the network from a test: HF hub lookups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


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
