"""The hierarchical softmax family against the brute-force references of hsoftmax_reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from blocksparse_jax import (
    HSoftmaxParams,
    frequency_classes,
    h_log_softmax,
    h_softmax,
    h_softmax_init,
    h_softmax_loss,
    h_softmax_sample,
    h_softmax_sgd_step,
    h_softmax_top_k,
)
from tests.hsoftmax_reference import (
    h_log_softmax_ref,
    nll_ref,
    real_outputs,
    theano_h_softmax_ref,
)

N_IN, BATCH = 5, 4
# name: (n_outputs, n_classes, n_outputs_per_class, class_sizes)
CASES = {
    "exact_fit": (12, 3, 4, None),
    "padded": (10, 3, 4, None),  # the last class has 2 padded slots
    "empty_class": (7, 3, 4, None),  # the last class holds nothing
    "class_sizes": (12, 3, 4, (1, 4, 2)),  # uneven classes, as from frequency_classes
}


def make_params(n_classes, per_class, dtype=jnp.float64, *, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    shapes = [(N_IN, n_classes), (n_classes,), (n_classes, N_IN, per_class), (n_classes, per_class)]
    return HSoftmaxParams(*(jnp.asarray(scale * rng.standard_normal(s), dtype) for s in shapes))


def make_x(batch=BATCH, dtype=jnp.float64, *, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, N_IN)), dtype)


def make_target(n_outputs, batch=BATCH, *, seed=2, class_sizes=None, per_class=None):
    rng = np.random.default_rng(seed)
    if class_sizes is None:
        return jnp.asarray(rng.integers(0, n_outputs, batch), jnp.int32)
    real = np.flatnonzero(real_outputs(n_outputs, len(class_sizes), per_class, class_sizes))
    return jnp.asarray(rng.choice(real, batch), jnp.int32)


def np64(a):
    return np.asarray(a, np.float64)


# --------------------------------------------------------------------------------------
# Theano's h_softmax
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["padded", "empty_class"])
def test_h_softmax_matches_theano_reference(case, transform):
    n_outputs, C, P, _ = CASES[case]
    params, x = make_params(C, P), make_x()
    t = make_target(n_outputs)
    ref = theano_h_softmax_ref(x, n_outputs, C, P, *params)

    def f(x, W1, b1, W2, b2, t):
        full = h_softmax(x, BATCH, n_outputs, C, P, W1, b1, W2, b2)
        return full, h_softmax(x, BATCH, n_outputs, C, P, W1, b1, W2, b2, t)

    full, at_target = transform(f)(x, *params, t)
    chex.assert_shape(full, (BATCH, n_outputs))
    chex.assert_shape(at_target, (BATCH,))
    np.testing.assert_allclose(np64(full), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np64(at_target), ref[np.arange(BATCH), t], rtol=1e-12)


def test_h_softmax_target_is_column_of_full_output():
    """Theano's own test: the target output equals the matching column of the full output."""
    n_outputs, C, P, _ = CASES["padded"]
    params, x = make_params(C, P, jnp.float32), make_x(dtype=jnp.float32)
    full = h_softmax(x, BATCH, n_outputs, C, P, *params)
    for t in (make_target(n_outputs), make_target(n_outputs)[:, None].astype(jnp.int64)):
        out = h_softmax(x, BATCH, n_outputs, C, P, *params, target=t)
        assert out.dtype == jnp.float32
        chex.assert_trees_all_close(out, full[jnp.arange(BATCH), t.reshape(-1)], rtol=1e-6)


