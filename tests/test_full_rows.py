"""``FullSoftmaxRowParams``: the exact and sampled softmax with ``W`` one row per output.

Every function must give, on ``W (n_outputs, n_in)``, the values it gives on
``W.T`` in the column layout, and gradients that are the column layout's
transposed; the naive float64 softmax over ``x @ W.T + b`` checks the row
layout on its own.  Sparse training must move the same rows as the column
layout moves columns.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blocksparse_jax as bsj
from blocksparse_jax import parallel
from blocksparse_jax.optim import apply_updates, lazy
from tests.test_parallel import _all_gathers

B, N_IN, V = 6, 8, 100
TOL = dict(rtol=1e-10, atol=1e-12)


def _problem(bias=True):
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.standard_normal((V, N_IN)) / np.sqrt(N_IN))
    b = jnp.asarray(0.3 * rng.standard_normal(V)) if bias else None
    x = jnp.asarray(rng.standard_normal((B, N_IN)))
    t = jnp.asarray([1, 42, 99, 7, 0, 50], jnp.int32)
    return bsj.FullSoftmaxRowParams(W, b), x, t


def _columns(grads):
    """A gradient of row parameters as the column layout's."""
    return bsj.FullSoftmaxParams(grads.W.T, grads.b)


def test_init_draws_the_same_weights_in_either_layout():
    key = jax.random.key(3)
    cols = bsj.full_softmax_init(key, N_IN, V)
    rows = bsj.full_softmax_init(key, N_IN, V, layout="rows")
    assert type(rows) is bsj.FullSoftmaxRowParams and rows.rows and not cols.rows
    assert rows.W.shape == (V, N_IN) and (rows.n_in, rows.n_outputs) == (N_IN, V)
    np.testing.assert_array_equal(rows.W, cols.W.T)
    np.testing.assert_array_equal(cols.to_rows().W, rows.W)
    np.testing.assert_array_equal(rows.to_columns().W, cols.W)
    assert rows.to_rows() is rows and cols.to_columns() is cols
    assert bsj.full_softmax_init(key, N_IN, V, layout="rows", bias=False).b is None
    with pytest.raises(ValueError, match='layout must be "columns" or "rows"; got \'cols\''):
        bsj.full_softmax_init(key, N_IN, V, layout="cols")


def test_row_parameters_stay_row_parameters_through_transformations():
    params, x, t = _problem()
    g = jax.jit(jax.grad(bsj.full_softmax_loss, argnums=1))(x, params, t)
    assert type(g) is bsj.FullSoftmaxRowParams and g.W.shape == (V, N_IN)
    state = optax.adam(1e-3).init(params)
    assert type(state[0].mu) is bsj.FullSoftmaxRowParams
    assert type(jax.tree.map(jnp.zeros_like, params)) is bsj.FullSoftmaxRowParams


def _naive_loss(x, W, b, t, softcap=None, label_smoothing=0.0, z_loss=0.0):
    z = x @ W.T + (0 if b is None else b[None, :])
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    lse = jax.nn.logsumexp(z, axis=1)
    picked = jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]
    loss = lse - (1 - label_smoothing) * picked - label_smoothing * jnp.mean(z, axis=1)
    return jnp.mean(loss + z_loss * lse * lse)


