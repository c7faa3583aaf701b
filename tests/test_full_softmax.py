"""The logits-free exact softmax against the naive float64 softmax, and its memory."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from blocksparse_jax import (
    FullSoftmaxParams,
    full_log_softmax,
    full_softmax_init,
    full_softmax_loss,
    full_softmax_sample,
    full_softmax_top_k,
)
from blocksparse_jax.full import _core
from blocksparse_jax.full._sparse import FilteredChunksRule

N_IN, V = 6, 50


def make_params(n_in=N_IN, n_outputs=V, dtype=jnp.float64, *, seed=0, scale=0.8, bias=True):
    rng = np.random.default_rng(seed)
    W = jnp.asarray(scale * rng.standard_normal((n_in, n_outputs)), dtype)
    b = jnp.asarray(0.3 * rng.standard_normal((n_outputs,)), dtype) if bias else None
    return FullSoftmaxParams(W, b)


def make_x(shape=(7,), n_in=N_IN, dtype=jnp.float64, *, seed=1, scale=1.2):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape + (n_in,)), dtype)


def make_target(shape=(7,), n_outputs=V, *, seed=2):
    return jnp.asarray(np.random.default_rng(seed).integers(0, n_outputs, shape), jnp.int32)


def ref_logits(x, params, softcap=None):
    x64 = np.asarray(x, np.float64)
    z = x64 @ np.asarray(params.W, np.float64)
    if params.b is not None:
        z = z + np.asarray(params.b, np.float64)
    return z if softcap is None else softcap * np.tanh(z / softcap)


def ref_loss(x, params, target, *, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Per-example loss of the naive softmax, in float64 (JAX, so that it differentiates)."""
    z = x @ params.W
    if params.b is not None:
        z = z + params.b.reshape((1,) * (z.ndim - 1) + (-1,))
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, target[..., None], axis=-1)[..., 0]
    eps = label_smoothing
    return lse - (1 - eps) * picked - eps * jnp.mean(z, axis=-1) + z_loss * lse**2


OPTIONS = {
    "plain": {},
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=0.05),
    "softcap": dict(softcap=1.5),
    "all": dict(label_smoothing=0.2, z_loss=0.01, softcap=2.0),
}


@pytest.mark.parametrize("chunk_size", [None, 10, 16], ids=["one_chunk", "divides", "ragged"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_loss_and_gradients_match_the_naive_softmax(option, chunk_size):
    kw = OPTIONS[option]
    params, x, t = make_params(), make_x(), make_target()
    got = jax.value_and_grad(full_softmax_loss, argnums=(0, 1))(
        x, params, t, chunk_size=chunk_size, **kw
    )
    want = jax.value_and_grad(lambda x, p: jnp.mean(ref_loss(x, p, t, **kw)), argnums=(0, 1))(
        x, params
    )
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


def test_plain_jit_vmap(transform):
    params, x, t = make_params(), make_x(), make_target()
    f = lambda x, W, b, t: full_softmax_loss(x, FullSoftmaxParams(W, b), t, chunk_size=16)
    got = transform(jax.value_and_grad(f, argnums=(0, 1, 2)))(x, params.W, params.b, t)
    ref = lambda x, W, b: jnp.mean(ref_loss(x, FullSoftmaxParams(W, b), t))
    want = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, params.W, params.b)
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


def test_leading_batch_dims_and_no_bias():
    params = make_params(bias=False)
    x, t = make_x((2, 3)), make_target((2, 3))
    got = jax.value_and_grad(full_softmax_loss, argnums=(0, 1))(x, params, t, chunk_size=16)
    want = jax.value_and_grad(lambda x, p: jnp.mean(ref_loss(x, p, t)), argnums=(0, 1))(x, params)
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)
    assert got[1][1].b is None
    logp = full_log_softmax(x, params, t, chunk_size=16)
    chex.assert_shape(logp, (2, 3))
    chex.assert_trees_all_close(logp, -ref_loss(x, params, t), atol=1e-12)
    all_logp = full_log_softmax(x, params)
    chex.assert_shape(all_logp, (2, 3, V))
    np.testing.assert_allclose(
        all_logp, ref_logits(x, params) - jax.nn.logsumexp(ref_logits(x, params), -1)[..., None]
    )


