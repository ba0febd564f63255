"""Pytree comparison shared by the tests."""

import jax
import numpy as np


def assert_trees_equal(a, b):
    """The same tree structure and, leaf by leaf, the same shapes, dtypes and values."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, (x.dtype, y.dtype)
        np.testing.assert_array_equal(x, y)
