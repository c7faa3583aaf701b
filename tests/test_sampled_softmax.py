"""The sampled softmax against TensorFlow's (a recorded fixture), its samplers and sparse rules."""

import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blocksparse_jax import (
    FullSoftmaxParams,
    SampledValues,
    full_softmax_loss,
    in_batch_softmax_loss,
    sample_candidates,
    sampled_softmax_loss,
)
from blocksparse_jax.sampled import _loss, _samplers
from tests.test_full_softmax import densify

# Written by tools/make_sampled_softmax_fixture.py (TensorFlow 2.21).
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sampled_softmax_tf.npz"


@pytest.fixture(scope="module")
def tf_case():
    return dict(np.load(FIXTURE))


def _fixture_inputs(f):
    params = FullSoftmaxParams(jnp.asarray(f["W"]), jnp.asarray(f["b"]))
    sampled = SampledValues(
        jnp.asarray(f["ids"]), jnp.asarray(f["true_count"]), jnp.asarray(f["sampled_count"])
    )
    return jnp.asarray(f["x"]), params, jnp.asarray(f["target"]), sampled


@pytest.mark.parametrize("hits", ["remove", "keep"])
def test_values_and_gradients_match_tensorflow(tf_case, hits, transform):
    x, params, target, sampled = _fixture_inputs(tf_case)

    def total(x, W, b):
        return sampled_softmax_loss(
            None,
            x,
            FullSoftmaxParams(W, b),
            target,
            sampled=sampled,
            remove_accidental_hits=hits == "remove",
            reduction="sum",
        )

    loss, (dx, dW, db) = transform(jax.value_and_grad(total, argnums=(0, 1, 2)))(
        x, params.W, params.b
    )
    np.testing.assert_allclose(loss, tf_case[f"loss_{hits}"].sum(), rtol=2e-6)
    np.testing.assert_allclose(dx, tf_case[f"dx_{hits}"], atol=2e-6)
    np.testing.assert_allclose(dW, tf_case[f"dW_{hits}"], atol=2e-6)
    np.testing.assert_allclose(db, tf_case[f"db_{hits}"], atol=2e-6)
    per = sampled_softmax_loss(
        None,
        x,
        params,
        target,
        sampled=sampled,
        remove_accidental_hits=hits == "remove",
        reduction="none",
    )
    np.testing.assert_allclose(per, tf_case[f"loss_{hits}"], rtol=2e-6)


def test_accidental_hits_change_the_loss(tf_case):
    """The fixture's sampled ids hold two targets: removing them must matter."""
    assert not np.allclose(tf_case["loss_remove"], tf_case["loss_keep"])


def test_log_uniform_expected_counts_are_tensorflows(tf_case):
    """TensorFlow's counts are ``-expm1(num_tries * log1p(-P))`` for one ``num_tries``."""
    R = int(tf_case["log_uniform_range"])
    ids = jnp.asarray(tf_case["log_uniform_ids"]).astype(jnp.int32)
    p = _samplers._log_uniform_prob(ids, R)
    np.testing.assert_allclose(
        p, np.log((np.asarray(ids) + 2.0) / (np.asarray(ids) + 1.0)) / np.log(R + 1.0), rtol=1e-6
    )
    counts = tf_case["log_uniform_sampled_count"]
    tries = np.log1p(-counts.astype(np.float64)) / np.log1p(-np.asarray(p, np.float64))
    T = int(round(float(np.median(tries))))
    assert T > len(ids)  # some draws were repeats
    n = len(ids)
    np.testing.assert_allclose(_samplers.expected_count(p, jnp.int32(T), n), counts, rtol=1e-5)
    true = jnp.asarray(tf_case["log_uniform_true"]).astype(jnp.int32)
    np.testing.assert_allclose(
        _samplers.expected_count(_samplers._log_uniform_prob(true, R), jnp.int32(T), n),
        tf_case["log_uniform_true_count"],
        rtol=1e-5,
    )
    # With no repeated draw TensorFlow's shortcut: n_sampled * P.
    np.testing.assert_allclose(_samplers.expected_count(p, jnp.int32(n), n), n * p, rtol=1e-6)