def test_reduction_none_follows_any_per_example_weights():
    """The gradient is the weighted one, whatever the weights (not the mean's)."""
    params, x, t = make_params(), make_x(), make_target()
    w = jnp.asarray(np.random.default_rng(5).uniform(-1, 3, 7))
    for kw in (OPTIONS["all"], dict(filter_eps=1e-300)):
        ref_kw = {k: v for k, v in kw.items() if k != "filter_eps"}

        def weighted(x, p, kw=kw):
            return jnp.sum(w * full_softmax_loss(x, p, t, reduction="none", chunk_size=16, **kw))

        def ref(x, p, kw=ref_kw):
            return jnp.sum(w * ref_loss(x, p, t, **kw))

        got = jax.grad(weighted, argnums=(0, 1))(x, params)
        want = jax.grad(ref, argnums=(0, 1))(x, params)
        chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)
    assert full_softmax_loss(x, params, t, reduction="sum").shape == ()


def test_mask_takes_padding_out():
    params, x, t = make_params(), make_x(), make_target()
    mask = jnp.array([True, False, True, True, False, True, True])
    x = x.at[1].set(jnp.nan)
    t = t.at[4].set(-1)
    loss, grads = jax.value_and_grad(full_softmax_loss, argnums=(0, 1))(
        x, params, t, mask=mask, chunk_size=16
    )
    keep = np.asarray(mask)
    want_loss, want = jax.value_and_grad(
        lambda x, p: jnp.mean(ref_loss(x, p, t[keep])), argnums=(0, 1)
    )(x[keep], params)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads[1], want[1], atol=1e-12)
    np.testing.assert_array_equal(grads[0][~keep], 0.0)
    none = full_softmax_loss(x, params, t, mask=mask, reduction="none")
    np.testing.assert_array_equal(none[~keep], 0.0)


def test_out_of_range_target_under_jit_is_inf_and_takes_no_part():
    params, x, t = make_params(), make_x(), make_target()
    bad = t.at[2].set(V + 3)
    f = jax.jit(lambda x, p, t: full_softmax_loss(x, p, t, reduction="none"))
    loss = f(x, params, bad)
    assert np.isinf(loss[2]) and np.all(np.isfinite(np.delete(np.asarray(loss), 2)))
    g = jax.jit(jax.grad(lambda p, t: jnp.sum(jnp.where(jnp.isinf(f(x, p, t)), 0.0, f(x, p, t)))))(
        params, bad
    )
    keep = np.arange(7) != 2
    want = jax.grad(lambda p: jnp.sum(ref_loss(x[keep], p, t[keep])))(params)
    chex.assert_trees_all_close(g, want, atol=1e-12)
    err, _ = checkify.checkify(f, errors=checkify.index_checks)(x, params, bad)
    assert err.get() is not None and str(V + 3) in err.get()
    logp = jax.jit(full_log_softmax)(x, params, bad)
    assert np.isneginf(logp[2])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
    params, x, t = (
        make_params(dtype=dtype, n_outputs=300),
        make_x(dtype=dtype),
        make_target(n_outputs=300),
    )
    loss, grads = jax.value_and_grad(full_softmax_loss, argnums=1)(x, params, t, chunk_size=64)
    assert loss.dtype == jnp.float32
    assert grads.W.dtype == dtype and grads.b.dtype == dtype
    up = lambda a: jnp.asarray(a, jnp.float64)
    p64 = FullSoftmaxParams(up(params.W), up(params.b))
    want_loss, want = jax.value_and_grad(lambda p: jnp.mean(ref_loss(up(x), p, t)))(p64)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # The products run in the low dtype: the gradient is that dtype's precision.
    tol = 2e-2 if dtype == jnp.bfloat16 else 3e-3
    np.testing.assert_allclose(up(grads.W), want.W, atol=tol * float(jnp.max(jnp.abs(want.W))))


