"""Static checks: no unused imports or variables, undefined names or placeholder-less f-strings."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyflakes_finds_nothing():
    targets = [str(ROOT / d) for d in ("gptjax", "configs", "tests", "benchmarks")]
    result = subprocess.run([sys.executable, "-m", "pyflakes", *targets], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout, result.stdout + result.stderr