@pytest.mark.parametrize("case", ["exact_fit", "padded"])
def test_h_softmax_padding_rows_sum_below_one(case):
    """As in Theano, padded slots share the last class's mass and are dropped."""
    n_outputs, C, P, _ = CASES[case]
    params, x = make_params(C, P), make_x()
    row_sums = np64(h_softmax(x, BATCH, n_outputs, C, P, *params).sum(axis=1))
    full_grid = theano_h_softmax_ref(x, C * P, C, P, *params)
    np.testing.assert_allclose(row_sums, 1.0 - full_grid[:, n_outputs:].sum(axis=1), rtol=1e-12)
    if n_outputs < C * P:
        assert np.all(row_sums < 1.0 - 1e-6)
    # The log-space API masks the padding instead: rows sum to 1.
    logp = h_log_softmax(x, params, n_outputs=n_outputs)
    np.testing.assert_allclose(np64(jnp.exp(logp).sum(axis=1)), 1.0, rtol=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(batch_size=3), r"batch_size=3 does not match x.shape\[0\]=4"),
        (dict(n_classes=4), r"n_classes=4 does not match W1.shape\[1\]=3"),
        (dict(n_outputs_per_class=5), r"n_outputs_per_class=5 does not match W2.shape\[2\]=4"),
        (dict(n_outputs=13), r"n_outputs must be in \[1, .*= \[1, 12\].*got n_outputs=13"),
        (dict(x=jnp.zeros((BATCH, N_IN + 1))), r"x must have shape \(batch, n_in\) with n_in=5"),
        (dict(b1=jnp.zeros((4,))), r"b1 must have shape \(n_classes,\) = \(3,\).*got shape \(4,\)"),
        (dict(W2=jnp.zeros((3, N_IN, 4, 1))), r"W2 must be 3-D \(n_classes, n_in, n_outputs_per"),
        (
            dict(W2=jnp.zeros((2, N_IN, 4))),
            r"W2 must have shape .*n_classes=3.*got shape \(2, 5, 4\)",
        ),
        (dict(b2=jnp.zeros((3, 5))), r"b2 must have shape .* = \(3, 4\).*got shape \(3, 5\)"),
        (dict(x=jnp.zeros((BATCH, N_IN, 1))), r"x must be 2-D \(batch, n_in\); got shape"),
        (dict(target=jnp.zeros((BATCH, 2), jnp.int32)), r"target must have shape \(batch,\) or"),
    ],
)
def test_h_softmax_bad_shapes(change, match):
    params = make_params(3, 4)
    args = dict(x=make_x(), batch_size=BATCH, n_outputs=10, n_classes=3, n_outputs_per_class=4)
    args.update(params._asdict(), target=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        h_softmax(**args)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda x, p: h_log_softmax(x[:, :3], p, n_outputs=10),
            r"x must have shape \(batch, n_in\) with n_in=5",
        ),
        (
            lambda x, p: h_log_softmax(x[0, 0], p, n_outputs=10),
            r"x must have shape \(\.\.\., n_in\): any leading batch dimensions",
        ),
        (lambda x, p: h_log_softmax(x, p, n_outputs=13), r"n_outputs must be in .* = \[1, 12\]"),
        (
            lambda x, p: h_log_softmax(x, p, jnp.zeros((3,), jnp.int32), n_outputs=10),
            r"target must have shape \(batch,\) or \(batch, 1\) with batch=4",
        ),
        (
            lambda x, p: h_log_softmax(x, p, n_outputs=10, class_sizes=jnp.ones((4,), jnp.int32)),
            r"class_sizes must have shape \(n_classes,\) = \(3,\)",
        ),
        (
            lambda x, p: h_log_softmax(x, p, n_outputs=12, class_sizes=jnp.array([1, 5, 2])),
            r"class_sizes must lie in \[0, n_outputs_per_class\] = \[0, 4\]",
        ),
        (
            lambda x, p: h_log_softmax(x, p._replace(b2=p.b2[:, :3]), n_outputs=10),
            r"b2 must have shape \(n_classes, n_outputs_per_class\) = \(3, 4\)",
        ),
        (
            lambda x, p: h_softmax_sample(jax.random.key(0), x, p, n_outputs=0),
            r"n_outputs must be in .* = \[1, 12\]",
        ),
        (
            lambda x, p: h_softmax_top_k(x, p, 2, n_outputs=10, approximate=True, n_best_classes=4),
            r"n_best_classes must be in \[1, n_classes\] = \[1, 3\]",
        ),
    ],
)
def test_log_space_bad_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_x(), make_params(3, 4))


def test_bad_dtypes():
    params, x = make_params(3, 4), make_x()
    with pytest.raises(TypeError, match="target must be an array of integer"):
        h_softmax(x, BATCH, 10, 3, 4, *params, target=jnp.zeros((BATCH,)))
    with pytest.raises(TypeError, match="W1 must have a floating dtype"):
        h_log_softmax(x, params._replace(W1=jnp.zeros((N_IN, 3), jnp.int32)), n_outputs=10)
    with pytest.raises(TypeError, match="params must be an HSoftmaxParams"):
        h_log_softmax(x, params[:3], n_outputs=10)


# --------------------------------------------------------------------------------------
# Out-of-range targets
# --------------------------------------------------------------------------------------

N_OUT = 10  # the "padded" case


def _seed(x, p, t):
    return h_softmax(x, BATCH, N_OUT, 3, 4, *p, target=t)


def _log(x, p, t):
    return h_log_softmax(x, p, t, n_outputs=N_OUT)


def _loss(x, p, t):
    return h_softmax_loss(x, p, t, n_outputs=N_OUT, reduction="none")