def test_second_order_reverse_mode():
    """Reverse over reverse (a Hessian-vector product): the backward pass is itself differentiable."""
    params, x, t = make_params(), make_x(), make_target()
    v = make_x(seed=9)
    f = lambda x: full_softmax_loss(x, params, t, chunk_size=16, softcap=3.0)
    ref = lambda x: jnp.mean(ref_loss(x, params, t, softcap=3.0))
    hvp = lambda f: jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), v))(x)
    np.testing.assert_allclose(hvp(f), hvp(ref), atol=1e-12)


# --------------------------------------------------------------------------------------
# The gradient filter
# --------------------------------------------------------------------------------------


def peaked_problem(n_outputs=96, batch=6):
    """Each example puts almost all its mass on its target, in the first chunk of 16.

    The inputs are orthogonal (norm 3), target ``t[b]``'s column is ``8 x[b] / 3``
    (logit 24, the others about N(0, 0.9)), and output 60 gets logit 19 from
    example 0 alone: probability about ``exp(-5)``, in a chunk the filter keeps.
    """
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((N_IN, batch)))
    x = 3.0 * q.T
    W = 0.3 * rng.standard_normal((N_IN, n_outputs))
    t = rng.permutation(16)[:batch]
    W[:, t] = 8.0 * x.T / 3.0
    W[:, 60] = 19.0 * x[0] / 9.0
    return FullSoftmaxParams(jnp.asarray(W), None), jnp.asarray(x), jnp.asarray(t, jnp.int32)