OPTIONS = {
    "plain": {},
    "softcap": dict(softcap=3.0),
    "smoothing_zloss": dict(label_smoothing=0.1, z_loss=1e-3),
    "ragged_chunks": dict(chunk_size=30),
    "filtered": dict(filter_eps=1e-9, chunk_size=16),
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_and_gradients_equal_the_column_layout_and_the_naive_softmax(name, bias):
    kw = OPTIONS[name]
    params, x, t = _problem(bias)
    cols = params.to_columns()
    f = jax.jit(jax.value_and_grad(bsj.full_softmax_loss, argnums=(0, 1)), static_argnames=list(kw))
    value, (dx, dp) = f(x, params, t, **kw)
    value_c, (dx_c, dp_c) = f(x, cols, t, **kw)
    chex.assert_trees_all_close((value, dx, _columns(dp)), (value_c, dx_c, dp_c), **TOL)
    naive_kw = {k: v for k, v in kw.items() if k in ("softcap", "label_smoothing", "z_loss")}
    want = jax.value_and_grad(_naive_loss, argnums=(0, 1, 2))(x, params.W, params.b, t, **naive_kw)
    # The gradient filter drops at most filter_eps of each example's probability.
    tol = dict(rtol=1e-7, atol=1e-8) if "filter_eps" in kw else TOL
    chex.assert_trees_all_close(value, want[0], **TOL)
    chex.assert_trees_all_close((dx, dp.W), want[1][:2], **tol)
    if bias:
        chex.assert_trees_all_close(dp.b, want[1][2], **tol)


def test_per_example_losses_mask_and_leading_dims():
    params, x, t = _problem()
    mask = jnp.asarray([True, False, True, True, False, True])
    for p in (params, params.to_columns()):
        got = bsj.full_softmax_loss(x.reshape(2, 3, N_IN), p, t.reshape(2, 3), reduction="none")
        want = jax.vmap(lambda xi, ti: _naive_loss(xi[None], params.W, params.b, ti[None]))(x, t)
        chex.assert_trees_all_close(got, want.reshape(2, 3), **TOL)
        masked = bsj.full_softmax_loss(x, p, t, mask=mask, reduction="sum")
        chex.assert_trees_all_close(masked, jnp.sum(jnp.where(mask, want, 0)), **TOL)


def test_log_probabilities_top_k_and_samples_equal_the_column_layout():
    params, x, t = _problem()
    cols = params.to_columns()
    naive = jax.nn.log_softmax(x @ params.W.T + params.b[None, :], axis=1)
    chex.assert_trees_all_close(bsj.full_log_softmax(x, params), naive, **TOL)
    chex.assert_trees_all_close(
        bsj.full_log_softmax(x, params, t, chunk_size=16),
        jnp.take_along_axis(naive, t[:, None], axis=1)[:, 0],
        **TOL,
    )
    vals, ids = bsj.full_softmax_top_k(x, params, 5, chunk_size=16)
    vals_c, ids_c = bsj.full_softmax_top_k(x, cols, 5, chunk_size=16)
    np.testing.assert_array_equal(ids, ids_c)
    np.testing.assert_array_equal(ids, jnp.argsort(-naive, axis=1)[:, :5])
    chex.assert_trees_all_close(vals, vals_c, **TOL)
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        bsj.full_softmax_sample(key, x, params, chunk_size=16),
        bsj.full_softmax_sample(key, x, cols, chunk_size=16),
    )


def test_sampled_loss_and_gradients_equal_the_column_layout():
    params, x, t = _problem()
    sampled = bsj.sample_candidates(jax.random.key(1), t, n_outputs=V, n_sampled=12)

    def f(p, x):
        return bsj.sampled_softmax_loss(None, x, p, t, sampled=sampled, reduction="sum")

    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)
    want = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params.to_columns(), x)
    chex.assert_trees_all_close(
        (got[0], _columns(got[1][0]), got[1][1]), (want[0], *want[1]), **TOL
    )
    # Only the targets' and the sampled classes' rows have a gradient.
    read = np.union1d(np.asarray(t), np.asarray(sampled.ids))
    moved = np.flatnonzero(np.any(np.asarray(got[1][0].W) != 0, axis=1))
    assert set(moved) <= set(read) and len(moved) > 0