@pytest.mark.parametrize("fn", [_seed, _log, _loss])
@pytest.mark.parametrize("bad", [N_OUT, 11, -1, 2**40])
def test_target_out_of_range_eager(fn, bad):
    t = np.array([0, 3, 9, 1], np.int64)
    t[2] = bad
    with pytest.raises(IndexError, match=rf"target holds {bad} at position \(2,\).*n_outputs=10"):
        fn(make_x(), make_params(3, 4), jnp.asarray(t))


@pytest.mark.parametrize("fn, fill", [(_seed, 0.0), (_log, -np.inf), (_loss, np.inf)])
def test_target_out_of_range_under_jit_reported_by_checkify(fn, fill):
    x, p = make_x(), make_params(3, 4)
    checked = checkify.checkify(jax.jit(fn), errors=checkify.index_checks)
    err, out = checked(x, p, jnp.array([0, 3, 10, 1], jnp.int32))
    assert "index 10 is out of bounds" in err.get()
    assert np64(out)[2] == fill and np.all(np.isfinite(np64(out)[[0, 1, 3]]))
    err, _ = checked(x, p, jnp.array([0, 3, -2, 1], jnp.int32))
    assert "index -2 is out of bounds" in err.get()
    err, _ = checked(x, p, jnp.array([0, 3, 9, 1], jnp.int32))
    assert err.get() is None


def test_target_on_padded_slot_eager():
    n_outputs, C, P, sizes = CASES["class_sizes"]
    with pytest.raises(IndexError, match=r"target holds 2 at position \(1,\), a padded slot"):
        h_log_softmax(
            make_x(),
            make_params(C, P),
            jnp.array([0, 2, 4, 8]),
            n_outputs=n_outputs,
            class_sizes=jnp.array(sizes),
        )


# --------------------------------------------------------------------------------------
# The log-space API: values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_h_log_softmax_matches_reference(case):
    _check_h_log_softmax(case, lambda f: f)


def test_h_log_softmax_transformed(transform):
    _check_h_log_softmax("class_sizes", transform)


def _check_h_log_softmax(case, transform):
    n_outputs, C, P, sizes = CASES[case]
    params, x = make_params(C, P), make_x()
    t = make_target(n_outputs, class_sizes=sizes, per_class=P)
    cs = None if sizes is None else jnp.array(sizes, jnp.int32)
    ref = h_log_softmax_ref(x, *params, n_outputs, sizes)

    def f(x, params, t):
        full = h_log_softmax(x, params, n_outputs=n_outputs, class_sizes=cs)
        return full, h_log_softmax(x, params, t, n_outputs=n_outputs, class_sizes=cs)

    full, at_target = transform(f)(x, params, t)
    chex.assert_shape(full, (BATCH, n_outputs))
    chex.assert_shape(at_target, (BATCH,))
    np.testing.assert_allclose(np64(full), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np64(at_target), ref[np.arange(BATCH), t], rtol=1e-12)
    np.testing.assert_allclose(np64(jax.nn.logsumexp(full, axis=1)), 0.0, atol=1e-12)


