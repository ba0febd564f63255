"""A persistent JAX compilation cache for one pytest session, for tests that train repeatedly."""

import contextlib


@contextlib.contextmanager
def session_compile_cache(tmp_path_factory):
    """train() jits fresh step functions on every call: a persistent compilation cache (for this
    pytest session only) lets runs of the same model reuse the executables instead of recompiling."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        cc.reset_cache()