LOSSES = {
    "sampled": lambda key, x, p, t: bsj.sampled_softmax_loss(key, x, p, t, n_sampled=12),
    # Peaked logits, so that the filter skips chunks.
    "filtered": lambda key, x, p, t: bsj.full_softmax_loss(
        8.0 * x, p, t, filter_eps=1e-2, chunk_size=10
    ),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_lazy_adam_steps_move_the_same_weights_in_either_layout(name):
    params, x, t = _problem()
    tx = lazy(optax.adam(1e-2))
    loss = LOSSES[name]

    @jax.jit
    def step(p, s, key):
        value, g = bsj.value_and_sparse_grad(lambda p: loss(key, x, p, t))(p)
        with jax.numpy_dtype_promotion("standard"):
            u, s = tx.update(g, s, p)
        return apply_updates(p, u), s, value

    rows, cols = params, params.to_columns()
    s_rows, s_cols = tx.init(rows), tx.init(cols)
    for i in range(3):
        key = jax.random.key(i)
        rows, s_rows, v_rows = step(rows, s_rows, key)
        cols, s_cols, v_cols = step(cols, s_cols, key)
        chex.assert_trees_all_close(v_rows, v_cols, **TOL)
    assert type(rows) is bsj.FullSoftmaxRowParams
    chex.assert_trees_all_close(_columns(rows), cols, **TOL)
    moved = np.any(np.asarray(rows.W) != np.asarray(params.W), axis=1)
    assert 0 < moved.sum() < V  # lazy: the untouched rows keep their weights


def test_bad_row_parameters_name_the_row_layout():
    params, x, t = _problem()
    with pytest.raises(
        ValueError, match=r"b must have shape \(n_outputs,\) = \(100,\) .*W.shape\[0\]"
    ):
        bsj.full_softmax_loss(x, params._replace(b=params.b[:5]), t)
    with pytest.raises(ValueError, match=r"n_in=8 \(W.shape\[1\]\)"):
        bsj.full_softmax_loss(x[:, :5], params, t)
    with pytest.raises(ValueError, match=r"\(n_outputs, n_in\)"):
        bsj.full_softmax_loss(x, params._replace(W=params.W[0]), t)
    with pytest.raises(IndexError):
        bsj.full_softmax_loss(x, params, t.at[0].set(V))


def test_parallel_functions_shard_the_rows():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params, x, t = _problem()
    params = params._replace(W=params.W[:96], b=params.b[:96])
    t = t % 96
    sharded = parallel.shard_params(params, mesh)
    assert type(sharded) is bsj.FullSoftmaxRowParams
    assert sharded.W.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)

    def loss(p, x, mod, **kw):
        value = mod.full_softmax_loss(x, p, t, softcap=2.5, label_smoothing=0.1, **kw)
        return value + 0.1 * jnp.sum(mod.full_log_softmax(x, p, t, **kw))

    batch = jax.device_put(x, NamedSharding(mesh, P("data")))
    step = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x, parallel, mesh=mesh), argnums=(0, 1)))
    compiled = step.lower(sharded, batch).compile()
    got = compiled(sharded, batch)
    want = jax.value_and_grad(lambda p, x: loss(p, x, bsj), argnums=(0, 1))(params.to_columns(), x)
    chex.assert_trees_all_close(
        jax.device_get((got[0], _columns(got[1][0]), got[1][1])), (want[0], *want[1]), **TOL
    )
    assert got[1][0].W.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
    assert _all_gathers(compiled.as_text()) == []
    every = parallel.full_log_softmax(x, sharded, mesh=mesh)
    chex.assert_trees_all_close(every, bsj.full_log_softmax(x, params.to_columns()), **TOL)


def test_row_parameters_next_to_the_happy_path():
    """vmap, NumPy weights, bfloat16, grad of grad and an empty batch, in the row layout."""
    params, x, t = _problem()
    cols = params.to_columns()
    xs, ts = jnp.stack([x, 2 * x]), jnp.stack([t, t[::-1]])
    per_row = jax.vmap(lambda x, t: bsj.full_softmax_loss(x, params, t, chunk_size=16))(xs, ts)
    per_col = jax.vmap(lambda x, t: bsj.full_softmax_loss(x, cols, t, chunk_size=16))(xs, ts)
    chex.assert_trees_all_close(per_row, per_col, **TOL)
    numpy_params = bsj.FullSoftmaxRowParams(np.asarray(params.W), np.asarray(params.b))
    chex.assert_trees_all_close(
        bsj.full_softmax_loss(np.asarray(x), numpy_params, np.asarray(t)),
        bsj.full_softmax_loss(x, params, t),
        **TOL,
    )
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    g = jax.grad(lambda p: bsj.full_softmax_loss(x.astype(jnp.bfloat16), p, t))(half)
    assert type(g) is bsj.FullSoftmaxRowParams and g.W.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(g.W, np.float64),
        np.asarray(jax.grad(lambda p: bsj.full_softmax_loss(x, p, t))(params).W),
        atol=2e-2,
    )

    def hvp(p):
        inner = lambda x: jnp.sum(jax.grad(lambda x: bsj.full_softmax_loss(x, p, t))(x) ** 2)
        return jax.grad(inner)(x)

    chex.assert_trees_all_close(hvp(params), hvp(cols), **TOL)
    empty = bsj.full_softmax_loss(x[:0], params, t[:0], reduction="sum")
    assert float(empty) == 0.0