SAMPLERS = {
    "log_uniform": lambda V: np.log1p(1.0 / (np.arange(V) + 1.0)) / np.log(V + 1.0),
    "uniform": lambda V: np.full(V, 1.0 / V),
    "unigram": lambda V: (np.arange(V) % 7) / (np.arange(V) % 7).sum(),
}


def _sampler_arg(name, V):
    return jnp.asarray(np.arange(V) % 7, jnp.int32) if name == "unigram" else name


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_draw_from_their_distribution(name):
    """Distinct ids; the first is distributed as P; num_tries is the number of draws made."""
    V, S, runs = 30, 8, 4000
    P = SAMPLERS[name](V)
    _, draw = _samplers._probabilities(
        name if name != "unigram" else jnp.asarray(np.arange(V) % 7), V
    )
    ids, tries = jax.jit(jax.vmap(lambda k: _samplers._distinct_draws(k, draw, S, V)))(
        jax.random.split(jax.random.key(0), runs)
    )
    ids, tries = np.asarray(ids), np.asarray(tries)
    assert all(len(set(row)) == S for row in ids) and ids.min() >= 0 and ids.max() < V
    freq = np.bincount(ids[:, 0], minlength=V) / runs
    assert np.all(np.abs(freq - P) <= 5 * np.sqrt(P * (1 - P) / runs) + 1e-3)
    # Given the ids in draw order, the draws until the j-th new id are geometric with success
    # 1 - (mass of the first j ids): E[num_tries] is the mean of sum_j 1 / (1 - mass_j).
    mass_before = np.concatenate([np.zeros((runs, 1)), np.cumsum(P[ids], axis=1)[:, :-1]], 1)
    expected = (1.0 / (1.0 - mass_before)).sum(1)
    spread = np.sqrt((mass_before / (1 - mass_before) ** 2).sum(1).mean() / runs)
    assert abs(tries.mean() - expected.mean()) < 5 * spread


def test_sample_candidates_reports_tensorflows_counts():
    V, S = 5000, 64
    target = jnp.array([0, 3, 4999])
    s = sample_candidates(jax.random.key(3), target, n_outputs=V, n_sampled=S)
    assert s.ids.dtype == jnp.int32 and len(set(np.asarray(s.ids).tolist())) == S
    p = jnp.asarray(SAMPLERS["log_uniform"](V), jnp.float32)
    # One num_tries explains every count, of the sampled classes and of the targets.
    tries = np.log1p(-np.asarray(s.sampled_expected_count, np.float64)) / np.log1p(
        -np.asarray(p[s.ids], np.float64)
    )
    T = int(round(float(np.median(tries))))
    np.testing.assert_allclose(
        s.sampled_expected_count, _samplers.expected_count(p[s.ids], jnp.int32(T), S), rtol=1e-5
    )
    np.testing.assert_allclose(
        s.true_expected_count, _samplers.expected_count(p[target], jnp.int32(T), S), rtol=1e-5
    )


def test_every_class_sampled_uniformly_is_the_exact_softmax():
    """Uniform counts cancel, and removing the target's own hit leaves the full softmax."""
    V = 12
    rng = np.random.default_rng(0)
    params = FullSoftmaxParams(
        jnp.asarray(rng.standard_normal((4, V))), jnp.asarray(rng.standard_normal(V))
    )
    x, t = jnp.asarray(rng.standard_normal((5, 4))), jnp.asarray(rng.integers(0, V, 5), jnp.int32)
    f = lambda p: sampled_softmax_loss(jax.random.key(1), x, p, t, n_sampled=V, sampler="uniform")
    got = jax.value_and_grad(f)(params)
    want = jax.value_and_grad(lambda p: full_softmax_loss(x, p, t))(params)
    chex.assert_trees_all_close(got, want, atol=1e-12)


