"""The core ops against the plain-loop references of tests/reference.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from blocksparse_jax import sparse_block_dot, sparse_block_gemv, sparse_block_outer
from tests.reference import dot_ref, gemv_grads_ref, gemv_ref, outer_ref

# (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size)
SHAPES = {
    "general": (3, 5, 6, 2, 3, 4, 3),
    "i_win=1": (3, 5, 6, 1, 3, 4, 3),
    "o_win=1": (3, 5, 6, 2, 1, 4, 3),
    "all_ones": (1, 1, 1, 1, 1, 1, 1),
    "batch=1": (1, 4, 4, 2, 2, 3, 5),
    "i_size!=o_size": (2, 3, 4, 2, 2, 7, 2),
}

TOL = {
    jnp.float64: dict(rtol=1e-12, atol=1e-12),
    jnp.float32: dict(rtol=1e-5, atol=1e-5),
    jnp.bfloat16: dict(rtol=2e-2, atol=5e-2),
    jnp.float16: dict(rtol=2e-3, atol=5e-3),
}


def make_problem(shape, dtype=jnp.float32, *, seed=0, pattern="random", idx_dtype=jnp.int32):
    """Random ``(o, W, h, input_idx, output_idx)`` with an index pattern."""
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((i_blocks, o_blocks, i_size, o_size))
    h = rng.standard_normal((batch, i_win, i_size))
    o = rng.standard_normal((batch, o_win, o_size))
    ii = rng.integers(0, i_blocks, (batch, i_win))
    oi = rng.integers(0, o_blocks, (batch, o_win))
    if pattern == "repeated":  # the same block twice within a row
        ii[:, -1] = ii[:, 0]
        oi[:, -1] = oi[:, 0]
    elif pattern == "same_block":  # every example on the same block
        ii[:] = i_blocks - 1
        oi[:] = 0
    elif pattern == "negative":  # count from the end, as NumPy and Theano do
        ii = ii - i_blocks
        oi[:, ::2] = oi[:, ::2] - o_blocks
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(o), cast(W), cast(h), jnp.asarray(ii, idx_dtype), jnp.asarray(oi, idx_dtype)


def assert_close(actual, expected, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, **TOL[dtype])


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gemv_values(shape, transform):
    o, W, h, ii, oi = make_problem(shape)
    out = transform(sparse_block_gemv)(o, W, h, ii, oi)
    chex.assert_shape(out, o.shape)
    assert out.dtype == jnp.float32
    assert_close(out, gemv_ref(o, W, h, ii, oi), jnp.float32)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_outer_values(shape, transform):
    o, W, h, ii, oi = make_problem(shape)
    out = transform(sparse_block_outer)(W, h, o, ii, oi, 0.5)
    chex.assert_shape(out, W.shape)
    assert_close(out, outer_ref(W, h, o, ii, oi, 0.5), jnp.float32)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dot_values(shape, transform):
    o, W, h, ii, oi = make_problem(shape)
    b = jnp.asarray(np.random.default_rng(1).standard_normal(W.shape[1:4:2]), jnp.float32)
    out = transform(sparse_block_dot)(W, h, ii, b, oi)
    assert_close(out, dot_ref(W, h, ii, b, oi), jnp.float32)


@pytest.mark.parametrize("pattern", ["repeated", "same_block", "negative"])
def test_index_patterns(pattern, transform):
    o, W, h, ii, oi = make_problem(SHAPES["general"], pattern=pattern)
    assert_close(
        transform(sparse_block_gemv)(o, W, h, ii, oi), gemv_ref(o, W, h, ii, oi), jnp.float32
    )
    # x_idx/y_idx of the outer product play the roles of input_idx/output_idx.
    assert_close(
        transform(sparse_block_outer)(W, h, o, ii, oi),
        outer_ref(W, h, o, ii, oi),
        jnp.float32,
    )


def test_repeated_blocks_accumulate_in_outer():
    # Two examples and two window slots all on block (1, 2): four updates add up.
    W = jnp.zeros((2, 3, 1, 1), jnp.float32)
    x = jnp.ones((2, 2, 1), jnp.float32)
    y = jnp.full((2, 1, 1), 2.0, jnp.float32)
    out = sparse_block_outer(W, x, y, jnp.ones((2, 2), jnp.int32), jnp.full((2, 1), 2, jnp.int32))
    assert float(out[1, 2, 0, 0]) == 8.0
    assert float(jnp.sum(out)) == 8.0


def test_alpha_is_applied():
    # Theano's CPU op ignored alpha; the documented formula multiplies by it.
    o, W, h, ii, oi = make_problem(SHAPES["general"], jnp.float64)
    a = sparse_block_outer(W, h, o, ii, oi, alpha=-0.25)
    np.testing.assert_allclose(a, outer_ref(W, h, o, ii, oi, -0.25), rtol=1e-12)
    assert not np.allclose(a, sparse_block_outer(W, h, o, ii, oi))


def test_bias_added_once_per_output_slot():
    # i_win = 3 input blocks, zero weights: the output is the bias, not 3x the bias.
    W = jnp.zeros((4, 2, 2, 3), jnp.float32)
    b = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    h = jnp.ones((1, 3, 2), jnp.float32)
    out = sparse_block_dot(W, h, jnp.array([[0, 1, 2]]), b, jnp.array([[1, 0]]))
    np.testing.assert_array_equal(out, np.array([[[3, 4, 5], [0, 1, 2]]], np.float32))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes(dtype):
    o, W, h, ii, oi = make_problem(SHAPES["general"], dtype)
    out = jax.jit(sparse_block_gemv)(o, W, h, ii, oi)
    assert out.dtype == dtype
    assert_close(out, gemv_ref(o, W, h, ii, oi), dtype)
    upd = jax.jit(sparse_block_outer)(W, h, o, ii, oi)
    assert upd.dtype == dtype
    assert_close(upd, outer_ref(W, h, o, ii, oi), dtype)


def test_mixed_dtypes_output_follows_o_and_b():
    o, W, h, ii, oi = make_problem(SHAPES["general"], jnp.float32)
    W16, h64 = W.astype(jnp.bfloat16), h.astype(jnp.float64)
    out = sparse_block_gemv(o, W16, h64, ii, oi)
    assert out.dtype == jnp.float32
    assert_close(out, gemv_ref(o, W16, h64, ii, oi), jnp.float32)
    out = sparse_block_gemv(o.astype(jnp.float16), W, h.astype(jnp.bfloat16), ii, oi)
    assert out.dtype == jnp.float16
    b = jnp.zeros(W.shape[1:4:2], jnp.bfloat16)
    assert sparse_block_dot(W, h, ii, b, oi).dtype == jnp.bfloat16
    upd = sparse_block_outer(W.astype(jnp.float16), h, o.astype(jnp.float64), ii, oi)
    assert upd.dtype == jnp.float16


def test_low_precision_accumulates_in_float32():
    # 4096 products of 1 * 1: a bfloat16 accumulator stalls at 256 (8-bit mantissa).
    W = jnp.ones((1, 1, 4096, 1), jnp.bfloat16)
    h = jnp.ones((1, 1, 4096), jnp.bfloat16)
    idx = jnp.zeros((1, 1), jnp.int32)
    out = sparse_block_gemv(jnp.zeros((1, 1, 1), jnp.bfloat16), W, h, idx, idx)
    assert float(out[0, 0, 0]) == 4096.0
    # The outer product accumulates repeated blocks in float32 too.
    x = jnp.ones((4096, 1, 1), jnp.bfloat16)
    upd = sparse_block_outer(
        jnp.zeros((1, 1, 1, 1), jnp.bfloat16), x, x, idx.repeat(4096, 0), idx.repeat(4096, 0)
    )
    assert float(upd[0, 0, 0, 0]) == 4096.0


@pytest.mark.parametrize("idx_dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.int64, jnp.uint32])
def test_index_dtypes(idx_dtype):
    pattern = "random" if jnp.issubdtype(idx_dtype, jnp.unsignedinteger) else "negative"
    o, W, h, ii, oi = make_problem(SHAPES["general"], pattern=pattern, idx_dtype=idx_dtype)
    assert_close(
        jax.jit(sparse_block_gemv)(o, W, h, ii, oi), gemv_ref(o, W, h, ii, oi), jnp.float32
    )


def test_per_example_call():
    o, W, h, ii, oi = make_problem(SHAPES["general"])
    out = sparse_block_gemv(o[1], W, h[1], ii[1], oi[1])
    chex.assert_shape(out, o.shape[1:])
    assert_close(out, gemv_ref(o, W, h, ii, oi)[1], jnp.float32)
    b = W[0, :, 0, :]
    assert_close(
        sparse_block_dot(W, h[2], ii[2], b, oi[2]), dot_ref(W, h, ii, b, oi)[2], jnp.float32
    )
    upd = sparse_block_outer(W, h[0], o[0], ii[0], oi[0])
    assert_close(upd, outer_ref(W, h[:1], o[:1], ii[:1], oi[:1]), jnp.float32)


# --------------------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------------------


def test_vmap_per_example_with_shared_W():
    o, W, h, ii, oi = make_problem(SHAPES["general"])
    out = jax.vmap(sparse_block_gemv, in_axes=(0, None, 0, 0, 0))(o, W, h, ii, oi)
    assert_close(out, gemv_ref(o, W, h, ii, oi), jnp.float32)
    b = W[:, :, 0, :].sum(0)
    out = jax.vmap(sparse_block_dot, in_axes=(None, 0, 0, None, 0))(W, h, ii, b, oi)
    assert_close(out, dot_ref(W, h, ii, b, oi), jnp.float32)
    # Per-example outer products summed over the batch equal the batched one.
    upd = jax.vmap(sparse_block_outer, in_axes=(None, 0, 0, 0, 0))(jnp.zeros_like(W), h, o, ii, oi)
    assert_close(upd.sum(0), outer_ref(jnp.zeros_like(W), h, o, ii, oi), jnp.float32)


def test_vmap_extra_leading_axis_over_everything_but_W():
    probs = [make_problem(SHAPES["general"], seed=s) for s in range(3)]
    W = probs[0][1]
    o, h, ii, oi = (jnp.stack([p[k] for p in probs]) for k in (0, 2, 3, 4))
    out = jax.jit(jax.vmap(sparse_block_gemv, in_axes=(0, None, 0, 0, 0)))(o, W, h, ii, oi)
    for n in range(3):
        assert_close(out[n], gemv_ref(o[n], W, h[n], ii[n], oi[n]), jnp.float32)
    upd = jax.vmap(sparse_block_outer, in_axes=(None, 0, 0, 0, 0))(W, h, o, ii, oi)
    for n in range(3):
        assert_close(upd[n], outer_ref(W, h[n], o[n], ii[n], oi[n]), jnp.float32)


def test_vmap_over_W_too():
    probs = [make_problem(SHAPES["general"], seed=s) for s in range(2)]
    args = [jnp.stack([p[k] for p in probs]) for k in range(5)]
    out = jax.vmap(sparse_block_gemv)(*args)
    for n in range(2):
        assert_close(out[n], gemv_ref(*(a[n] for a in args)), jnp.float32)


def test_per_example_gradients():
    o, W, h, ii, oi = make_problem(SHAPES["general"], jnp.float64)
    g = jnp.asarray(np.random.default_rng(3).standard_normal(o.shape))

    def loss(W, h, ii, oi, g):
        return jnp.sum(sparse_block_gemv(jnp.zeros_like(g), W, h, ii, oi) * g)

    dW, dh = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0, 0, 0))(W, h, ii, oi, g)
    chex.assert_shape(dW, (o.shape[0],) + W.shape)
    for n in range(o.shape[0]):
        rW, rh = gemv_grads_ref(W, h[n : n + 1], ii[n : n + 1], oi[n : n + 1], g[n : n + 1])
        np.testing.assert_allclose(dW[n], rW, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dh[n], rh[0], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["random", "repeated", "negative"])
def test_gemv_grads_order2(pattern):
    o, W, h, ii, oi = make_problem((2, 3, 4, 2, 2, 3, 2), jnp.float64, pattern=pattern)
    f = lambda o, W, h: sparse_block_gemv(o, W, h, ii, oi)
    check_grads(f, (o, W, h), order=2, modes=["rev"])


def test_grad_with_respect_to_a_python_float_alpha():
    o, W, h, ii, oi = make_problem(SHAPES["general"], jnp.float64)
    f = lambda a: jnp.sum(sparse_block_outer(jnp.zeros_like(W), h, o, ii, oi, a) ** 2)
    # f(a) = a**2 f(1), so f'(1.5) = 3 f(1).
    np.testing.assert_allclose(jax.grad(f)(1.5), 3 * f(1.0), rtol=1e-12)


def test_outer_grads_order2():
    o, W, h, ii, oi = make_problem((2, 3, 4, 2, 2, 3, 2), jnp.float64, pattern="repeated")
    f = lambda W, h, o, alpha: sparse_block_outer(W, h, o, ii, oi, alpha)
    check_grads(f, (W, h, o, jnp.float64(0.7)), order=2, modes=["rev"])


def test_dot_grads_order2():
    o, W, h, ii, oi = make_problem((2, 3, 4, 2, 2, 3, 2), jnp.float64, pattern="repeated")
    b = jnp.asarray(np.random.default_rng(5).standard_normal((4, 2)))
    f = lambda W, h, b: sparse_block_dot(W, h, ii, b, oi)
    check_grads(f, (W, h, b), order=2, modes=["rev"])


def test_grads_equal_explicit_sums():
    o, W, h, ii, oi = make_problem(SHAPES["general"], jnp.float64, pattern="repeated")
    g = jnp.asarray(np.random.default_rng(4).standard_normal(o.shape))
    loss = lambda o, W, h: jnp.sum(sparse_block_gemv(o, W, h, ii, oi) * g)
    do, dW, dh = jax.grad(loss, argnums=(0, 1, 2))(o, W, h)
    rW, rh = gemv_grads_ref(W, h, ii, oi, g)
    np.testing.assert_allclose(do, g)
    np.testing.assert_allclose(dW, rW, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dh, rh, rtol=1e-12, atol=1e-12)
    # The weight gradient is the block outer product, as Theano derived it.
    np.testing.assert_allclose(dW, sparse_block_outer(jnp.zeros_like(W), h, g, ii, oi), rtol=1e-12)


def test_third_order_grad_runs():
    o, W, h, ii, oi = make_problem((2, 3, 3, 2, 2, 2, 2), jnp.float64, pattern="repeated")
    o = jnp.zeros_like(o)
    f = lambda s: jnp.sum(sparse_block_gemv(o, W * s, h * s, ii, oi) ** 2)
    # f(s) = f(1) * s**4, so the third derivative at 1 is 24 f(1).
    d3 = jax.grad(jax.grad(jax.grad(f)))(jnp.float64(1.0))
    np.testing.assert_allclose(d3, 24 * f(jnp.float64(1.0)), rtol=1e-10)


def test_forward_saves_no_gathered_blocks():
    o, W, h, ii, oi = make_problem((4, 3, 5, 2, 3, 6, 7), jnp.float32)
    _, f_vjp = jax.vjp(lambda W, h: sparse_block_gemv(o, W, h, ii, oi), W, h)
    shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(f_vjp)]
    gathered = 4 * 2 * 3 * 6 * 7  # batch * i_win * o_win * i_size * o_size
    assert all(int(np.prod(s)) < gathered for s in shapes), shapes
    # W, then only activation-sized arrays (h, index arrays, the masks of out-of-range
    # entries): far below the gathered blocks.
    saved = sum(int(np.prod(s)) for s in shapes)
    assert saved <= W.size + 3 * (h.size + o.size) + ii.size + oi.size, shapes


# --------------------------------------------------------------------------------------
# A jitted training step
# --------------------------------------------------------------------------------------


def test_training_step_compiles_once_and_learns():
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = 8, 6, 6, 2, 2, 4, 3
    rng = np.random.default_rng(0)
    W_true = jnp.asarray(rng.standard_normal((i_blocks, o_blocks, i_size, o_size)), jnp.float32)
    params = {
        "W": jnp.zeros_like(W_true),
        "b": jnp.zeros((o_blocks, o_size), jnp.float32),
    }

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, h, ii, oi, target):
        def loss_fn(p):
            pred = sparse_block_dot(p["W"], h, ii, p["b"], oi)
            return jnp.sum((pred - target) ** 2) / batch

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads), loss

    losses = []
    for s in range(60):
        h = jnp.asarray(rng.standard_normal((batch, i_win, i_size)), jnp.float32)
        ii = jnp.asarray(rng.integers(0, i_blocks, (batch, i_win)), jnp.int32)
        oi = jnp.asarray(rng.integers(0, o_blocks, (batch, o_win)), jnp.int32)
        target = sparse_block_gemv(
            jnp.zeros((batch, o_win, o_size), jnp.float32), W_true, h, ii, oi
        )
        params, loss = step(params, h, ii, oi, target)
        losses.append(float(loss))
        assert s == 0 or np.isfinite(loss)
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), losses
    chex.clear_trace_counter()


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def _good():
    return make_problem(SHAPES["general"])


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (
            lambda a: a.update(W=a["W"][0, 0]),
            ValueError,
            r"W must be 4-D \(i_blocks, o_blocks, i_size, o_size\); got shape \(4, 3\)",
        ),
        (
            lambda a: a.update(h=a["h"][..., None]),
            ValueError,
            r"h must be 3-D \(batch, i_win, i_size\) or, for one example, 2-D \(i_win, i_size\); got shape \(3, 2, 4, 1\)",
        ),
        (
            lambda a: a.update(h=a["h"][..., :3]),
            ValueError,
            r"h must have shape \(batch, i_win, i_size\) with i_size=4 \(W.shape\[2\]\); got shape \(3, 2, 3\)",
        ),
        (
            lambda a: a.update(o=a["o"][..., :2]),
            ValueError,
            r"o must have shape \(batch, o_win, o_size\) = \(3, 3, 3\) from output_idx and W; got shape \(3, 3, 2\)",
        ),
        (
            lambda a: a.update(ii=a["ii"][:, :1]),
            ValueError,
            r"input_idx must have shape \(batch, i_win\) = \(3, 2\) to match h of shape \(3, 2, 4\); got shape \(3, 1\)",
        ),
        (
            lambda a: a.update(oi=a["oi"][:2]),
            ValueError,
            r"output_idx must have shape \(batch, o_win\) with the batch of h of shape \(3, 2, 4\); got shape \(2, 3\)",
        ),
        (
            lambda a: a.update(ii=a["ii"].astype(jnp.float32)),
            TypeError,
            r"input_idx must be an array of integer block indices; got dtype float32",
        ),
        (
            lambda a: a.update(oi=a["oi"].astype(jnp.float32)),
            TypeError,
            r"output_idx must be an array of integer block indices; got dtype float32",
        ),
        (
            lambda a: a.update(W=a["W"].astype(jnp.int32)),
            TypeError,
            r"W must have a floating dtype \(float16, bfloat16, float32 or float64\); got dtype int32",
        ),
        (
            lambda a: a.update(h=a["h"].astype(jnp.complex64)),
            TypeError,
            r"h must have a floating dtype .*; got dtype complex64",
        ),
        (
            lambda a: a.update(ii=a["ii"].at[1, 0].set(5)),
            IndexError,
            r"input_idx holds 5 at position \(1, 0\), out of range for i_blocks=5 \(valid values are -5 <= input_idx < 5\)",
        ),
        (
            lambda a: a.update(oi=a["oi"].at[2, 2].set(-7)),
            IndexError,
            r"output_idx holds -7 at position \(2, 2\), out of range for o_blocks=6",
        ),
    ],
)
def test_gemv_bad_input(mutate, exc, message):
    o, W, h, ii, oi = _good()
    a = dict(o=o, W=W, h=h, ii=ii, oi=oi)
    mutate(a)
    with pytest.raises(exc, match=message):
        sparse_block_gemv(a["o"], a["W"], a["h"], a["ii"], a["oi"])
    if exc is not IndexError:  # static errors are raised at trace time too
        with pytest.raises(exc, match=message):
            jax.jit(sparse_block_gemv)(a["o"], a["W"], a["h"], a["ii"], a["oi"])


def test_dot_bad_bias():
    o, W, h, ii, oi = _good()
    with pytest.raises(
        ValueError,
        match=r"b must have shape \(o_blocks, o_size\) = \(6, 3\) from W of shape \(5, 6, 4, 3\); got shape \(3, 6\)",
    ):
        sparse_block_dot(W, h, ii, jnp.zeros((3, 6), jnp.float32), oi)
    with pytest.raises(TypeError, match="b must have a floating dtype"):
        sparse_block_dot(W, h, ii, jnp.zeros((6, 3), jnp.int32), oi)
    with pytest.raises(IndexError, match="output_idx holds 6 at position"):
        sparse_block_dot(W, h, ii, jnp.zeros((6, 3), jnp.float32), oi.at[0, 0].set(6))


@pytest.mark.parametrize(
    "mutate, exc, message",
    [
        (
            lambda a: a.update(o=a["o"][0]),
            ValueError,
            r"o must be 4-D \(x_blocks, y_blocks, x_size, y_size\); got shape \(6, 4, 3\)",
        ),
        (
            lambda a: a.update(x=a["x"][..., :2]),
            ValueError,
            r"x must have shape \(batch, x_win, x_size\) with x_size=4 \(o.shape\[2\]\); got shape \(3, 2, 2\)",
        ),
        (
            lambda a: a.update(y=a["y"][:2], yi=a["yi"][:2]),
            ValueError,
            r"x and y must have the same batch size; got x of shape \(3, 2, 4\) and y of shape \(2, 3, 3\)",
        ),
        (
            lambda a: a.update(y=a["y"][0], yi=a["yi"][0]),
            ValueError,
            r"both must be batched \(3-D\) or both per-example \(2-D\)",
        ),
        (
            lambda a: a.update(alpha=jnp.ones(2, jnp.float32)),
            ValueError,
            r"alpha must be a scalar; got shape \(2,\)",
        ),
        (
            lambda a: a.update(xi=a["xi"].astype(jnp.float64)),
            TypeError,
            r"x_idx must be an array of integer block indices",
        ),
        (
            lambda a: a.update(yi=a["yi"].at[0, 1].set(6)),
            IndexError,
            r"y_idx holds 6 at position \(0, 1\), out of range for y_blocks=6",
        ),
    ],
)
def test_outer_bad_input(mutate, exc, message):
    o, W, h, ii, oi = _good()
    a = dict(o=W, x=h, y=o, xi=ii, yi=oi, alpha=1.0)
    mutate(a)
    with pytest.raises(exc, match=message):
        sparse_block_outer(a["o"], a["x"], a["y"], a["xi"], a["yi"], a["alpha"])


def test_out_of_range_under_jit_is_masked_and_finite():
    o, W, h, ii, oi = make_problem(SHAPES["general"], jnp.float64)
    ii_bad = ii.at[0, 1].set(99).at[2, 0].set(-6)
    oi_bad = oi.at[1, 2].set(6)
    out = jax.jit(sparse_block_gemv)(o, W, h, ii_bad, oi_bad)
    assert np.all(np.isfinite(out))
    # Documented: the bad input block contributes nothing, the bad output slot keeps o.
    h_ref = np.array(h)
    h_ref[0, 1] = 0
    h_ref[2, 0] = 0
    ii_ok = np.where((np.asarray(ii_bad) >= -5) & (np.asarray(ii_bad) < 5), np.asarray(ii_bad), 0)
    expected = gemv_ref(o, W, h_ref, ii_ok, np.minimum(np.asarray(oi_bad), 5))
    expected[1, 2] = np.asarray(o)[1, 2]
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    # sparse_block_dot: no block and no bias for the bad output slot.
    b = jnp.ones((6, 3), jnp.float64)
    dot = jax.jit(sparse_block_dot)(W, h, ii, b, oi_bad)
    np.testing.assert_array_equal(dot[1, 2], np.zeros(3))
    # sparse_block_outer: the update of an out-of-range block is dropped.
    upd = jax.jit(sparse_block_outer)(jnp.zeros_like(W), h, o, ii_bad, oi)
    expected = outer_ref(np.zeros(W.shape), h_ref, o, ii_ok, oi)
    np.testing.assert_allclose(upd, expected, rtol=1e-12)
    # Gradients are finite and consistent (zero for the masked parts).
    loss = lambda h, ii, oi: jnp.sum(sparse_block_gemv(o, W, h, ii, oi))
    dh = jax.jit(jax.grad(loss))(h, ii_bad, oi_bad)
    assert np.all(np.isfinite(dh))
    np.testing.assert_array_equal(dh[0, 1], np.zeros(4))


@pytest.mark.parametrize("which", ["input_idx", "output_idx"])
def test_checkify_reports_out_of_range(which):
    o, W, h, ii, oi = make_problem(SHAPES["general"])
    if which == "input_idx":
        ii = ii.at[1, 1].set(12)
    else:
        oi = oi.at[0, 0].set(-9)
    checked = checkify.checkify(jax.jit(sparse_block_gemv), errors=checkify.index_checks)
    err, out = checked(o, W, h, ii, oi)
    with pytest.raises(checkify.JaxRuntimeError, match="out-of-bounds indexing"):
        err.throw()
    assert np.all(np.isfinite(out))
    # In-range indices report nothing.
    o, W, h, ii, oi = make_problem(SHAPES["general"])
    err, _ = checked(o, W, h, ii, oi)
    assert err.get() is None


def test_checkify_reports_out_of_range_in_outer_and_dot():
    o, W, h, ii, oi = make_problem(SHAPES["general"])
    bad = oi.at[2, 1].set(40)
    err, _ = checkify.checkify(jax.jit(sparse_block_outer), errors=checkify.index_checks)(
        jnp.zeros_like(W), h, o, ii, bad
    )
    assert err.get() is not None and "index 40" in err.get()
    b = jnp.zeros((6, 3), jnp.float32)
    err, _ = checkify.checkify(jax.jit(sparse_block_dot), errors=checkify.index_checks)(
        W, h, ii, b, bad
    )
    assert err.get() is not None and "index 40" in err.get()