def test_one_example_form():
    n_outputs, C, P, _ = CASES["padded"]
    params, x, t = make_params(C, P), make_x(), make_target(n_outputs)
    full = h_log_softmax(x, params, n_outputs=n_outputs)
    chex.assert_trees_all_close(h_log_softmax(x[1], params, n_outputs=n_outputs), full[1])
    chex.assert_trees_all_close(
        h_log_softmax(x[1], params, t[1], n_outputs=n_outputs), full[1, t[1]]
    )
    chex.assert_shape(h_softmax_top_k(x[1], params, 3, n_outputs=n_outputs), ((3,), (3,)))
    chex.assert_shape(h_softmax_sample(jax.random.key(0), x[1], params, n_outputs=n_outputs), ())


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_large_logits_stay_finite(dtype):
    """Logits of magnitude ~1e4: probabilities underflow, log-probabilities do not."""
    n_outputs, C, P, _ = CASES["padded"]
    params = make_params(C, P, dtype, scale=1e4 / np.sqrt(N_IN))
    x, t = make_x(dtype=dtype), make_target(n_outputs)
    ref = h_log_softmax_ref(x, *params, n_outputs)
    assert np.abs(np64(x @ params.W1)).max() > 5e3
    full = h_log_softmax(x, params, n_outputs=n_outputs)
    at_target = h_log_softmax(x, params, t, n_outputs=n_outputs)
    assert np.all(np.isfinite(np64(full))) and np.all(np.isfinite(np64(at_target)))
    rtol = 1e-6 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(np64(full), ref, rtol=rtol, atol=rtol * 1e4)
    np.testing.assert_allclose(
        np64(at_target), ref[np.arange(BATCH), t], rtol=rtol, atol=rtol * 1e4
    )
    g = jax.grad(h_softmax_loss, argnums=1)(x, params, t, n_outputs=n_outputs)
    assert all(np.all(np.isfinite(np64(leaf))) for leaf in g)


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    """bfloat16/float16 inputs give float32 log-probs within 0.1 (bfloat16) of float64.

    The tolerance is the inputs' rounding (8 significand bits for bfloat16) carried
    through logits of magnitude ~3, not the accumulation.
    """
    n_outputs, C, P, _ = CASES["padded"]
    params64, x64, t = make_params(C, P), make_x(), make_target(n_outputs)
    params = jax.tree.map(lambda a: a.astype(dtype), params64)
    x = x64.astype(dtype)
    # The reference on the rounded inputs isolates the accumulation error ...
    ref_rounded = h_log_softmax_ref(x, *params, n_outputs)
    ref = h_log_softmax_ref(x64, *params64, n_outputs)
    full = h_log_softmax(x, params, n_outputs=n_outputs)
    at_target = h_log_softmax(x, params, t, n_outputs=n_outputs)
    loss = h_softmax_loss(x, params, t, n_outputs=n_outputs)
    assert full.dtype == at_target.dtype == loss.dtype == jnp.float32
    np.testing.assert_allclose(np64(full), ref_rounded, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np64(at_target), ref_rounded[np.arange(BATCH), t], atol=1e-5)
    # ... and the distance to float64 is the inputs' rounding.
    atol = 0.1 if dtype == jnp.bfloat16 else 0.01
    np.testing.assert_allclose(np64(full), ref, atol=atol)
    np.testing.assert_allclose(np64(jnp.exp(full).sum(axis=1)), 1.0, rtol=1e-5)
    g = jax.grad(h_softmax_loss, argnums=1)(x, params, t, n_outputs=n_outputs)
    assert all(leaf.dtype == dtype for leaf in g)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def test_check_grads_order_2():
    n_outputs, C, P, sizes = CASES["class_sizes"]
    cs = jnp.array(sizes, jnp.int32)
    params, x = make_params(C, P, scale=0.5), make_x()
    t = make_target(n_outputs, class_sizes=sizes, per_class=P)
    # Jitted so that the many numerical evaluations are one dispatch each.
    loss = jax.jit(lambda x, p: h_softmax_loss(x, p, t, n_outputs=n_outputs, class_sizes=cs))
    check_grads(loss, (x, params), order=2, modes=["rev"])
    # The full outputs' and h_softmax's gradients: see test_sparse_gradient_equals_dense_...


def test_sparse_gradient_equals_dense_and_touches_only_target_classes():
    n_outputs, C, P, _ = (40, 8, 5, None)
    params, x = make_params(C, P), make_x()
    t = jnp.array([0, 7, 6, 39], jnp.int32)  # classes 0, 1, 1, 7
    sparse = jax.grad(lambda p: h_softmax_loss(x, p, t, n_outputs=n_outputs))(params)
    dense = jax.grad(
        lambda p: -jnp.mean(h_log_softmax(x, p, n_outputs=n_outputs)[jnp.arange(BATCH), t])
    )(params)
    chex.assert_trees_all_close(sparse, dense, rtol=1e-12, atol=1e-14)
    touched = np.flatnonzero(np.any(np64(sparse.W2) != 0, axis=(1, 2)))
    np.testing.assert_array_equal(touched, [0, 1, 7])
    np.testing.assert_array_equal(np.flatnonzero(np.any(np64(sparse.b2) != 0, axis=1)), [0, 1, 7])
    assert np.all(np64(sparse.W1) != 0)
    # The same for Theano's h_softmax: its target path (sparse_block_dot) against its
    # full output, both differentiated.
    theano = lambda p, t: h_softmax(x, BATCH, n_outputs, C, P, *p, target=t)
    sparse = jax.grad(lambda p: jnp.sum(jnp.log(theano(p, t))))(params)
    dense = jax.grad(lambda p: jnp.sum(jnp.log(theano(p, None)[jnp.arange(BATCH), t])))(params)
    chex.assert_trees_all_close(sparse, dense, rtol=1e-12, atol=1e-14)
    touched = np.flatnonzero(np.any(np64(sparse.W2) != 0, axis=(1, 2)))
    np.testing.assert_array_equal(touched, [0, 1, 7])


def test_per_example_gradients_with_vmap():
    n_outputs, C, P, _ = CASES["padded"]
    params, x, t = make_params(C, P), make_x(), make_target(n_outputs)
    one = lambda p, x, t: h_softmax_loss(x, p, t, n_outputs=n_outputs)  # x (n_in,), t ()
    per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, x, t)
    batch_grad = jax.jit(jax.grad(lambda p, x, t: h_softmax_loss(x, p, t, n_outputs=n_outputs)))
    for b in range(BATCH):
        g = batch_grad(params, x[b : b + 1], t[b : b + 1])
        chex.assert_trees_all_close(jax.tree.map(lambda a, b=b: a[b], per_example), g, rtol=1e-12)
    mean = jax.grad(lambda p: h_softmax_loss(x, p, t, n_outputs=n_outputs))(params)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a.mean(0), per_example), mean, rtol=1e-12)