@pytest.mark.parametrize("rows", [False, True], ids=["columns", "rows"])
def test_sparse_rules_hold_only_the_columns_read(rows):
    """Densified, the rules' pairs are jax.grad's gradients of W and b; their blocks are the
    kept examples' targets and the in-range sampled ids (W's columns, or its rows)."""
    V, n_in = 40, 5
    rng = np.random.default_rng(1)
    params = FullSoftmaxParams(
        jnp.asarray(rng.standard_normal((n_in, V))), jnp.asarray(rng.standard_normal(V))
    )
    if rows:
        params = params.to_rows()
    x = jnp.asarray(rng.standard_normal((6, n_in)))
    t = jnp.asarray([3, 3, 7, 11, 20, -1], jnp.int32)  # a repeated target, a padding token
    mask = jnp.asarray([True, True, True, True, True, False])
    ids = jnp.asarray([7, 30, 31, 45, 2], jnp.int32)  # 7 is an accidental hit, 45 out of range
    sampled = SampledValues(ids, jnp.full((6,), 0.5), jnp.linspace(0.1, 1.0, 5))
    loss = lambda p: sampled_softmax_loss(None, x, p, t, sampled=sampled, mask=mask)
    grads = jax.grad(loss)(params)
    sel = _loss._select_jit(x, t, mask, ids, n_outputs=V)
    logits, vjp = jax.vjp(
        lambda W, b: _loss._logits_jit(sel.x, W, b, sel.target, sel.ids, rows=rows),
        params.W,
        params.b,
    )
    ct = jax.grad(
        lambda lg: _loss._loss_jit(
            lg,
            sel,
            sampled.true_expected_count,
            sampled.sampled_expected_count,
            mask,
            remove_accidental_hits=True,
            reduction="mean",
        )
    )(logits)
    w_rule, b_rule = _loss.SampledColumnsRule(rows), _loss.SampledBiasRule()
    w_pairs = w_rule.pairs(ct, sel.x, sel.true_blocks, sel.sampled_blocks)
    b_pairs = b_rule.pairs(ct, sel.true_blocks, sel.sampled_blocks)
    np.testing.assert_allclose(
        densify(w_pairs, w_rule.layout(params.W.shape), jnp.float64), grads.W, atol=1e-14
    )
    np.testing.assert_allclose(
        densify(b_pairs, b_rule.layout(params.b.shape), jnp.float64), grads.b, atol=1e-14
    )
    in_range = np.asarray(w_pairs.blocks)[np.asarray(w_pairs.blocks) < V]
    assert set(in_range.tolist()) == {3, 7, 11, 20, 30, 31, 2}
    moved = np.any(np.asarray(grads.W) != 0, axis=1 if rows else 0)
    assert set(np.flatnonzero(moved).tolist()) <= set(in_range.tolist())


