"""Sparse gradients and ``optim.lazy`` with optax's combinators: the optax contract holds.

Reference: the same optax transformation on the dense gradients (``jax.grad``)
when every block is touched on every step; lazy semantics (untouched blocks
and their state unchanged) otherwise.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from blocksparse_jax import SparseBlockGrad, embedding_lookup, value_and_sparse_grad
from blocksparse_jax.optim import apply_updates, lazy

F32 = jnp.float32
# The tests of the combinators share their jitted steps (_step, _lazy): one worker runs them.
pytestmark = pytest.mark.xdist_group("test_optax_contract")


@pytest.fixture(autouse=True)
def optax_promotion():
    """optax's own arithmetic mixes Python floats and int32 counts: standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"emb": jax.random.normal(k1, (8, 3), F32), "w": jax.random.normal(k2, (3,), F32)}


def _loss(p, ids):
    return jnp.sum(jnp.tanh(embedding_lookup(p["emb"], ids) @ p["w"]) ** 2)


ALL_ROWS = [jnp.array([3, 0, 1, 2, 4, 5, 6, 7, 7, 1]), jnp.array([7, 6, 5, 4, 3, 2, 1, 0])]


def _run(tx, steps, *, sparse, order="lazy", extra=None):
    """``len(steps)`` jitted steps of ``tx``; ``order`` applies ``outside`` after ``lazy(...)``."""
    params = _params()
    state = tx.init(params)
    step = _step(tx, sparse, extra)
    for ids in steps:
        params, state = step(params, state, ids)
    return params, state


@functools.cache
def _step(tx, sparse, extra):
    """The jitted step of ``tx``: runs of the same ``tx`` (see :func:`_lazy`) share its compilations."""

    @jax.jit
    def step(params, state, ids):
        if sparse:
            loss, g = value_and_sparse_grad(_loss)(params, ids)
        else:
            loss, g = jax.value_and_grad(_loss)(params, ids)
        kwargs = {} if extra is None else {"value": loss}
        u, state = tx.update(g, state, params, **kwargs)
        return apply_updates(params, u), state

    return step