def test_jitted_training_step_compiles_once():
    n_outputs = 30
    params = make_params(6, 5, jnp.float32, scale=0.3)  # 30 outputs
    opt = optax.sgd(0.5, momentum=0.9)  # optax.adam trips strict promotion under x64
    state = opt.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x, t, mask):
        loss, g = jax.value_and_grad(h_softmax_loss, argnums=1)(
            x, params, t, n_outputs=n_outputs, mask=mask
        )
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, N_IN)), jnp.float32)
    t = jnp.asarray(rng.integers(0, n_outputs, 8), jnp.int32)
    losses = []
    for i in range(20):
        mask = jnp.asarray(np.arange(8) != i % 8)
        params, state, loss = step(params, state, x, t, mask)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------------------
# The training step with the sparse W2 update
# --------------------------------------------------------------------------------------


def _fd_grad(f, arrays, eps=1e-6):
    """Central finite differences of the scalar ``f(*arrays)`` (float64 NumPy) for every array."""
    arrays = [np64(a).copy() for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        for k in np.ndindex(a.shape):
            old = a[k]
            a[k] = old + eps
            up = f(*arrays)
            a[k] = old - eps
            down = f(*arrays)
            a[k] = old
            g[k] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("jit", [False, True], ids=["plain", "jit-donated"])
def test_sgd_step_equals_finite_difference_step(case, reduction, jit):
    n_outputs, C, P, sizes = CASES[case]
    params, x = make_params(C, P), make_x()
    t = make_target(n_outputs, class_sizes=sizes, per_class=P)
    mask = np.array([True, True, False, True])
    t = jnp.where(jnp.asarray(mask), t, -1)  # a padding token, masked out
    lr = 0.3

    def ref(x, W1, b1, W2, b2):
        logp = h_log_softmax_ref(x, W1, b1, W2, b2, n_outputs, sizes)
        nll = np.where(mask, -logp[np.arange(BATCH), np.where(mask, t, 0)], 0.0)
        return nll.sum() if reduction == "sum" else nll.sum() / mask.sum()

    grads = _fd_grad(ref, [x, *params])
    step = h_softmax_sgd_step
    if jit:
        step = jax.jit(step, static_argnames=("n_outputs", "reduction"), donate_argnums=1)
    kw = dict(n_outputs=n_outputs, mask=jnp.asarray(mask), reduction=reduction)
    if sizes is not None:
        kw["class_sizes"] = jnp.asarray(sizes)
    want_loss = ref(x, *params)
    before = [np64(a) for a in params]
    loss, new, dx = step(x, params, t, lr, **kw)
    np.testing.assert_allclose(np64(loss), want_loss, rtol=1e-12)
    np.testing.assert_allclose(np64(dx), grads[0], rtol=1e-6, atol=1e-8)
    for got, p, g in zip(new, before, grads[1:], strict=True):
        np.testing.assert_allclose(np64(got), p - lr * g, rtol=1e-6, atol=1e-8)
    # Classes no unmasked target falls in keep their W2 blocks bit for bit.
    hit = np.unique(np.asarray(t)[mask] // P)
    for c in range(C):
        if c not in hit:
            np.testing.assert_array_equal(np64(new.W2[c]), before[2][c])


def test_sgd_step_one_example_low_precision_and_temp_memory():
    n_outputs, C, P, _ = CASES["padded"]
    params, x, t = make_params(C, P), make_x(), make_target(n_outputs)
    loss, new, dx = h_softmax_sgd_step(x[1], params, t[1], 0.5, n_outputs=n_outputs)
    want = h_softmax_sgd_step(x[1:2], params, t[1:2], 0.5, n_outputs=n_outputs)
    chex.assert_trees_all_close((loss, new, dx), (want[0], want[1], want[2][0]), rtol=1e-12)
    assert dx.shape == (N_IN,)
    # bfloat16 parameters keep their dtype; the step is the float32 step rounded.
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    x16 = x.astype(jnp.bfloat16)
    _, new16, dx16 = h_softmax_sgd_step(x16, p16, t, 0.5, n_outputs=n_outputs)
    assert all(a.dtype == jnp.bfloat16 for a in new16) and dx16.dtype == jnp.bfloat16
    up = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    _, new32, dx32 = h_softmax_sgd_step(up(x16), up(p16), t, 0.5, n_outputs=n_outputs)
    chex.assert_trees_all_close(up((new16, dx16)), (new32, dx32), rtol=2**-7, atol=2**-7)
    # No dense W2-sized gradient: the compiled step's temporaries stay far below W2.
    V = 256 * 256
    big, xb, tb = make_params(256, 256, jnp.float32), make_x(dtype=jnp.float32), make_target(V)
    step = jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)
    temp = step.lower(xb, big, tb, 0.1, n_outputs=V).compile().memory_analysis()
    assert temp.temp_size_in_bytes < big.W2.nbytes / 4
    dense = jax.jit(
        lambda p: jax.tree.map(
            lambda a, g: a - 0.1 * g, p, jax.grad(h_softmax_loss, argnums=1)(xb, p, tb, n_outputs=V)
        ),
        donate_argnums=0,
    )
    assert dense.lower(big).compile().memory_analysis().temp_size_in_bytes >= big.W2.nbytes


def test_sgd_step_bad_options():
    n_outputs, C, P, _ = CASES["padded"]
    params, x, t = make_params(C, P), make_x(), make_target(n_outputs)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'.*got 'none'"):
        h_softmax_sgd_step(x, params, t, 0.1, n_outputs=n_outputs, reduction="none")
    with pytest.raises(ValueError, match=r"learning_rate must be a scalar; got shape \(2,\)"):
        h_softmax_sgd_step(x, params, t, jnp.ones(2), n_outputs=n_outputs)
    with pytest.raises(TypeError, match="learning_rate must be a float scalar; got dtype int"):
        h_softmax_sgd_step(x, params, t, 1, n_outputs=n_outputs)


# --------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------


def test_loss_reductions_and_mask(transform):
    n_outputs, C, P, _ = CASES["padded"]
    params, x = make_params(C, P), make_x()
    t = np.array([3, -1, 9, 0], np.int32)  # -1: a padding token, masked out
    mask = np.array([True, False, True, True])
    f = lambda x, p, t, m: {
        r: h_softmax_loss(x, p, t, n_outputs=n_outputs, mask=m, reduction=r)
        for r in ("mean", "sum", "none")
    }
    out = transform(f)(x, params, jnp.asarray(t), jnp.asarray(mask))
    for reduction, value in out.items():
        ref = nll_ref(x, *params, np.where(mask, t, 0), n_outputs, mask, reduction)
        np.testing.assert_allclose(np64(value), ref, rtol=1e-12)
        unmasked = h_softmax_loss(x, params, t % 10, n_outputs=10, reduction=reduction)
        ref = nll_ref(x, *params, t % 10, 10, None, reduction)
        np.testing.assert_allclose(np64(unmasked), ref, rtol=1e-12)


def test_loss_all_masked_and_bad_options():
    params, x, t = make_params(3, 4), make_x(), make_target(10)
    none = jnp.zeros((BATCH,), jnp.bool_)
    assert float(h_softmax_loss(x, params, t, n_outputs=10, mask=none)) == 0.0
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'; got 'max'"):
        h_softmax_loss(x, params, t, n_outputs=10, reduction="max")
    with pytest.raises(ValueError, match=r"mask must have shape \(batch,\) = \(4,\)"):
        h_softmax_loss(x, params, t, n_outputs=10, mask=jnp.ones((3,), jnp.bool_))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        h_softmax_loss(x, params, t, n_outputs=10, mask=jnp.ones((BATCH,), jnp.int32))


# --------------------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, classes_per_step",
    [("padded", 1), ("padded", None), ("empty_class", 2), ("class_sizes", 1), ("class_sizes", 2)],
)
def test_top_k_exact_equals_brute_force(case, classes_per_step):
    n_outputs, C, P, sizes = CASES[case]
    params, x = make_params(C, P), make_x()
    cs = None if sizes is None else jnp.array(sizes, jnp.int32)
    k = 5
    vals, idx = jax.jit(
        lambda x, p: h_softmax_top_k(
            x, p, k, n_outputs=n_outputs, class_sizes=cs, classes_per_step=classes_per_step
        )
    )(x, params)
    ref = h_log_softmax_ref(x, *params, n_outputs, sizes)
    ref_vals, ref_idx = jax.lax.top_k(jnp.asarray(ref), k)
    assert idx.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np64(vals), np64(ref_vals), rtol=1e-12)