def filtered_reference(x, params, t, eps, chunk, cotangent):
    """The exact gradient of ``W`` without the softmax terms of the chunks the filter skips.

    The filter skips the chunks of least probability (the largest over the
    examples with a cotangent) while their running sum stays at most ``eps``.
    Returns ``(dW, kept chunks, each example's probability in the skipped chunks)``.
    """
    z = ref_logits(x, params)
    p = np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))
    n_chunks = -(-z.shape[1] // chunk)
    mass = np.stack([p[:, k * chunk : (k + 1) * chunk].sum(1) for k in range(n_chunks)], 1)
    worst = np.where((cotangent != 0)[:, None], mass, 0.0).max(0)
    order = np.argsort(worst, kind="stable")
    kept = np.ones(n_chunks, bool)
    kept[order] = ~(np.cumsum(worst[order]) <= eps)
    p_kept = p * np.repeat(kept, chunk)[None, : z.shape[1]]
    G = cotangent[:, None] * (p_kept - np.eye(z.shape[1])[np.asarray(t)])
    return np.asarray(x).T @ G, kept, mass[:, ~kept].sum(1)


def test_filter_keeps_the_loss_exact_and_drops_only_the_skipped_chunks():
    params, x, t = peaked_problem()
    eps = 1e-4
    f = lambda p: full_softmax_loss(x, p, t, filter_eps=eps, chunk_size=16)
    loss, grads = jax.value_and_grad(f)(params)
    np.testing.assert_allclose(loss, jnp.mean(ref_loss(x, params, t)), rtol=1e-12)
    want, kept, dropped = filtered_reference(x, params, t, eps, 16, np.full(6, 1 / 6))
    assert kept[0] and kept[60 // 16] and not kept.all()  # the filter skipped some chunks
    assert np.all(dropped <= eps)  # ... holding at most eps of any example's probability
    np.testing.assert_allclose(grads.W, want, atol=1e-14)
    exact = jax.grad(lambda p: jnp.mean(ref_loss(x, p, t)))(params).W
    assert not np.allclose(grads.W, exact, atol=1e-14, rtol=0)  # ... which changed the gradient
    # ... by less than eps per entry of the softmax times the cotangent.
    assert np.max(np.abs(grads.W - exact)) <= eps / 6 * np.abs(np.asarray(x)).sum(0).max()


def test_filter_under_jit_and_vmap(transform):
    params, x, t = peaked_problem()
    f = lambda x, W: full_softmax_loss(
        x, FullSoftmaxParams(W, None), t, filter_eps=1e-4, chunk_size=16
    )
    got = transform(jax.grad(f, argnums=(0, 1)))(x, params.W)
    want, _, _ = filtered_reference(x, params, t, 1e-4, 16, np.full(6, 1 / 6))
    np.testing.assert_allclose(got[1], want, atol=1e-14)


def test_filter_with_a_tiny_eps_is_exact():
    params, x, t = make_params(), make_x(), make_target()
    got = jax.grad(full_softmax_loss, argnums=(0, 1))(
        x, params, t, filter_eps=1e-300, chunk_size=16
    )
    want = jax.grad(lambda x, p: jnp.mean(ref_loss(x, p, t)), argnums=(0, 1))(x, params)
    chex.assert_trees_all_close(got, want, atol=1e-12, rtol=1e-12)


def densify(pairs, layout, dtype):
    """``sum_p left[p] (outer) right[p]`` scattered into the blocks of a weight of ``layout``."""
    out = jnp.zeros(layout.view, dtype)
    out = jnp.moveaxis(out, layout.axis, 0)
    terms = pairs.right if pairs.left is None else jnp.einsum("pi,pj->pij", pairs.left, pairs.right)
    terms = terms.reshape((terms.shape[0],) + out.shape[1:])
    out = out.at[pairs.blocks].add(terms, mode="drop")
    return jnp.moveaxis(out, 0, layout.axis).reshape(layout.shape)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("n_outputs,chunk", [(96, 16), (90, 16)], ids=["divides", "ragged"])
def test_filtered_sparse_rule_equals_the_custom_vjp(n_outputs, chunk, bias):
    """The rule's pairs, densified, are the filtered gradient; its blocks are the kept ones."""
    params, x, t = peaked_problem(n_outputs)
    if bias:
        params = params._replace(b=jnp.asarray(np.random.default_rng(6).normal(size=n_outputs)))
    plan = _core.Plan(n_outputs, chunk, None, False, 1e-4)
    cot = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, (6, 2)))
    cot = cot.at[3].set(0.0)  # an example with no cotangent: keeps no chunk
    stats, vjp = jax.vjp(lambda W: _core.logit_stats(x, W, params.b, t, plan), params.W)
    (dW,) = vjp(_core.Stats(cot[:, 0], cot[:, 1], None, jnp.zeros_like(stats.chunk_lse)))
    rule = FilteredChunksRule(plan, has_bias=bias)
    layout = rule.layout(params.W.shape)
    assert layout.view == (N_IN, n_outputs // rule.block, rule.block) and layout.axis == 1
    b = (params.b,) if bias else ()
    pairs = rule.pairs(cot, x, params.W, *b, t, stats.lse, stats.chunk_lse)
    np.testing.assert_allclose(densify(pairs, layout, jnp.float64), dW, atol=1e-14)
    touched = np.asarray(pairs.blocks) < layout.n_blocks
    nonzero = np.any(np.asarray(dW).reshape(N_IN, -1, rule.block) != 0, axis=(0, 2))
    np.testing.assert_array_equal(touched, nonzero)  # the touched blocks are the non-zero ones
    assert 0 < touched.sum() < layout.n_blocks


@pytest.mark.slow
def test_value_and_sparse_grad_gives_the_kept_blocks_and_lazy_updates_them():
    """Through value_and_sparse_grad, W's gradient holds the kept chunks and the targets' blocks."""
    optax = pytest.importorskip("optax")
    from blocksparse_jax import SparseBlockGrad, value_and_sparse_grad
    from blocksparse_jax.optim import apply_updates, lazy

    params, x, t = peaked_problem()
    # float32: optim's block helpers promote to float32 at least, which strict mode refuses
    # for float64 weights.
    params = FullSoftmaxParams(params.W.astype(jnp.float32), jnp.zeros((96,), jnp.float32))
    x = x.astype(jnp.float32)
    loss_fn = lambda p: full_softmax_loss(x, p, t, filter_eps=1e-4, chunk_size=16)
    loss, grads = value_and_sparse_grad(loss_fn)(params)
    dense = jax.grad(loss_fn)(params)
    assert isinstance(grads.W, SparseBlockGrad) and not isinstance(grads.b, SparseBlockGrad)
    np.testing.assert_allclose(grads.W.todense(), dense.W, atol=1e-7)
    np.testing.assert_allclose(grads.b, dense.b, atol=1e-7)
    touched = np.asarray(grads.W.indices)[np.asarray(grads.W.indices) < 6]
    np.testing.assert_array_equal(touched, [0, 3])  # the targets' chunk and output 60's
    tx = lazy(optax.sgd(1.0))

    @jax.jit
    def step(p, state):
        _, g = value_and_sparse_grad(loss_fn)(p)
        updates, state = tx.update(g, state, p)
        return apply_updates(p, updates)

    new = step(params, tx.init(params))
    moved = np.flatnonzero(np.any(np.asarray(new.W != params.W), axis=0)) // 16
    assert set(moved.tolist()) == {0, 3}


def test_unfiltered_gradient_is_not_marked_sparse():
    params, x, t = make_params(), make_x(), make_target()
    eqns = jax.make_jaxpr(lambda p: full_softmax_loss(x, p, t))(params).eqns
    assert not any(e.primitive.name.startswith("sparse_") for e in eqns)
    eqns = jax.make_jaxpr(lambda p: full_softmax_loss(x, p, t, filter_eps=1e-3))(params).eqns
    names = [e.primitive.name for e in eqns]
    assert names.count("sparse_weight") == 1 and names.count("sparse_use") == 1


def test_gradient_memory_is_a_small_fraction_of_the_logits():
    """At V = 262,144, batch 512, width 128: at most 1/32 of the float32 logits in temp memory."""
    batch, n_in, n_outputs = 512, 128, 262_144
    x = jax.ShapeDtypeStruct((batch, n_in), jnp.float32)
    params = FullSoftmaxParams(
        jax.ShapeDtypeStruct((n_in, n_outputs), jnp.float32),
        jax.ShapeDtypeStruct((n_outputs,), jnp.float32),
    )
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    logits_bytes = batch * n_outputs * 4
    for kw in ({}, dict(filter_eps=1e-6), dict(label_smoothing=0.1, softcap=30.0, z_loss=1e-4)):
        step = jax.jit(
            jax.value_and_grad(
                lambda x, p, t, kw=kw: full_softmax_loss(x, p, t, **kw), argnums=(0, 1)
            )
        )
        temp = step.lower(x, params, t).compile().memory_analysis().temp_size_in_bytes
        assert temp <= logits_bytes / 32, (kw, temp)


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 10, 16])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_is_the_brute_force_top_k(k, chunk_size):
    params, x = make_params(), make_x((2, 4), scale=2.0)
    logp, ids = full_softmax_top_k(x, params, k, chunk_size=chunk_size, softcap=4.0)
    z = ref_logits(x, params, softcap=4.0)
    ref = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want_ids = np.argsort(-ref, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(logp, np.take_along_axis(ref, want_ids, -1), atol=1e-12)
    assert ids.dtype == jnp.int32


def test_top_k_ties_go_to_the_lower_id():
    params = FullSoftmaxParams(
        jnp.zeros((N_IN, 40)), jnp.zeros((40,)).at[jnp.array([3, 17, 33])].set(1.0)
    )
    _, ids = full_softmax_top_k(make_x(), params, 4, chunk_size=16)
    np.testing.assert_array_equal(ids, np.broadcast_to([3, 17, 33, 0], (7, 4)))


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_samples_follow_the_softmax(chunk_size):
    params = make_params(n_outputs=20)
    n = 20_000
    x = jnp.broadcast_to(make_x((1,)), (n, N_IN))
    ids = full_softmax_sample(jax.random.key(7), x, params, chunk_size=chunk_size, softcap=2.0)
    z = ref_logits(x[:1], params, softcap=2.0)[0]
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    freq = np.bincount(np.asarray(ids), minlength=20) / n
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-4)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


