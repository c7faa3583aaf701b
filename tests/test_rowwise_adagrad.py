"""``optim.rowwise_adagrad``: FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` on sparse and dense gradients.

References: FBGEMM's CPU kernel, step by step (``tests/fixtures/rowwise_adagrad.npz``,
made by ``tools/make_rowwise_adagrad_fixture.py``), and a NumPy loop written
from the formulas.  Every step is the documented one: jitted, the table and the
optimizer state donated.
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blocksparse_jax import (
    SparseBlockGrad,
    embedding_lookup,
    sparse_block_dot,
    value_and_sparse_grad,
)
from blocksparse_jax.optim import _rowwise, apply_updates, lazy, row_layout, rowwise_adagrad

F32 = jnp.float32
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "rowwise_adagrad.npz")


def _step_fn(loss_fn, tx, *, check_slots=True):
    """The documented step, jitted with the parameters and the state donated."""

    def step(params, state, *data):
        loss, grads = value_and_sparse_grad(loss_fn)(params, *data)
        updates, state = tx.update(grads, state, params)
        if check_slots:  # additive updates over the very same rows as the gradient
            for g, u in zip(
                jax.tree.leaves(grads, is_leaf=_is_sparse),
                jax.tree.leaves(updates, is_leaf=_is_sparse),
                strict=True,
            ):
                assert isinstance(u, SparseBlockGrad) == isinstance(g, SparseBlockGrad)
                if isinstance(g, SparseBlockGrad):
                    assert u.indices is g.indices and u.layout == g.layout
        return apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _is_sparse(x):
    return isinstance(x, SparseBlockGrad)


# --------------------------------------------------------------------------------------
# Against FBGEMM
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["small_eps", "large_eps"])
def test_matches_fbgemm_step_by_step(config):
    f = np.load(FIXTURE)
    tx = rowwise_adagrad(float(f[f"lr_{config}"]), eps=float(f[f"eps_{config}"]))
    loss_fn = lambda t, ids, up: jnp.sum(embedding_lookup(t, ids) * up)
    step = _step_fn(loss_fn, tx)
    table = jnp.asarray(f["table0"], F32)
    state = tx.init(table)
    for s in range(f["ids"].shape[0]):
        ids = jnp.asarray(f["ids"][s])
        before = np.asarray(table)
        table, state, _ = step(table, state, ids, jnp.asarray(f["upstream"][s], F32))
        np.testing.assert_allclose(table, f[f"table_{config}"][s], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            state.sum_of_squares, f[f"acc_{config}"][s], rtol=1e-5, atol=1e-6
        )
        # the rows not read this step kept their values exactly
        untouched = np.setdiff1d(np.arange(table.shape[0]), f["ids"][s])
        np.testing.assert_array_equal(np.asarray(table)[untouched], before[untouched])
    assert int(state.count) == f["ids"].shape[0]


# --------------------------------------------------------------------------------------
# Against a NumPy loop
# --------------------------------------------------------------------------------------


def _numpy_rowwise(table, acc, ids, upstream, lr, eps):
    """One step written from the formulas: sum per row, then the row's update."""
    table, acc = table.astype(np.float64).copy(), acc.astype(np.float64).copy()
    grad = np.zeros_like(table)
    for i, row in enumerate(ids.reshape(-1)):
        if 0 <= row < table.shape[0]:  # anything else is padding
            grad[row] += upstream.reshape(-1, table.shape[1])[i]
    for row in np.unique(ids):
        if 0 <= row < table.shape[0]:
            acc[row] += np.mean(grad[row] ** 2)
            table[row] -= lr * grad[row] / (np.sqrt(acc[row]) + eps)
    return table, acc