def test_top_k_exact_on_a_confident_model_and_without_gradient():
    n_outputs, C, P = 40, 8, 5
    params, x = make_params(C, P, scale=4.0), make_x()  # peaked: the search stops early
    ref_vals, ref_idx = jax.lax.top_k(jnp.asarray(h_log_softmax_ref(x, *params, n_outputs)), 4)
    f = jax.jit(lambda x, p: h_softmax_top_k(x, p, 4, n_outputs=n_outputs, classes_per_step=1))
    vals, idx = f(x, params)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_allclose(np64(vals), np64(ref_vals), rtol=1e-12)
    text = str(jax.make_jaxpr(f)(x, params))
    assert "while" in text
    # A search for decoding: differentiating through it gives zeros, not an error.
    g = jax.grad(lambda p: jnp.sum(f(x, p)[0]))(params)
    assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in g)


def test_top_k_exact_never_materialises_all_outputs():
    """The exact search's compiled temporaries stay far below ``(batch, n_outputs)``."""
    batch, n_in, C, P = 32, 16, 512, 512
    params = h_softmax_init(jax.random.key(0), n_in, C * P, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (batch, n_in), jnp.float32)
    full_bytes = batch * C * P * 4

    def temp(f):
        return jax.jit(f).lower(x, params).compile().memory_analysis().temp_size_in_bytes

    top = lambda x, p: h_softmax_top_k(x, p, 5, n_outputs=C * P, classes_per_step=4)
    every = lambda x, p: h_log_softmax(x, p, n_outputs=C * P)
    assert temp(every) >= full_bytes  # the measurement sees a (batch, n_outputs) buffer
    assert temp(top) <= full_bytes / 32, temp(top)