COMBINATORS = {
    "sgd": lambda: (lazy(optax.sgd(0.1)), optax.sgd(0.1)),
    "adam": lambda: (lazy(optax.adam(0.1)), optax.adam(0.1)),
    "chain(clip, lazy)": lambda: (
        optax.chain(optax.clip(0.05), lazy(optax.adam(0.1))),
        optax.chain(optax.clip(0.05), optax.adam(0.1)),
    ),
    "chain(lazy, scale)": lambda: (
        optax.chain(lazy(optax.adam(0.1)), optax.scale(0.5)),
        optax.chain(optax.adam(0.1), optax.scale(0.5)),
    ),
    "clip_by_global_norm inside": lambda: (
        lazy(optax.chain(optax.clip_by_global_norm(0.1), optax.adam(0.1))),
        optax.chain(optax.clip_by_global_norm(0.1), optax.adam(0.1)),
    ),
    "clip_by_global_norm outside": lambda: (
        optax.chain(optax.clip_by_global_norm(0.1), lazy(optax.sgd(0.1, momentum=0.9))),
        optax.chain(optax.clip_by_global_norm(0.1), optax.sgd(0.1, momentum=0.9)),
    ),
    "apply_if_finite inside": lambda: (
        lazy(optax.apply_if_finite(optax.adam(0.1), 2)),
        optax.apply_if_finite(optax.adam(0.1), 2),
    ),
    "apply_if_finite outside": lambda: (
        optax.apply_if_finite(lazy(optax.adam(0.1)), 2),
        optax.apply_if_finite(optax.adam(0.1), 2),
    ),
    "masked inside": lambda: (
        lazy(optax.masked(optax.adam(0.1), {"emb": True, "w": False})),
        optax.masked(optax.adam(0.1), {"emb": True, "w": False}),
    ),
    "masked outside": lambda: (
        optax.masked(lazy(optax.adam(0.1)), {"emb": True, "w": False}),
        optax.masked(optax.adam(0.1), {"emb": True, "w": False}),
    ),
    "multi_transform": lambda: (
        optax.multi_transform(
            {"sparse": lazy(optax.adam(0.1)), "dense": optax.sgd(0.2)},
            {"emb": "sparse", "w": "dense"},
        ),
        optax.multi_transform(
            {"sparse": optax.adam(0.1), "dense": optax.sgd(0.2)}, {"emb": "sparse", "w": "dense"}
        ),
    ),
    "lazy(multi_transform)": lambda: (
        lazy(
            optax.multi_transform(
                {"a": optax.adam(0.1), "b": optax.sgd(0.2)}, {"emb": "a", "w": "b"}
            )
        ),
        optax.multi_transform({"a": optax.adam(0.1), "b": optax.sgd(0.2)}, {"emb": "a", "w": "b"}),
    ),
    "inject_hyperparams": lambda: (
        lazy(optax.inject_hyperparams(optax.adam)(learning_rate=0.1)),
        optax.inject_hyperparams(optax.adam)(learning_rate=0.1),
    ),
    "zero_nans": lambda: (
        optax.chain(optax.zero_nans(), lazy(optax.adam(0.1))),
        optax.chain(optax.zero_nans(), optax.adam(0.1)),
    ),
    "lazy(zero_nans)": lambda: (
        lazy(optax.chain(optax.zero_nans(), optax.adam(0.1))),
        optax.chain(optax.zero_nans(), optax.adam(0.1)),
    ),
    "adamw, lion, adagrad": lambda: (
        lazy(optax.chain(optax.adamw(0.1), optax.lion(0.01), optax.adagrad(0.1))),
        optax.chain(optax.adamw(0.1), optax.lion(0.01), optax.adagrad(0.1)),
    ),
}


@functools.cache
def _lazy(name):
    """``COMBINATORS[name]``'s sparse transformation, built once for the two tests that run it."""
    return COMBINATORS[name]()[0]


@pytest.mark.parametrize("name", list(COMBINATORS))
def test_every_combinator_equals_the_dense_optimizer_when_every_block_is_touched(name):
    sparse_tx, dense_tx = _lazy(name), COMBINATORS[name]()[1]
    got = _run(sparse_tx, ALL_ROWS, sparse=True)
    want = _run(dense_tx, ALL_ROWS, sparse=False)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)


def test_reduce_on_plateau_gets_the_value():
    make = lambda: optax.chain(
        optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=0, factor=0.5, cooldown=0)
    )
    got = _run(lazy(make()), ALL_ROWS * 2, sparse=True, extra=True)
    want = _run(make(), ALL_ROWS * 2, sparse=False, extra=True)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-6)
    assert float(got[1][1].scale) < 1.0  # the plateau was seen