@pytest.mark.slow
def test_value_and_sparse_grad_holds_the_columns_read_and_lazy_updates_them():
    optax = pytest.importorskip("optax")
    from blocksparse_jax import SparseBlockGrad, value_and_sparse_grad
    from blocksparse_jax.optim import apply_updates, lazy

    V = 60
    rng = np.random.default_rng(3)
    f32 = lambda a: jnp.asarray(
        a, jnp.float32
    )  # optim's block helpers refuse float64 in strict mode
    params = FullSoftmaxParams(f32(rng.standard_normal((5, V))), f32(rng.standard_normal(V)))
    x, t = f32(rng.standard_normal((4, 5))), jnp.asarray([1, 2, 3, 40], jnp.int32)
    sampled = sample_candidates(jax.random.key(7), t, n_outputs=V, n_sampled=6)
    loss_fn = lambda p: sampled_softmax_loss(None, x, p, t, sampled=sampled)
    _, grads = value_and_sparse_grad(loss_fn)(params)
    dense = jax.grad(loss_fn)(params)
    assert isinstance(grads.W, SparseBlockGrad) and isinstance(grads.b, SparseBlockGrad)
    np.testing.assert_allclose(grads.W.todense(), dense.W, atol=1e-6)
    np.testing.assert_allclose(grads.b.todense(), dense.b, atol=1e-6)
    read = set(np.asarray(t).tolist()) | set(np.asarray(sampled.ids).tolist())
    assert set(np.asarray(grads.W.indices)[np.asarray(grads.W.indices) < V].tolist()) == read
    tx = lazy(optax.adam(1e-2))

    @jax.jit
    def step(p, state):
        _, g = value_and_sparse_grad(loss_fn)(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = tx.update(g, state, p)
        return apply_updates(p, updates)

    new = step(params, tx.init(params))
    assert set(np.flatnonzero(np.any(np.asarray(new.W != params.W), axis=0)).tolist()) == read
    assert set(np.flatnonzero(np.asarray(new.b != params.b)).tolist()) == read


def test_markers_wrap_both_weights():
    V = 20
    params = FullSoftmaxParams(jnp.ones((3, V)), jnp.zeros(V))
    x, t = jnp.ones((2, 3)), jnp.array([1, 2])
    eqns = jax.make_jaxpr(lambda p: sampled_softmax_loss(jax.random.key(0), x, p, t, n_sampled=4))(
        params
    ).eqns
    names = [e.primitive.name for e in eqns]
    assert names.count("sparse_weight") == 2 and names.count("sparse_use") == 2


def test_leading_dims_mask_and_no_bias():
    V = 30
    rng = np.random.default_rng(2)
    params = FullSoftmaxParams(jnp.asarray(rng.standard_normal((4, V))), None)
    x = jnp.asarray(rng.standard_normal((2, 3, 4))).at[0, 1].set(jnp.nan)
    t = jnp.asarray(rng.integers(0, V, (2, 3)), jnp.int32).at[0, 1].set(-1)
    mask = jnp.ones((2, 3), bool).at[0, 1].set(False)
    s = sample_candidates(jax.random.key(0), t, n_outputs=V, n_sampled=6)
    per = sampled_softmax_loss(None, x, params, t, sampled=s, mask=mask, reduction="none")
    assert per.shape == (2, 3) and per[0, 1] == 0 and np.all(np.isfinite(per))
    flat = sampled_softmax_loss(
        None,
        x.reshape(6, 4)[np.asarray(mask).reshape(-1)],
        params,
        t.reshape(-1)[np.asarray(mask).reshape(-1)],
        sampled=s._replace(
            true_expected_count=s.true_expected_count.reshape(-1)[np.asarray(mask).reshape(-1)]
        ),
        reduction="none",
    )
    np.testing.assert_allclose(per[mask], flat, rtol=1e-12)
    g = jax.grad(lambda x: sampled_softmax_loss(None, x, params, t, sampled=s, mask=mask))(x)
    assert np.all(np.isfinite(g)) and np.all(g[0, 1] == 0)


def in_batch_ref(q, c, log_q, ids, mask, temperature):
    logits = q @ c.T / temperature - (0 if log_q is None else log_q[None, :])
    B = q.shape[0]
    ok = np.ones((B, B), bool) if mask is None else np.broadcast_to(mask[None, :], (B, B)).copy()
    if ids is not None:
        ok &= ids[None, :] != ids[:, None]
    ok |= np.eye(B, dtype=bool)
    logits = jnp.where(ok, logits, -jnp.inf)
    per = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
    keep = np.ones(B, bool) if mask is None else mask
    return jnp.sum(jnp.where(keep, per, 0.0)) / float(keep.sum())


def test_in_batch_loss_with_log_q_hits_and_mask():
    rng = np.random.default_rng(4)
    q, c = jnp.asarray(rng.standard_normal((6, 3))), jnp.asarray(rng.standard_normal((6, 3)))
    log_q = jnp.asarray(np.log(rng.uniform(0.01, 0.5, 6)))
    ids = np.array([4, 5, 4, 6, 7, 5])
    mask = np.array([True, True, True, True, False, True])
    f = lambda q, c: in_batch_softmax_loss(
        q, c, log_q=log_q, candidate_ids=jnp.asarray(ids), mask=jnp.asarray(mask), temperature=0.5
    )
    got = jax.value_and_grad(f, argnums=(0, 1))(q, c)
    want = jax.value_and_grad(
        lambda q, c: in_batch_ref(q, c, log_q, ids, mask, 0.5), argnums=(0, 1)
    )(q, c)
    chex.assert_trees_all_close(got, want, atol=1e-12)
    plain = in_batch_softmax_loss(q, c, reduction="none")
    np.testing.assert_allclose(plain.mean(), in_batch_ref(q, c, None, None, None, 1.0), rtol=1e-12)


BAD = [
    (
        lambda p, x, t: sampled_softmax_loss(jax.random.key(0), x, p, t),
        ValueError,
        "n_sampled is required",
    ),
    (lambda p, x, t: sampled_softmax_loss(None, x, p, t, n_sampled=4), TypeError, "key must be"),
    (
        lambda p, x, t: sampled_softmax_loss(jax.random.key(0), x, p, t, n_sampled=0),
        ValueError,
        "n_sampled must be in",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            jax.random.key(0), x, p, t, n_sampled=4, sampler="zipf"
        ),
        ValueError,
        "sampler must be",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            jax.random.key(0), x, p, t, n_sampled=4, sampler=jnp.ones(3)
        ),
        ValueError,
        "unigram counts",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            jax.random.key(0), x, p, t, n_sampled=25, sampler=jnp.arange(30) % 2
        ),
        ValueError,
        "non-zero",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(None, x, p, t, sampled=(jnp.arange(3),)),
        TypeError,
        "SampledValues",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            None, x, p, t, sampled=(jnp.arange(3), jnp.ones(2), jnp.ones(3))
        ),
        ValueError,
        "true_expected_count",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            None, x, p, t, sampled=(jnp.arange(3), jnp.ones(4), jnp.ones(2))
        ),
        ValueError,
        "sampled_expected_count",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            None, x, p, t, n_sampled=5, sampled=(jnp.arange(3), jnp.ones(4), jnp.ones(3))
        ),
        ValueError,
        "does not match",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(
            jax.random.key(0), x, p, t, n_sampled=4, remove_accidental_hits=1
        ),
        TypeError,
        "remove_accidental_hits",
    ),
    (
        lambda p, x, t: sampled_softmax_loss(jax.random.key(0), x, p, t.at[0].set(30), n_sampled=4),
        IndexError,
        "target holds 30",
    ),
    (lambda p, x, t: in_batch_softmax_loss(x, x[:, :2]), ValueError, "candidates must have"),
    (lambda p, x, t: in_batch_softmax_loss(x, x, log_q=jnp.ones(2)), ValueError, "log_q"),
    (
        lambda p, x, t: in_batch_softmax_loss(x, x, candidate_ids=jnp.ones(4)),
        TypeError,
        "candidate_ids",
    ),
    (lambda p, x, t: in_batch_softmax_loss(x, x, temperature=0.0), ValueError, "temperature"),
]


@pytest.mark.parametrize("call,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_names_the_argument(call, error, match):
    params = FullSoftmaxParams(jnp.ones((3, 30)), jnp.zeros(30))
    with pytest.raises(error, match=match):
        call(params, jnp.ones((4, 3)), jnp.array([1, 2, 3, 4]))


def test_sampled_and_exact_heads_share_parameters():
    """One FullSoftmaxParams trains with the sampled loss and evaluates with the exact one."""
    V = 200
    rng = np.random.default_rng(5)
    params = FullSoftmaxParams(jnp.asarray(0.1 * rng.standard_normal((8, V))), jnp.zeros(V))
    x, t = (
        jnp.asarray(rng.standard_normal((64, 8))),
        jnp.asarray(rng.integers(0, 20, 64), jnp.int32),
    )
    before = full_softmax_loss(x, params, t)
    step = jax.jit(jax.grad(lambda p, k: sampled_softmax_loss(k, x, p, t, n_sampled=32)))
    for i in range(30):
        params = jax.tree.map(lambda a, g: a - 0.5 * g, params, step(params, jax.random.key(i)))
    assert full_softmax_loss(x, params, t) < before - math.log(2)