def test_top_k_all_outputs_and_vmap(transform):
    n_outputs, C, P, _ = CASES["padded"]
    params, x = make_params(C, P), make_x()
    f = lambda x, p: h_softmax_top_k(x, p, n_outputs, n_outputs=n_outputs, classes_per_step=2)
    vals, idx = transform(f)(x, params)
    ref = h_log_softmax_ref(x, *params, n_outputs)
    np.testing.assert_array_equal(np.asarray(idx), np.argsort(-ref, axis=1, kind="stable"))
    np.testing.assert_allclose(np64(vals), -np.sort(-ref, axis=1), rtol=1e-12)


def test_top_k_approximate():
    n_outputs, C, P = 40, 8, 5
    params, x = make_params(C, P), make_x()
    ref = h_log_softmax_ref(x, *params, n_outputs)
    exact = h_softmax_top_k(x, params, 6, n_outputs=n_outputs)
    # Searching every class is exact.
    every = h_softmax_top_k(x, params, 6, n_outputs=n_outputs, approximate=True, n_best_classes=C)
    chex.assert_trees_all_close(every, exact)
    # The default searches min(k, n_classes) classes: exact log-probs, sorted, in those classes.
    vals, idx = h_softmax_top_k(x, params, 3, n_outputs=n_outputs, approximate=True)
    np.testing.assert_allclose(np64(vals), np.take_along_axis(ref, np.asarray(idx), 1), rtol=1e-12)
    assert np.all(np.diff(np64(vals), axis=1) <= 0)
    class_lp = np.log(np.stack([np.exp(ref[:, c * P : (c + 1) * P]).sum(1) for c in range(C)], 1))
    best = np.argsort(-class_lp, axis=1)[:, :3]
    assert all(set(np.asarray(idx[b]) // P) <= set(best[b]) for b in range(BATCH))
    # Each of them is at most the exact k-th value below the exact one.
    assert np.all(np64(vals) <= np64(exact[0][:, :3]) + 1e-12)
    # A single class of 5 outputs cannot give 6: the rest is -inf.
    vals, _ = h_softmax_top_k(x, params, 6, n_outputs=n_outputs, approximate=True, n_best_classes=1)
    assert np.all(np.isneginf(np64(vals[:, 5])))


def test_top_k_errors():
    params, x = make_params(3, 4), make_x()
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\] \(n_outputs=10\); got k=11"):
        h_softmax_top_k(x, params, 11, n_outputs=10)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        h_softmax_top_k(x, params, 0, n_outputs=10)
    with pytest.raises(ValueError, match=r"k must be in \[1, 7\] \(real outputs=7\); got k=8"):
        h_softmax_top_k(x, params, 8, n_outputs=12, class_sizes=jnp.array([1, 4, 2]))
    with pytest.raises(ValueError, match="n_best_classes is used only with approximate=True"):
        h_softmax_top_k(x, params, 2, n_outputs=10, n_best_classes=2)
    with pytest.raises(TypeError, match="k must be a Python int"):
        h_softmax_top_k(x, params, 2.0, n_outputs=10)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------

# chi-square critical values at p = 0.001 (scipy.stats.chi2.ppf(0.999, df)).
CHI2_999 = {6: 22.458, 9: 27.877}


@pytest.mark.parametrize("case", ["padded", "class_sizes"])
def test_sample_frequencies_chi_square(case):
    n_outputs, C, P, sizes = CASES[case]
    params = make_params(C, P, scale=0.7)
    cs = None if sizes is None else jnp.array(sizes, jnp.int32)
    n = 40_000
    x = jnp.broadcast_to(make_x(1), (n, N_IN))  # one context, n draws
    sample = jax.jit(
        lambda k, x: h_softmax_sample(k, x, params, n_outputs=n_outputs, class_sizes=cs)
    )
    draws = np.asarray(sample(jax.random.key(1234), x))
    assert draws.dtype == np.int32 and draws.shape == (n,)
    p = np.exp(h_log_softmax_ref(x[:1], *params, n_outputs, sizes)[0])
    counts = np.bincount(draws, minlength=n_outputs)
    assert counts[p == 0].sum() == 0, "a padded slot was drawn"
    real = p > 0
    chi2 = np.sum((counts[real] - n * p[real]) ** 2 / (n * p[real]))
    assert chi2 < CHI2_999[int(real.sum()) - 1], (chi2, counts, n * p)


# --------------------------------------------------------------------------------------
# Initialisation and frequency classes
# --------------------------------------------------------------------------------------


def test_init():
    params = h_softmax_init(jax.random.key(0), 16, 1000)
    chex.assert_shape(params, HSoftmaxParams((16, 32), (32,), (32, 16, 32), (32, 32)))
    assert params.W1.dtype == jnp.float32
    assert 0.15 < float(jnp.std(params.W2)) < 0.35 and float(jnp.abs(params.b2).max()) == 0.0
    params = jax.eval_shape(  # shapes and dtypes only: no second compilation
        lambda k: h_softmax_init(k, 4, 10, n_classes=2, dtype=jnp.bfloat16), jax.random.key(0)
    )
    chex.assert_shape(params.W2, (2, 4, 5))
    assert params.b1.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"n_classes must be an int in \[1, n_outputs\]"):
        h_softmax_init(jax.random.key(0), 4, 10, n_classes=11)