@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_embedding_with_padding_and_duplicates_matches_numpy(eps, chunk_rows, monkeypatch):
    if chunk_rows:  # the rows from the pairs a few at a time: several chunks, some skipped
        monkeypatch.setattr(_rowwise, "_CHUNK_BYTES", chunk_rows * 6 * 4)
    rng = np.random.default_rng(1)
    n, d, lr = 50, 6, 0.2
    table0 = rng.standard_normal((n, d)).astype(np.float32)
    tx = rowwise_adagrad(lr, eps=eps, initial_accumulator_value=0.0)
    loss_fn = lambda t, ids, up: jnp.sum(embedding_lookup(t, ids) * up)
    step = _step_fn(loss_fn, tx)
    table, state = jnp.asarray(table0), tx.init(jnp.asarray(table0))
    want_t, want_a = table0, np.zeros(n)
    for s in range(4):
        ids = rng.integers(0, 8, (5, 4))  # (batch, bag): duplicates across and within bags
        ids[0, :2] = -1  # padding
        ids[3, 1] = n  # out of range under jit: padding too
        ids[4, 3] = 30 + s  # a row read once
        up = rng.standard_normal((5, 4, d)).astype(np.float32)
        table, state, _ = step(table, state, jnp.asarray(ids, jnp.int32), jnp.asarray(up))
        want_t, want_a = _numpy_rowwise(want_t, want_a, ids, up, lr, eps)
        np.testing.assert_allclose(table, want_t, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(state.sum_of_squares, want_a, rtol=2e-5, atol=1e-6)
        assert np.isfinite(np.asarray(table)).all()

    @jax.jit
    def update_values(table, state, ids, up):
        _, grads = value_and_sparse_grad(loss_fn)(table, ids, up)
        updates, _ = tx.update(grads, state)
        return updates.values, updates.valid

    values, valid = update_values(table, state, jnp.asarray(ids, jnp.int32), jnp.asarray(up))
    assert not valid.all()  # padding slots: 0 (eps 0 divides nothing by nothing)
    np.testing.assert_array_equal(np.asarray(values)[~np.asarray(valid)], 0.0)


@pytest.mark.parametrize("clip", [False, True])
def test_update_applied_in_place_from_the_pairs_or_from_the_values(clip):
    """The new table is made in ``update`` (``apply_updates`` returns it), from the pairs or,
    once another transformation has changed the gradient, from its values."""
    rng = np.random.default_rng(4)
    table = jnp.asarray(rng.standard_normal((30, 4)), F32)
    ids = jnp.asarray(rng.integers(0, 10, (12,)), jnp.int32)
    loss_fn = lambda t: jnp.sum(jnp.sin(embedding_lookup(t, ids)))
    tx = rowwise_adagrad(0.1)
    if clip:  # a global norm far above the gradient's: the same update, other values
        tx = optax.chain(optax.clip_by_global_norm(1e6), tx)
    seen = {}

    @jax.jit
    def step(table, state):
        _, grads = value_and_sparse_grad(loss_fn)(table)
        updates, state = tx.update(grads, state, table)
        new = apply_updates(table, updates)
        seen["shortcut"] = new is updates.slots.applied.param_out
        return new, state, updates.todense()

    state = tx.init(table)
    new, state, dense_update = step(table, state)
    assert seen["shortcut"]
    np.testing.assert_allclose(new, table + dense_update, rtol=1e-6, atol=1e-7)
    want, _ = _numpy_rowwise(
        np.asarray(table),
        np.zeros(30),
        np.asarray(ids),
        np.cos(np.asarray(table)[np.asarray(ids)]),
        0.1,
        1e-8,
    )
    np.testing.assert_allclose(new, want, rtol=2e-5, atol=1e-6)


def test_bfloat16_table_float32_accumulators():
    rng = np.random.default_rng(5)
    table0 = rng.standard_normal((16, 4)).astype(np.float32)
    tx = rowwise_adagrad(0.1)
    loss_fn = lambda t, ids, up: jnp.sum((embedding_lookup(t, ids) * up).astype(F32))
    step = _step_fn(loss_fn, tx)
    table = jnp.asarray(table0, jnp.bfloat16)
    state = tx.init(table)
    assert state.sum_of_squares.dtype == F32
    want_t, want_a = np.asarray(table, np.float64), np.zeros(16)
    for _ in range(3):
        ids = rng.integers(0, 6, (8,))
        up = rng.standard_normal((8, 4)).astype(np.float32)
        up_bf16 = jnp.asarray(up, jnp.bfloat16)
        # standard promotion, as users run: value_and_sparse_grad's float32 sums of a
        # bfloat16 gradient need it
        with jax.numpy_dtype_promotion("standard"):
            table, state, _ = step(table, state, jnp.asarray(ids, jnp.int32), up_bf16)
        assert table.dtype == jnp.bfloat16
        want_t, want_a = _numpy_rowwise(
            want_t, want_a, ids, np.asarray(up_bf16, np.float64), 0.1, 1e-8
        )
        want_t = np.asarray(jnp.asarray(want_t, jnp.bfloat16), np.float64)  # rounded once a step
        np.testing.assert_allclose(np.asarray(table, np.float64), want_t, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(state.sum_of_squares, want_a, rtol=1e-2, atol=1e-3)


def test_initial_accumulator_value_and_a_schedule():
    rng = np.random.default_rng(2)
    table0 = rng.standard_normal((20, 3)).astype(np.float32)
    schedule = optax.linear_schedule(0.5, 0.1, 3)
    tx = rowwise_adagrad(schedule, eps=1e-3, initial_accumulator_value=0.25)
    loss_fn = lambda t, ids, up: jnp.sum(embedding_lookup(t, ids) * up)
    step = _step_fn(loss_fn, tx)
    table, state = jnp.asarray(table0), tx.init(jnp.asarray(table0))
    np.testing.assert_array_equal(state.sum_of_squares, np.full(20, 0.25, np.float32))
    want_t, want_a = table0, np.full(20, 0.25)
    for s in range(3):
        ids = rng.integers(0, 20, (6,))
        up = rng.standard_normal((6, 3)).astype(np.float32)
        with jax.numpy_dtype_promotion("standard"):
            table, state, _ = step(table, state, jnp.asarray(ids, jnp.int32), jnp.asarray(up))
        want_t, want_a = _numpy_rowwise(want_t, want_a, ids, up, float(schedule(s)), 1e-3)
        np.testing.assert_allclose(table, want_t, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(state.sum_of_squares, want_a, rtol=2e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Dense leaves, block-sparse weights: the same rule per row
# --------------------------------------------------------------------------------------


def _numpy_dense_rule(p, acc, g, lr, eps):
    """The rule on every row of a dense leaf (rows: ``row_layout``)."""
    layout = row_layout(p.shape)
    rows = layout.view[: layout.n_axes]
    g = np.asarray(g, np.float64).reshape(*rows, -1)
    acc = np.asarray(acc, np.float64) + np.mean(g**2, axis=-1)
    new = np.asarray(p, np.float64).reshape(*rows, -1) - lr * g / (np.sqrt(acc)[..., None] + eps)
    return new.reshape(p.shape), acc


def test_block_sparse_weights_and_dense_leaves_match_the_row_rule():
    rng = np.random.default_rng(3)
    params = {
        "W": jnp.asarray(rng.standard_normal((3, 5, 2, 4)), F32),  # one accumulator per block
        "b": jnp.asarray(rng.standard_normal((5, 4)), F32),  # one per row
        "scale": jnp.asarray(rng.standard_normal((2,)), F32),  # dense vector: one
        "proj": jnp.asarray(rng.standard_normal((4, 3)), F32),  # dense matrix: one per row
    }
    h = jnp.asarray(rng.standard_normal((6, 2, 2)), F32)
    ii = jnp.asarray(rng.integers(0, 3, (6, 2)), jnp.int32)
    oi = jnp.asarray(rng.integers(0, 5, (6, 2)), jnp.int32)

    def loss_fn(p, h):
        y = sparse_block_dot(p["W"], h * p["scale"][None, None, :], ii, p["b"], oi)
        return jnp.sum(jnp.tanh(y @ p["proj"]))

    lr, eps = 0.1, 1e-6
    tx = rowwise_adagrad(lr, eps=eps)
    state = tx.init(params)
    assert jax.tree.map(jnp.shape, state.sum_of_squares) == {
        "W": (3, 5),
        "b": (5,),
        "scale": (),
        "proj": (4,),
    }
    step = _step_fn(loss_fn, tx)
    want_p = jax.tree.map(np.asarray, params)
    want_a = jax.tree.map(np.asarray, state.sum_of_squares)
    p = jax.tree.map(jnp.copy, params)
    for _ in range(3):
        grads = jax.grad(loss_fn)(
            jax.tree.map(lambda a: jnp.asarray(a, F32), want_p), h
        )  # dense reference
        for k in params:
            want_p[k], want_a[k] = _numpy_dense_rule(want_p[k], want_a[k], grads[k], lr, eps)
        p, state, _ = step(p, state, h)
        chex.assert_trees_all_close(p, want_p, rtol=2e-5, atol=2e-6)
        chex.assert_trees_all_close(state.sum_of_squares, want_a, rtol=2e-5, atol=2e-6)
    # blocks never read kept their values
    ii_np, oi_np = np.asarray(ii), np.asarray(oi)
    read = {(i, o) for b in range(6) for i in ii_np[b] for o in oi_np[b]}
    for i in range(3):
        for o in range(5):
            if (i, o) not in read:
                np.testing.assert_array_equal(p["W"][i, o], params["W"][i, o])
    assert len(read) < 15  # some blocks were not read


def test_row_layout():
    assert row_layout((7, 3)).n_blocks == 7 and row_layout((7, 3)).block_shape == (3,)
    assert row_layout((2, 5, 4, 4)).view[:2] == (2, 5)
    assert row_layout((2, 5, 4, 4)).block_shape == (4, 4)
    assert row_layout((9,)).n_blocks == 1 and row_layout(()).n_blocks == 1


# --------------------------------------------------------------------------------------
# In place, and misuse
# --------------------------------------------------------------------------------------


def test_step_is_in_place_with_small_temporaries():
    """Compile-only at 1,048,576 x 32: the table and accumulators donated, aliased, no table copy."""
    n, d, lookups = 1 << 20, 32, 4096
    table = jax.ShapeDtypeStruct((n, d), F32)
    tx = rowwise_adagrad(0.1)
    state = jax.eval_shape(tx.init, table)
    ids = jax.ShapeDtypeStruct((lookups,), jnp.int32)
    w = jax.ShapeDtypeStruct((d,), F32)
    loss_fn = lambda t, ids, w: jnp.mean(jnp.tanh(embedding_lookup(t, ids) @ w))
    compiled = _step_fn(loss_fn, tx).lower(table, state, ids, w).compile()
    mem = compiled.memory_analysis()
    table_bytes = n * d * 4
    assert mem.alias_size_in_bytes >= table_bytes + n * 4  # the table and the accumulators
    assert mem.temp_size_in_bytes < table_bytes / 64, mem.temp_size_in_bytes
    assert "f32[1048576,32]{1,0} copy(" not in compiled.as_text()


def test_refuses_to_run_inside_lazy():
    table = jnp.ones((10, 4), F32)
    tx = lazy(rowwise_adagrad(0.1))
    state = tx.init(table)
    loss_fn = lambda t: jnp.sum(embedding_lookup(t, jnp.array([1, 2])))
    _, grads = value_and_sparse_grad(loss_fn)(table)
    with pytest.raises(ValueError, match="not through optim.lazy"):
        with jax.numpy_dtype_promotion("standard"):
            tx.update(grads, state, table)


def test_refuses_a_state_of_other_parameters():
    tx = rowwise_adagrad(0.1)
    state = tx.init(jnp.ones((10, 4), F32))
    with pytest.raises(ValueError, match="accumulators of shape"):
        tx.update(jnp.ones((12, 4), F32), state)
