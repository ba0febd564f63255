"""Fixtures of the fault tests: one tiny dataset and compilation cache, and one uninterrupted
reference run, shared by every test in this folder (package scope: the reference trains once)."""

import os
import random
import shutil
from types import SimpleNamespace

import pytest

from gptjax import prepare

from _faults import CORPUS, M, ROOT, Child, args, complete, params


@pytest.fixture(scope="package")
def space(tmp_path_factory):
    """A tiny char dataset, a shared compilation cache, and a way to start children that are all
    killed at the end whatever happens."""
    root = tmp_path_factory.mktemp("faults")
    text = CORPUS.read_text()[:20000] if CORPUS.is_file() else "".join(
        random.Random(0).choice("abcdefghij klmnop\n") for _ in range(20000))
    prepare.prepare_shakespeare_char(text, root / "data")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, always
    env.update(GPTJAX_CPU_DEVICES="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    children = []

    class Space:
        data = root / "data"

        def start(self, name, argv, extra_env=None, **kw):
            children.append(Child(root, name, argv, {**env, **(extra_env or {})}, **kw))
            return children[-1]

        def run(self, name, argv, **kw):
            child = self.start(name, argv, **kw)
            child.wait()
            return child

        def fresh(self, name, like=None):
            out = root / name
            if like is not None:
                shutil.copytree(like, out)
            return out

    try:
        yield Space()
    finally:
        for child in children:
            child.kill()



@pytest.fixture(scope="package")
def reference(space):
    """One uninterrupted run of M iterations, a checkpoint after every one."""
    out = space.fresh("reference")
    child = space.run("reference", args(out, space.data))
    assert child.proc.returncode == 0, child.output()[-3000:]
    assert complete(out) == list(range(1, M + 1))
    return SimpleNamespace(out=out, final=params(out))
