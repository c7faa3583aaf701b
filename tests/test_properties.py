"""Property-based tests: random shapes, dtypes and index patterns, for every strategy.

Hypothesis draws the problem (zero-sized batch, windows and block sizes
included; float16 to float64, mixed; any integer index dtype; random, repeated,
negative and all-on-one-block indices); every strategy of the library computes
the three ops and their gradients in one jitted function, checked against the
plain loops of ``tests/reference.py`` (Theano's formulas).  The profile is
derandomized and small, so CI is deterministic and quick.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blocksparse_jax as bsj
from blocksparse_jax import blocksparse as bs
from tests.reference import dot_ref, gemv_grads_ref, gemv_ref, outer_ref

STRATEGIES = bs.STRATEGIES

FLOATS = (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16)
INTS = (jnp.int8, jnp.int16, jnp.int32, jnp.int64, jnp.uint8)
PATTERNS = ("random", "repeated", "negative", "one_block")
# Relative tolerance by the least precise dtype involved (applied to max |reference| + 1).
TOL = {
    np.dtype(jnp.float64): 1e-12,
    np.dtype(jnp.float32): 1e-5,
    np.dtype(jnp.float16): 5e-3,
    np.dtype(jnp.bfloat16): 4e-2,
}

PROFILE = settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def problems(draw):
    """``(dims, w_dtype, x_dtype, idx_dtype, pattern, seed)``; every dimension may be 0."""
    dims = dict(
        batch=draw(st.integers(0, 3)),
        i_win=draw(st.integers(0, 3)),
        o_win=draw(st.integers(0, 3)),
        i_size=draw(st.integers(0, 3)),
        o_size=draw(st.integers(0, 3)),
        i_blocks=draw(st.integers(1, 4)),
        o_blocks=draw(st.integers(1, 4)),
    )
    pattern = draw(st.sampled_from(PATTERNS))
    idx_dtype = draw(st.sampled_from(INTS))
    if pattern == "negative" and idx_dtype == jnp.uint8:
        idx_dtype = jnp.int8
    return (
        dims,
        draw(st.sampled_from(FLOATS)),  # W (and b)
        draw(st.sampled_from(FLOATS)),  # o, h and the cotangents
        idx_dtype,
        pattern,
        draw(st.integers(0, 2**16)),
    )


def _indices(rng, batch, win, n, pattern):
    idx = rng.integers(0, n, (batch, win))
    if pattern == "repeated" and win > 1:
        idx[:, 1:] = idx[:, :1]  # every slot of a row on the same block
        idx[1:] = idx[:1]  # and every row alike
    elif pattern == "negative":
        idx = idx - n  # -n .. -1, counting from the end
    elif pattern == "one_block":
        idx[:] = n - 1
    return idx


def _make(dims, w_dtype, x_dtype, idx_dtype, pattern, seed):
    """Arrays in their dtypes, and the same values in float64 NumPy for the reference."""
    rng = np.random.default_rng(seed)
    d = dims
    f = lambda dtype, *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    arrays = dict(
        W=f(w_dtype, d["i_blocks"], d["o_blocks"], d["i_size"], d["o_size"]),
        b=f(w_dtype, d["o_blocks"], d["o_size"]),
        G=f(w_dtype, d["i_blocks"], d["o_blocks"], d["i_size"], d["o_size"]),
        o=f(x_dtype, d["batch"], d["o_win"], d["o_size"]),
        h=f(x_dtype, d["batch"], d["i_win"], d["i_size"]),
        y=f(x_dtype, d["batch"], d["o_win"], d["o_size"]),
        g1=f(x_dtype, d["batch"], d["o_win"], d["o_size"]),
        g2=f(w_dtype, d["batch"], d["o_win"], d["o_size"]),
        alpha=jnp.asarray(rng.uniform(-2, 2), x_dtype),
        ii=jnp.asarray(_indices(rng, d["batch"], d["i_win"], d["i_blocks"], pattern), idx_dtype),
        oi=jnp.asarray(_indices(rng, d["batch"], d["o_win"], d["o_blocks"], pattern), idx_dtype),
    )
    ref = {
        k: np.asarray(v, np.float64 if k not in ("ii", "oi") else np.int64)
        for k, v in arrays.items()
    }
    return arrays, ref


_COMPILED = {}


def _ops_and_grads(strategy):
    """One jitted function: the three ops and the gradient of a loss that uses all of them."""
    if strategy in _COMPILED:
        return _COMPILED[strategy]
    kw = {} if strategy is None else {"strategy": strategy}

    def f(a):
        def loss(o, W, h, b, y, alpha):
            out = bsj.sparse_block_gemv(o, W, h, a["ii"], a["oi"], **kw)
            d = bsj.sparse_block_dot(W, h, a["ii"], b, a["oi"], **kw)
            u = bsj.sparse_block_outer(W, h, y, a["ii"], a["oi"], alpha, **kw)
            acc = lambda x, c: jnp.sum(x.astype(jnp.float64) * c.astype(jnp.float64))
            return acc(out, a["g1"]) + acc(d, a["g2"]) + acc(u, a["G"]), (out, d, u)

        args = (a["o"], a["W"], a["h"], a["b"], a["y"], a["alpha"])
        (_, values), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(*args)
        return values, grads

    _COMPILED[strategy] = jax.jit(f)
    return _COMPILED[strategy]


def _expected(r):
    """Values and gradients from the loop references (float64)."""
    out = gemv_ref(r["o"], r["W"], r["h"], r["ii"], r["oi"])
    d = dot_ref(r["W"], r["h"], r["ii"], r["b"], r["oi"])
    u = outer_ref(r["W"], r["h"], r["y"], r["ii"], r["oi"], r["alpha"])
    dW1, dh1 = gemv_grads_ref(r["W"], r["h"], r["ii"], r["oi"], r["g1"])
    dW2, dh2 = gemv_grads_ref(r["W"], r["h"], r["ii"], r["oi"], r["g2"])
    db = np.zeros_like(r["b"])
    for n in range(r["oi"].shape[0]):
        for j in range(r["oi"].shape[1]):
            db[r["oi"][n, j]] += r["g2"][n, j]
    # The outer product's cotangents are gemv loops over G (Theano's SparseBlockOuter grad).
    zeros_h, zeros_y = np.zeros_like(r["h"]), np.zeros_like(r["y"])
    dh3 = gemv_ref(zeros_h, r["G"].transpose(1, 0, 3, 2), r["y"], r["oi"], r["ii"])
    dy = gemv_ref(zeros_y, r["G"], r["h"], r["ii"], r["oi"])
    dalpha = np.sum(dy * r["y"])
    grads = (r["g1"], dW1 + dW2 + r["G"], dh1 + dh2 + r["alpha"] * dh3, db, r["alpha"] * dy, dalpha)
    return (out, d, u), grads


def _assert_close(actual, expected, dtype, what):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == np.shape(expected), (what, actual.shape, np.shape(expected))
    tol = TOL[dtype]
    scale = 1.0 + (np.max(np.abs(expected)) if np.size(expected) else 0.0)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("strategy", STRATEGIES)
@PROFILE
@given(problem=problems())
def test_values_and_gradients_match_loop_reference(strategy, problem):
    arrays, ref = _make(*problem)
    values, grads = _ops_and_grads(strategy)(arrays)
    exp_values, exp_grads = _expected(ref)
    w_dtype, x_dtype = np.dtype(problem[1]), np.dtype(problem[2])
    low = max((w_dtype, x_dtype), key=lambda dt: TOL[dt])
    for name, v, e in zip(("gemv", "dot", "outer"), values, exp_values, strict=True):
        _assert_close(v, e, low, name)
    assert values[0].dtype == x_dtype and values[1].dtype == w_dtype and values[2].dtype == w_dtype
    names = ("d_o", "d_W", "d_h", "d_b", "d_y", "d_alpha")
    inputs = (arrays["o"], arrays["W"], arrays["h"], arrays["b"], arrays["y"], arrays["alpha"])
    for name, g, e, x in zip(names, grads, exp_grads, inputs, strict=True):
        assert g.dtype == x.dtype, name
        _assert_close(g, e, low, name)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bit_identical_run_to_run(strategy):
    """Same inputs, same bits: repeated calls, and a freshly traced and compiled function."""
    dims = dict(batch=3, i_win=3, o_win=2, i_size=3, o_size=2, i_blocks=2, o_blocks=2)
    arrays, _ = _make(dims, jnp.float32, jnp.float32, jnp.int32, "repeated", seed=7)
    first = jax.device_get(_ops_and_grads(strategy)(arrays))
    again = jax.device_get(_ops_and_grads(strategy)(arrays))
    _COMPILED.pop(strategy)
    fresh = jax.device_get(_ops_and_grads(strategy)(arrays))
    for other in (again, fresh):
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)