BAD = [
    (lambda p, x, t: full_softmax_loss(x, (p.W,), t), TypeError, "FullSoftmaxParams"),
    (lambda p, x, t: full_softmax_loss(x, (p.W[0], p.b), t), ValueError, "W must be 2-D"),
    (lambda p, x, t: full_softmax_loss(x, (p.W, p.b[:3]), t), ValueError, "b must have shape"),
    (lambda p, x, t: full_softmax_loss(x[:, :2], p, t), ValueError, "x must have shape"),
    (lambda p, x, t: full_softmax_loss(x, p, t.astype(jnp.float32)), TypeError, "target"),
    (lambda p, x, t: full_softmax_loss(x, p, t[:3]), ValueError, "target must have shape"),
    (lambda p, x, t: full_softmax_loss(x, p, t.at[0].set(V)), IndexError, "target holds 50"),
    (lambda p, x, t: full_softmax_loss(x, p, t, mask=jnp.ones(3, bool)), ValueError, "mask"),
    (lambda p, x, t: full_softmax_loss(x, p, t, reduction="avg"), ValueError, "reduction"),
    (
        lambda p, x, t: full_softmax_loss(x, p, t, label_smoothing=1.0),
        ValueError,
        "label_smoothing",
    ),
    (lambda p, x, t: full_softmax_loss(x, p, t, z_loss=-1.0), ValueError, "z_loss"),
    (lambda p, x, t: full_softmax_loss(x, p, t, softcap=0.0), ValueError, "softcap"),
    (lambda p, x, t: full_softmax_loss(x, p, t, filter_eps=1.0), ValueError, "filter_eps"),
    (
        lambda p, x, t: full_softmax_loss(x, p, t, filter_eps=1e-3, label_smoothing=0.1),
        ValueError,
        "label_smoothing",
    ),
    (lambda p, x, t: full_softmax_loss(x, p, t, chunk_size=0), ValueError, "chunk_size"),
    (lambda p, x, t: full_softmax_loss(x, p, t, z_loss="big"), TypeError, "z_loss"),
    (lambda p, x, t: full_softmax_top_k(x, p, 0), ValueError, "k must be in"),
    (lambda p, x, t: full_softmax_top_k(x, p, 2.0), TypeError, "k must be"),
    (lambda p, x, t: full_softmax_init(jax.random.key(0), 0, 5), ValueError, "n_in"),
    (
        lambda p, x, t: full_softmax_init(jax.random.key(0), 4, 5, dtype=jnp.int32),
        TypeError,
        "dtype",
    ),
]


@pytest.mark.parametrize("call,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(make_params(), make_x(), make_target())


def test_traced_option_says_how_to_fix_it():
    params, x, t = make_params(), make_x(), make_target()
    with pytest.raises(TypeError, match="static_argnames='softcap'"):
        jax.jit(lambda c: full_softmax_loss(x, params, t, softcap=c))(2.0)


def test_init_shapes_and_scale():
    params = full_softmax_init(jax.random.key(0), 64, 3000)
    assert params.W.shape == (64, 3000) and params.W.dtype == jnp.float32
    np.testing.assert_array_equal(params.b, 0.0)
    assert abs(float(jnp.std(params.W)) - 1 / math.sqrt(64)) < 0.01