def test_frequency_classes():
    n_words, C = 2000, 40
    counts = np.random.default_rng(0).permutation(1e6 / np.arange(1, n_words + 1))  # Zipf
    layout = frequency_classes(counts, C)
    P, sizes = layout.n_outputs_per_class, layout.class_sizes
    assert layout.n_outputs == C * P and sizes.sum() == n_words
    assert 1 <= sizes.min() and P == sizes.max() <= 63  # default cap: ceil(1.25 * 50)
    assert layout.n_outputs <= 1.26 * n_words  # W2 stays close to the vocabulary
    # A bijection between words and the real outputs; padding maps to -1.
    np.testing.assert_array_equal(layout.output_to_word[layout.word_to_output], np.arange(n_words))
    real = real_outputs(layout.n_outputs, C, P, sizes).reshape(-1)
    np.testing.assert_array_equal(layout.output_to_word >= 0, real)
    # More frequent words sit in earlier classes.
    word_class = layout.word_to_output // P
    order = np.argsort(-counts, kind="stable")
    assert np.all(np.diff(word_class[order]) >= 0)
    # Without a cap the classes of more than one word carry equal mass (within 35%).
    lay = frequency_classes(counts, C, max_class_size=n_words)
    mass = np.bincount(lay.word_to_output // lay.n_outputs_per_class, weights=counts)
    mass = mass[lay.class_sizes > 1]
    assert np.all(np.abs(mass / np.median(mass) - 1) <= 0.35), mass / np.median(mass)

    # The default cap spreads the mass far more evenly than an even split (cap 50).
    def largest_mass(lay):
        return np.bincount(lay.word_to_output // lay.n_outputs_per_class, weights=counts).max()

    assert largest_mass(layout) < 0.5 * largest_mass(
        frequency_classes(counts, C, max_class_size=50)
    )
    # The log-space API masks the padding: one distribution over the words.
    params = make_params(C, P, jnp.float32)
    logp = h_log_softmax(
        make_x(2, jnp.float32), params, n_outputs=layout.n_outputs, class_sizes=layout.class_sizes
    )
    assert np.all(np.isneginf(np.asarray(logp)[:, ~real]))
    np.testing.assert_allclose(np.asarray(jnp.exp(logp).sum(1)), 1.0, rtol=1e-5)
    # A tighter cap.
    capped = frequency_classes(counts, C, max_class_size=60)
    assert capped.n_outputs_per_class <= 60 and capped.class_sizes.sum() == n_words
    with pytest.raises(ValueError, match=r"max_class_size must be at least .* = 50"):
        frequency_classes(counts, C, max_class_size=49)
    with pytest.raises(ValueError, match="counts must be finite and non-negative"):
        frequency_classes(-counts)
