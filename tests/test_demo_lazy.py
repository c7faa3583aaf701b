"""The demo's training step with sparse gradients and ``lazy(optax.adam)``.

Compared against the same step with ``jax.value_and_grad`` and dense
``optax.adam`` (on the first step both start from zero moments, so they agree
everywhere), against the touched fractions counted from the step's batch with
NumPy, and against lazy semantics on the second step (blocks the step does not
touch keep their values and moments).
"""

from __future__ import annotations

import numpy as np
import pytest

optax = pytest.importorskip("optax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from blocksparse_jax import frequency_classes  # noqa: E402
from blocksparse_jax.demo import _model, _train  # noqa: E402
from blocksparse_jax.optim import lazy  # noqa: E402

V, CONTEXT, BATCH, LR = 200, 3, 16, 1e-2


def _setup(kind):
    rng = np.random.default_rng(0)
    counts = np.sort(rng.integers(1, 1000, V))[::-1]
    layout = frequency_classes(counts, 15)
    cfg = _model.ModelConfig(V, CONTEXT, 8, 8)
    output = _model.Output.hsoftmax(layout) if kind == "hsoftmax" else _model.Output("full")
    params = _model.init_params(jax.random.key(1), cfg, kind, layout)
    tokens = jnp.asarray(rng.integers(0, V, 5000), jnp.int32)
    return layout, output, params, tokens


def _step(tx, output, sparse):
    return _train.make_train_step(
        tx, output, context=CONTEXT, batch_size=BATCH, key=jax.random.key(2), sparse=sparse
    )


def _batch(tokens, step):
    """The contexts and targets of ``step``, drawn as the step draws them."""
    positions = jax.random.randint(
        jax.random.fold_in(jax.random.key(2), step),
        (BATCH,),
        CONTEXT,
        tokens.shape[0],
        dtype=jnp.int32,
    )
    c, t = _model.gather_windows(tokens, positions, CONTEXT)
    return np.asarray(c), np.asarray(t)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@pytest.mark.parametrize("kind", ["hsoftmax", "full"])
def test_lazy_step_matches_dense_adam_then_keeps_untouched_blocks(kind):
    layout, output, params, tokens = _setup(kind)
    lazy_tx, dense_tx = lazy(optax.adam(LR)), optax.adam(LR)
    lazy_step, dense_step = _step(lazy_tx, output, True), _step(dense_tx, output, False)
    p_l, s_l = _copy(params), lazy_tx.init(params)
    p_d, s_d = _copy(params), dense_tx.init(params)

    # Step 0: zero moments, so lazy Adam equals dense Adam everywhere.
    p_l, s_l, loss_l, touched = lazy_step(p_l, s_l, tokens, jnp.int32(0))
    p_d, s_d, loss_d, touched_d = dense_step(p_d, s_d, tokens, jnp.int32(0))
    assert touched_d == {}
    np.testing.assert_allclose(float(loss_l), float(loss_d), rtol=1e-6)
    for a, b in zip(jax.tree.leaves((p_l, s_l)), jax.tree.leaves((p_d, s_d)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)

    # The touched fractions, counted from the batch.
    contexts, targets = _batch(tokens, 0)
    want = {".embed": len(np.unique(contexts)) / V}
    if kind == "hsoftmax":
        classes = np.asarray(layout.word_to_output)[targets] // layout.n_outputs_per_class
        want[".out.W2"] = want[".out.b2"] = len(np.unique(classes)) / layout.n_classes
    assert set(touched) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(touched[k]), v, rtol=1e-6, err_msg=k)

    # Step 1: rows of the table the step does not read keep their values and moments.
    before_p, before_mu = np.asarray(p_l.embed), np.asarray(s_l[0].mu.embed)
    p_l, s_l, _, _ = lazy_step(p_l, s_l, tokens, jnp.int32(1))
    p_d, s_d, _, _ = dense_step(p_d, s_d, tokens, jnp.int32(1))
    contexts1, _ = _batch(tokens, 1)
    untouched = np.setdiff1d(np.arange(V), contexts1)
    moved = np.setdiff1d(np.unique(contexts), contexts1)  # touched at step 0 only
    assert len(moved) > 0
    np.testing.assert_array_equal(np.asarray(p_l.embed)[untouched], before_p[untouched])
    np.testing.assert_array_equal(np.asarray(s_l[0].mu.embed)[untouched], before_mu[untouched])
    # Dense Adam keeps moving the rows touched at step 0 with their momentum.
    assert np.all(np.any(np.asarray(p_d.embed)[moved] != before_p[moved], axis=1))