def test_updates_are_additive():
    params = _params()
    ids = jnp.array([1, 4, 1])
    _, g = value_and_sparse_grad(_loss)(params, ids)
    dense = jax.grad(_loss)(params, ids)
    tx = lazy(optax.sgd(1.0))
    u, _ = tx.update(g, tx.init(params), params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    chex.assert_trees_all_close(apply_updates(zeros, u), jax.tree.map(jnp.negative, dense))
    # optax's own apply_updates adds them too
    chex.assert_trees_all_close(
        optax.apply_updates(params, u), jax.tree.map(lambda p, d: p - d, params, dense), rtol=1e-6
    )


def test_index_arrays_are_never_leaves():
    params = _params()
    _, g = value_and_sparse_grad(_loss)(params, jnp.array([1, 4, 1]))
    assert isinstance(g["emb"], SparseBlockGrad)
    leaves = jax.tree.leaves(g)
    assert all(jnp.issubdtype(a.dtype, jnp.floating) for a in leaves)
    assert leaves[0] is g["emb"].values
    dense = jax.grad(_loss)(params, jnp.array([1, 4, 1]))
    np.testing.assert_allclose(optax.tree.norm(g), optax.tree.norm(dense), rtol=1e-6)
    clipped = optax.clip(0.01).update(g, optax.clip(0.01).init(params))[0]
    np.testing.assert_array_equal(clipped["emb"].indices, g["emb"].indices)  # the same rows
    np.testing.assert_allclose(
        clipped["emb"].todense(), jnp.clip(dense["emb"], -0.01, 0.01), rtol=1e-6
    )


@pytest.mark.slow
def test_lazy_semantics_with_combinators_leave_untouched_rows_alone():
    """Rows no step touches keep their parameters and their state, whatever wraps lazy.

    The steps have the shapes of ``ALL_ROWS``: this test and the one above share
    the jitted steps' compilations.
    """
    steps = [jnp.array([1, 2, 2, 1, 2, 1, 2, 2, 1, 1]), jnp.array([2, 5, 5, 2, 5, 2, 2, 5])]
    assert [s.shape for s in steps] == [r.shape for r in ALL_ROWS]
    for name in COMBINATORS:
        tx = _lazy(name)
        params, state = _run(tx, steps, sparse=True)
        before = _params()["emb"]
        for row in (0, 3, 4, 6, 7):
            np.testing.assert_array_equal(params["emb"][row], before[row], err_msg=name)
        init = tx.init(_params())
        for leaf, first in zip(jax.tree.leaves(state), jax.tree.leaves(init), strict=True):
            if np.shape(leaf) == before.shape:
                untouched = [0, 3, 4, 6, 7]
                np.testing.assert_array_equal(
                    np.asarray(leaf)[untouched], np.asarray(first)[untouched], err_msg=name
                )


def test_non_finite_step_is_skipped_lazily():
    nan_step = jnp.array([1, 2])

    def loss(p, ids):
        return _loss(p, ids) * jnp.where(ids[0] == 1, jnp.nan, 1.0)

    for tx in (
        optax.apply_if_finite(lazy(optax.adam(0.1)), 3),
        lazy(optax.apply_if_finite(optax.adam(0.1), 3)),
    ):
        params = _params()
        state = tx.init(params)
        _, g = value_and_sparse_grad(loss)(params, nan_step)
        assert not np.isfinite(np.asarray(g["emb"].values)).all()
        u, state = tx.update(g, state, params)
        new = apply_updates(params, u)
        chex.assert_trees_all_equal(new, params)


@pytest.mark.slow
def test_noisy_sgd_draws_independent_noise_per_row():
    table = jnp.zeros((64, 4), F32)
    ids = jnp.arange(0, 64, 2)  # 32 rows touched, all with the same gradient
    loss = lambda t: jnp.sum(embedding_lookup(t, ids))
    tx = lazy(optax.noisy_sgd(1.0, eta=1.0, key=0))
    _, g = value_and_sparse_grad(loss)(table)
    u, _ = tx.update(g, tx.init(table), table)
    new = np.asarray(apply_updates(table, u))
    touched = new[0::2]
    assert len({tuple(np.round(r, 6)) for r in touched}) == len(touched)  # no two rows alike
    np.testing.assert_array_equal(new[1::2], 0.0)  # untouched rows did not move
    assert 0.3 < np.std(touched + 1.0) < 3.0  # noise around the gradient step of -1


def test_multi_steps_is_refused_inside_lazy_and_errs_outside():
    with pytest.raises(ValueError, match="MultiSteps cannot run lazily"):
        lazy(optax.MultiSteps(optax.adam(0.1), 2).gradient_transformation())
    tx = optax.MultiSteps(lazy(optax.adam(0.1)), 2)
    params = _params()
    _, g = value_and_sparse_grad(_loss)(params, jnp.array([1, 2]))
    with pytest.raises(ValueError, match="SparseBlockGrad"):
        tx.update(g, tx.init(params), params)
