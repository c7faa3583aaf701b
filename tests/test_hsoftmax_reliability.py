"""Hostile and degenerate inputs to the hierarchical softmax: each test pins one defined behaviour.

Values are compared with the brute-force references of ``hsoftmax_reference`` or
with the same call on the inputs that should be equivalent (an example masked out
equals the example removed).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocksparse_jax as bsj
from blocksparse_jax import parallel
from tests.hsoftmax_reference import h_log_softmax_ref, nll_ref

N_IN, C, P = 5, 4, 3  # 12 slots
SIZES = jnp.array([0, 3, 2, 3], jnp.int32)  # class 0 is empty: output 0 is a padded slot


def params(seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    shapes = [(N_IN, C), (C,), (C, N_IN, P), (C, P)]
    return bsj.HSoftmaxParams(*(jnp.asarray(rng.standard_normal(s), dtype) for s in shapes))


def xs(batch=4, seed=1, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, N_IN)), dtype)


def all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------
# Masked-out examples are free: selected out before any arithmetic.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("class_sizes", [None, SIZES], ids=["full", "class_sizes"])
@pytest.mark.parametrize("jit", [False, True], ids=["plain", "jit"])
def test_masked_example_with_nan_x_is_free(bad, class_sizes, jit):
    p, x = params(), xs()
    x_bad = x.at[3].set(bad)
    target = jnp.array([4, 5, 9, -1])  # -1: a padding id (out of range, and 0 is padded)
    mask = jnp.array([True, True, True, False])
    kw = dict(class_sizes=class_sizes)

    def loss(p, x, t, m):
        return bsj.h_softmax_loss(x, p, t, mask=m, **kw)

    f = (
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        if jit
        else jax.value_and_grad(loss, argnums=(0, 1))
    )
    value, (gp, gx) = f(p, x_bad, target, mask)
    ref_value, (ref_gp, ref_gx) = jax.value_and_grad(loss, argnums=(0, 1))(
        p, x[:3], target[:3], None
    )
    chex.assert_trees_all_close((value, gp), (ref_value, ref_gp), rtol=1e-12)
    chex.assert_trees_all_close(gx[:3], ref_gx, rtol=1e-12)
    np.testing.assert_array_equal(gx[3], 0.0)
    np.testing.assert_allclose(
        value, nll_ref(x[:3], *p, target[:3], C * P) if class_sizes is None else ref_value
    )

    step = jax.jit(bsj.h_softmax_sgd_step) if jit else bsj.h_softmax_sgd_step
    l_step, new, dx = step(x_bad, p, target, 0.5, mask=mask, **kw)
    l_ref, new_ref, dx_ref = bsj.h_softmax_sgd_step(x[:3], p, target[:3], 0.5, **kw)
    chex.assert_trees_all_close((l_step, new), (l_ref, new_ref), rtol=1e-12)
    chex.assert_trees_all_close(dx[:3], dx_ref, rtol=1e-12)
    np.testing.assert_array_equal(dx[3], 0.0)


def test_masked_padding_id_skips_the_padded_slot_check():
    # target 0 is a padded slot (class 0 is empty) and -1 is out of range: both masked.
    p, x = params(), xs()
    mask = jnp.array([True, True, False, False])
    for target in (jnp.array([4, 5, 0, -1]), np.array([4, 5, 2**40, -(2**40)])):
        loss = bsj.h_softmax_loss(x, p, target, mask=mask, class_sizes=SIZES)
        np.testing.assert_allclose(
            loss, bsj.h_softmax_loss(x[:2], p, target[:2], class_sizes=SIZES)
        )
    # Unmasked, the same targets are refused.
    with pytest.raises(IndexError, match=r"target holds 0 at position \(2,\), a padded slot"):
        bsj.h_softmax_loss(x, p, jnp.array([4, 5, 0, 4]), class_sizes=SIZES)


def test_non_finite_weights_of_an_unused_class_do_not_leak():
    # Class 0 holds an inf and a NaN; no target is in class 0 (one example is masked).
    p, x = params(), xs()
    bad = p._replace(W2=p.W2.at[0, 0, 0].set(jnp.inf).at[0, 1, 1].set(jnp.nan))
    bad = bad._replace(b2=bad.b2.at[0, 2].set(jnp.nan))
    target, mask = jnp.array([4, 5, 9, -1]), jnp.array([True, True, True, False])
    loss = lambda p, x: bsj.h_softmax_loss(x, p, target, mask=mask)
    value, (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1))(bad, x)
    ref_value, (ref_gp, ref_gx) = jax.value_and_grad(loss, argnums=(0, 1))(p, x)
    chex.assert_trees_all_close((value, gp, gx), (ref_value, ref_gp, ref_gx), rtol=1e-12)
    # The SGD step leaves class 0 exactly as it was and updates the rest as before.
    _, new, dx = jax.jit(bsj.h_softmax_sgd_step)(x, bad, target, 0.5, mask=mask)
    _, new_ref, dx_ref = bsj.h_softmax_sgd_step(x, p, target, 0.5, mask=mask)
    np.testing.assert_array_equal(new.W2[0], bad.W2[0])
    np.testing.assert_array_equal(new.b2[0], bad.b2[0])
    chex.assert_trees_all_close(
        (new.W2[1:], new.b2[1:], new.W1, dx),
        (new_ref.W2[1:], new_ref.b2[1:], new_ref.W1, dx_ref),
        rtol=1e-12,
    )
    # All outputs: only class 0's outputs are NaN.
    logp = bsj.h_log_softmax(x, bad)
    assert np.all(np.isnan(logp[:, :P])) and all_finite(logp[:, P:])
    np.testing.assert_allclose(logp[:, P:], bsj.h_log_softmax(x, p)[:, P:])


def test_nan_in_one_example_stays_in_that_example():
    p, x = params(), xs(6)
    bad = x.at[2].set(jnp.nan)
    keep = np.array([0, 1, 3, 4, 5])
    np.testing.assert_allclose(bsj.h_log_softmax(bad, p)[keep], bsj.h_log_softmax(x, p)[keep])
    vals, idx = bsj.h_softmax_top_k(bad, p, 4, classes_per_step=1)
    ref_vals, ref_idx = bsj.h_softmax_top_k(x, p, 4)
    np.testing.assert_array_equal(idx[keep], ref_idx[keep])
    np.testing.assert_allclose(vals[keep], ref_vals[keep])
    key = jax.random.key(3)
    s = bsj.h_softmax_sample(key, bad, p)
    np.testing.assert_array_equal(s[keep], bsj.h_softmax_sample(key, x, p)[keep])


def test_huge_logits_stay_finite():
    p = params()
    p = p._replace(W1=p.W1 * 1e6, W2=p.W2 * 1e6)
    x = xs()
    logp = bsj.h_log_softmax(x, p)
    assert not np.any(np.isnan(logp))
    np.testing.assert_allclose(jax.nn.logsumexp(logp, axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(logp, h_log_softmax_ref(x, *p, C * P), atol=1e-6, rtol=1e-9)
    assert all_finite(jax.grad(lambda p: bsj.h_softmax_loss(x, p, jnp.array([1, 4, 7, 11])))(p))


# --------------------------------------------------------------------------------------
# Integer targets: exact values, never wrapped into a real output.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, shown",
    [
        (np.array([1, 2, 3, 2**32 + 1], np.int64), 2**32 + 1),  # wraps to 1 as int32
        (np.array([1, 2, 3, 2**63 + 1], np.uint64), 2**63 + 1),
        ([1, 2, 3, 2**40], 2**40),
        ([1, 2, 3, 2**70], 2**70),
    ],
)
@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_targets_beyond_int32_are_refused_not_wrapped(target, shown, x64):
    with jax.enable_x64(x64):
        p, x = params(dtype=jnp.float32), xs(dtype=jnp.float32)
        with pytest.raises(IndexError, match=rf"target holds {shown} at position \(3,\)"):
            bsj.h_log_softmax(x, p, target)
        with pytest.raises(IndexError, match=rf"target holds {shown} at position \(\)"):
            bsj.h_softmax_loss(x[0], p, target[3])


def test_bool_and_float_targets_are_refused():
    p, x = params(), xs()
    with pytest.raises(
        TypeError, match=r"target must be an array of integer output ids; got dtype bool"
    ):
        bsj.h_log_softmax(x, p, np.array([True, False, True, True]))
    with pytest.raises(TypeError, match=r"got dtype float64"):
        bsj.h_softmax_loss(x, p, [1.0, 2.0, 3.0, 4.0])


# --------------------------------------------------------------------------------------
# Degenerate sizes.
# --------------------------------------------------------------------------------------


def test_empty_batches_give_empty_results():
    p, x, t = params(), xs(0), jnp.zeros((0,), jnp.int32)
    key = jax.random.key(0)
    assert bsj.h_log_softmax(x, p).shape == (0, C * P)
    assert bsj.h_log_softmax(x, p, t).shape == (0,)
    assert float(bsj.h_softmax_loss(x, p, t)) == 0.0
    assert bsj.h_softmax_loss(x, p, t, reduction="none").shape == (0,)
    for approximate in (False, True):
        vals, idx = bsj.h_softmax_top_k(x, p, 3, approximate=approximate)
        assert vals.shape == idx.shape == (0, 3) and idx.dtype == jnp.int32
    assert bsj.h_softmax_top_k(xs(0).reshape(0, 2, N_IN), p, 2)[1].shape == (0, 2, 2)
    assert bsj.h_softmax_sample(key, x, p).shape == (0,)
    loss, new, dx = bsj.h_softmax_sgd_step(x, p, t, 0.1)
    assert float(loss) == 0.0 and dx.shape == (0, N_IN)
    chex.assert_trees_all_equal(new, p)
    assert bsj.h_softmax(x, 0, 10, C, P, *p).shape == (0, 10)
    assert bsj.h_softmax(x, 0, 10, C, P, *p, t).shape == (0,)


def test_class_sizes_without_any_output():
    p, x = params(), xs()
    zeros = jnp.zeros((C,), jnp.int32)
    for call in (
        lambda cs: bsj.h_log_softmax(x, p, class_sizes=cs),
        lambda cs: bsj.h_softmax_sample(jax.random.key(0), x, p, class_sizes=cs),
        lambda cs: bsj.h_softmax_top_k(x, p, 1, class_sizes=cs),
    ):
        with pytest.raises(
            ValueError, match=r"class_sizes must give at least one class a real output"
        ):
            call(zeros)
    # Real outputs only past n_outputs count as none too.
    with pytest.raises(ValueError, match=r"among the first n_outputs=3 ids"):
        bsj.h_log_softmax(x, p, n_outputs=3, class_sizes=SIZES)
    # Traced: every log-probability -inf (not NaN), every loss inf, samples -1, top-k ids -1.
    logp = jax.jit(lambda cs: bsj.h_log_softmax(x, p, class_sizes=cs))(zeros)
    assert np.all(np.isneginf(logp))
    at = jax.jit(lambda cs: bsj.h_log_softmax(x, p, jnp.array([4, 5, 6, 7]), class_sizes=cs))(zeros)
    assert np.all(np.isneginf(at))
    draws = jax.jit(lambda cs: bsj.h_softmax_sample(jax.random.key(0), x, p, class_sizes=cs))(zeros)
    np.testing.assert_array_equal(draws, -1)
    for approximate in (False, True):
        vals, idx = jax.jit(
            lambda cs, a=approximate: bsj.h_softmax_top_k(x, p, 2, class_sizes=cs, approximate=a)
        )(zeros)
        assert np.all(np.isneginf(vals))
        np.testing.assert_array_equal(idx, -1)


def test_top_k_beyond_the_real_outputs_under_jit_gives_minus_one():
    p, x = params(), xs()
    sizes = jnp.array([0, 1, 0, 1], jnp.int32)  # two real outputs: 3 and 9
    vals, idx = jax.jit(lambda cs: bsj.h_softmax_top_k(x, p, 4, class_sizes=cs))(sizes)
    np.testing.assert_array_equal(np.sort(idx[:, :2], axis=1), np.tile([3, 9], (4, 1)))
    np.testing.assert_array_equal(idx[:, 2:], -1)
    assert np.all(np.isneginf(vals[:, 2:])) and all_finite(vals[:, :2])


def test_class_sizes_out_of_range_under_jit_are_clipped():
    p, x = params(), xs()
    traced = jax.jit(lambda cs: bsj.h_log_softmax(x, p, class_sizes=cs))
    np.testing.assert_allclose(
        traced(jnp.array([-5, 3, 2, 99], jnp.int32)),
        bsj.h_log_softmax(x, p, class_sizes=jnp.array([0, 3, 2, 3])),
    )
    np.testing.assert_allclose(
        traced(jnp.array([0, 3, 2, 200], jnp.uint8)),
        bsj.h_log_softmax(x, p, class_sizes=jnp.array([0, 3, 2, 3])),
    )
    with pytest.raises(TypeError, match=r"class_sizes must be an integer array"):
        jax.jit(lambda cs: bsj.h_log_softmax(x, p, class_sizes=cs))(jnp.ones(C))
    with pytest.raises(TypeError, match=r"class_sizes must be an integer array"):
        bsj.h_log_softmax(x, p, class_sizes=jnp.ones(C, bool))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, bool, jnp.complex64, "int64"])
def test_init_refuses_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match=r"dtype must be a float dtype .*; got"):
        bsj.h_softmax_init(jax.random.key(0), 8, 10, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n_in=float("inf")), ValueError, r"n_in must be a whole number \(an int\); got inf"),
        (dict(n_in=2.5), ValueError, r"n_in must be a whole number \(an int\); got 2.5"),
        (dict(n_outputs=float("nan")), ValueError, r"n_outputs must be a whole number .*got nan"),
        (dict(n_classes=float("nan")), ValueError, r"n_classes must be a whole number .*got nan"),
        (dict(n_classes=0), ValueError, r"n_classes must be an int >= 1; got 0"),
        (dict(n_classes=11), ValueError, r"n_classes must be an int in \[1, n_outputs\]"),
        (dict(n_in=True), TypeError, r"n_in must be an int; got bool True"),
        (dict(n_outputs="10"), TypeError, r"n_outputs must be an int; got str '10'"),
    ],
)
def test_init_refuses_bad_sizes_naming_them(kwargs, error, match):
    args = dict(n_in=8, n_outputs=10) | kwargs
    n_in, n_outputs = args.pop("n_in"), args.pop("n_outputs")
    with pytest.raises(error, match=match):
        bsj.h_softmax_init(jax.random.key(0), n_in, n_outputs, **args)
    assert [a.shape for a in bsj.h_softmax_init(jax.random.key(0), 8.0, 10.0)][0] == (8, 4)


def test_frequency_classes_refuses_bad_sizes():
    counts = np.arange(10, 0, -1)
    with pytest.raises(ValueError, match=r"n_classes must be a whole number .*got nan"):
        bsj.frequency_classes(counts, float("nan"))
    with pytest.raises(ValueError, match=r"max_class_size must be a whole number .*got inf"):
        bsj.frequency_classes(counts, 3, max_class_size=float("inf"))


# --------------------------------------------------------------------------------------
# Static arguments: optional n_outputs, and what a traced one says.
# --------------------------------------------------------------------------------------


def test_n_outputs_defaults_to_the_parameters_grid_and_jits_plainly():
    p, x, t = params(), xs(), jnp.array([1, 4, 7, 11])
    np.testing.assert_allclose(jax.jit(bsj.h_softmax_loss)(x, p, t), nll_ref(x, *p, t, C * P))
    np.testing.assert_allclose(bsj.h_log_softmax(x, p), bsj.h_log_softmax(x, p, n_outputs=C * P))
    loss, _, _ = jax.jit(bsj.h_softmax_sgd_step)(x, p, t, 0.1)
    np.testing.assert_allclose(loss, nll_ref(x, *p, t, C * P))
    # With a layout: the layout's n_outputs.
    layout = bsj.frequency_classes(np.arange(10, 0, -1), C)
    lp = bsj.h_softmax_init(jax.random.key(0), N_IN, layout.n_outputs, n_classes=C)
    np.testing.assert_allclose(
        bsj.h_log_softmax(x, lp, class_sizes=layout.class_sizes),
        bsj.h_log_softmax(x, lp, n_outputs=layout.n_outputs, class_sizes=layout.class_sizes),
    )


@pytest.mark.parametrize(
    "call, name",
    [
        (
            lambda x, p, n: bsj.h_softmax_loss(x, p, jnp.zeros(4, jnp.int32), n_outputs=n),
            "n_outputs",
        ),
        (lambda x, p, n: bsj.h_log_softmax(x, p, n_outputs=n), "n_outputs"),
        (lambda x, p, n: bsj.h_softmax_top_k(x, p, n), "k"),
        (
            lambda x, p, n: bsj.h_softmax_top_k(x, p, 1, approximate=True, n_best_classes=n),
            "n_best_classes",
        ),
        (lambda x, p, n: bsj.h_softmax(x, 4, n, C, P, *p), "n_outputs"),
        (lambda x, p, n: bsj.h_softmax(x, n + 1, 12, C, P, *p), "batch_size"),
    ],
)
def test_traced_static_argument_says_how_to_mark_it_static(call, name):
    with pytest.raises(
        TypeError,
        match=rf"{name} must be a Python int, fixed at trace time; got a "
        rf"traced value .*jax.jit\(f, static_argnames='{name}'\)",
    ):
        jax.jit(call)(xs(), params(), 3)
    assert call(xs(), params(), 3) is not None  # the same call with a Python int works


# --------------------------------------------------------------------------------------
# Leading batch dimensions.
# --------------------------------------------------------------------------------------


def test_leading_batch_dimensions():
    p, x = params(), xs(6)
    t = jnp.array([1, 4, 7, 11, 5, 3])
    mask = jnp.array([True, False, True, True, True, False])
    x3, t3, m3 = x.reshape(2, 3, N_IN), t.reshape(2, 3), mask.reshape(2, 3)
    np.testing.assert_allclose(bsj.h_log_softmax(x3, p), bsj.h_log_softmax(x, p).reshape(2, 3, -1))
    np.testing.assert_allclose(
        bsj.h_log_softmax(x3, p, t3), bsj.h_log_softmax(x, p, t).reshape(2, 3)
    )
    np.testing.assert_allclose(
        bsj.h_log_softmax(x3, p, t3[..., None]), bsj.h_log_softmax(x3, p, t3)
    )
    for reduction in ("mean", "sum"):
        np.testing.assert_allclose(
            bsj.h_softmax_loss(x3, p, t3, mask=m3, reduction=reduction),
            nll_ref(x, *p, t, C * P, mask=mask, reduction=reduction),
        )
    none = bsj.h_softmax_loss(x3, p, t3, mask=m3, reduction="none")
    np.testing.assert_allclose(
        none, bsj.h_softmax_loss(x, p, t, mask=mask, reduction="none").reshape(2, 3)
    )
    loss, new, dx = bsj.h_softmax_sgd_step(x3, p, t3, 0.1, mask=m3)
    loss_ref, new_ref, dx_ref = bsj.h_softmax_sgd_step(x, p, t, 0.1, mask=mask)
    chex.assert_trees_all_close((loss, new, dx), (loss_ref, new_ref, dx_ref.reshape(2, 3, N_IN)))
    vals, idx = bsj.h_softmax_top_k(x3, p, 2)
    ref_vals, ref_idx = bsj.h_softmax_top_k(x, p, 2)
    np.testing.assert_array_equal(idx, ref_idx.reshape(2, 3, 2))
    np.testing.assert_allclose(vals, ref_vals.reshape(2, 3, 2))
    key = jax.random.key(0)
    np.testing.assert_array_equal(
        bsj.h_softmax_sample(key, x3, p), bsj.h_softmax_sample(key, x, p).reshape(2, 3)
    )
    with pytest.raises(ValueError, match=r"target must have shape x.shape\[:-1\] = \(2, 3\)"):
        bsj.h_log_softmax(x3, p, t)
    with pytest.raises(ValueError, match=r"mask must have shape x.shape\[:-1\] = \(2, 3\)"):
        bsj.h_softmax_loss(x3, p, t3, mask=mask)


# --------------------------------------------------------------------------------------
# Differentiation: reverse mode (and reverse of reverse); forward mode is refused.
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_jacrev_and_second_derivatives_match_the_reference():
    p, x, t = params(), xs(2), jnp.array([4, 10])
    f = lambda x: bsj.h_log_softmax(x, p, t, class_sizes=SIZES)

    def ref(x):  # the same formula from dense softmaxes (jax.nn, no block-sparse op)
        logits = x @ p.W1 + p.b1[None]
        logits = jnp.where(SIZES[None] > 0, logits, -jnp.inf)
        act = jnp.einsum("bs,cst->bct", x, p.W2) + p.b2[None]
        ok = jnp.arange(P, dtype=jnp.int32)[None, :] < SIZES[:, None]
        lp = jax.nn.log_softmax(logits)[:, :, None] + jax.nn.log_softmax(
            jnp.where(ok[None], act, -jnp.inf), axis=-1
        )
        return lp.reshape(2, -1)[jnp.arange(2), t]

    np.testing.assert_allclose(f(x), ref(x), rtol=1e-12)
    np.testing.assert_allclose(jax.jacrev(f)(x), jax.jacrev(ref)(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        jax.jacrev(jax.jacrev(f))(x), jax.jacrev(jax.jacrev(ref))(x), rtol=1e-9, atol=1e-12
    )
    for forward in (
        lambda: jax.jvp(f, (x,), (x,)),
        lambda: jax.jacfwd(f)(x),
        lambda: jax.hessian(f)(x),
    ):
        with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
            forward()


# --------------------------------------------------------------------------------------
# Parallel: refuses exactly what one device refuses.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh14():
    return jax.make_mesh((1, 4), ("data", "model"))


@pytest.mark.slow
def test_parallel_refuses_what_one_device_refuses(mesh14):
    p3 = bsj.h_softmax_init(jax.random.key(0), N_IN, 9, n_classes=3, dtype=jnp.float64)  # 3 x 3
    sharded = parallel.shard_params(p3, mesh14)  # padded to 4 classes
    assert sharded.W1.shape == (N_IN, 4) and sharded.n_real_classes == 3
    x, t = xs(4), jnp.array([0, 4, 8, 2])
    for kw, error, match in (
        (dict(n_outputs=10), ValueError, r"n_outputs must be in .* = \[1, 9\] .*got n_outputs=10"),
        (
            dict(class_sizes=jnp.array([3, 3, 3, 0])),
            ValueError,
            r"class_sizes must have shape \(n_classes,\) = \(3,\)",
        ),
        (dict(class_sizes=jnp.array([3, 3])), ValueError, r"class_sizes must have shape"),
    ):
        with pytest.raises(error, match=match):
            bsj.h_softmax_loss(x, p3, t, **kw)
        with pytest.raises(error, match=match):
            parallel.h_softmax_loss(x, sharded, t, mesh=mesh14, **kw)
    # The default n_outputs is the real one: probability only for real outputs.
    logp = parallel.h_log_softmax(x, sharded, mesh=mesh14)
    assert logp.shape == (4, 9)
    np.testing.assert_allclose(logp, bsj.h_log_softmax(x, p3), rtol=1e-12)
    np.testing.assert_allclose(
        parallel.h_softmax_loss(x, sharded, t, mesh=mesh14, class_sizes=jnp.array([3, 2, 3])),
        bsj.h_softmax_loss(x, p3, t, class_sizes=jnp.array([3, 2, 3])),
        rtol=1e-12,
    )
    # The record survives differentiation and tree maps (an optimizer's update).
    grads = jax.jit(jax.grad(lambda q: parallel.h_softmax_loss(x, q, t, mesh=mesh14)))(sharded)
    updated = jax.jit(lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g))(sharded, grads)
    assert type(updated) is parallel.ShardedHSoftmaxParams and updated.n_real_classes == 3
    with pytest.raises(ValueError, match=r"n_outputs must be in .* = \[1, 9\]"):
        parallel.h_log_softmax(x, updated, n_outputs=12, mesh=mesh14)


def test_parallel_masked_nan_example_and_leading_dims(mesh14):
    p = params()
    sharded = parallel.shard_params(p, mesh14)
    x = xs().at[3].set(jnp.nan)
    target, mask = jnp.array([4, 5, 9, -1]), jnp.array([True, True, True, False])
    loss = lambda q, x: parallel.h_softmax_loss(
        x, q, target, mask=mask, class_sizes=SIZES, mesh=mesh14
    )
    value, (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(sharded, x)
    ref = lambda q, x: bsj.h_softmax_loss(x, q, target[:3], class_sizes=SIZES)
    ref_value, (ref_gp, ref_gx) = jax.value_and_grad(ref, argnums=(0, 1))(p, x[:3])
    chex.assert_trees_all_close((value, tuple(gp)), (ref_value, tuple(ref_gp)), rtol=1e-12)
    chex.assert_trees_all_close(gx[:3], ref_gx, rtol=1e-12)
    np.testing.assert_array_equal(gx[3], 0.0)
    x3 = xs(4).reshape(2, 2, N_IN)
    np.testing.assert_allclose(
        parallel.h_log_softmax(x3, sharded, mesh=mesh14), bsj.h_log_softmax(x3, p), rtol=1e-12
    )
    np.testing.assert_allclose(
        parallel.h_softmax_loss(
            x3, sharded, target.reshape(2, 2) % 12, mesh=mesh14, reduction="none"
        ),
        bsj.h_softmax_loss(x3, p, target.reshape(2, 2) % 12, reduction="none"),
        rtol=1e-12,
    )


# --------------------------------------------------------------------------------------
# Layouts under jit.
# --------------------------------------------------------------------------------------


def test_layout_lookups_work_under_jit():
    counts = np.array([50, 20, 10, 8, 5, 4, 2, 1])
    layout = bsj.frequency_classes(counts, 3)
    words = jnp.array([[0, 7], [3, -1]])
    out = jax.jit(layout.to_output)(words)
    np.testing.assert_array_equal(out[0], layout.word_to_output[[0, 7]])
    np.testing.assert_array_equal(out[1], [layout.word_to_output[3], -1])
    np.testing.assert_array_equal(jax.jit(layout.to_output)(jnp.array([8, 2**31 - 1])), [-1, -1])
    back = jax.jit(layout.to_word)(jnp.arange(-1, layout.n_outputs + 1))
    np.testing.assert_array_equal(back[1:-1], layout.output_to_word)
    np.testing.assert_array_equal(back[jnp.array([0, -1])], [-1, -1])
    with pytest.raises(TypeError, match=r"word_ids must be an integer array"):
        layout.to_output(jnp.array([1.0]))
    # Host ids beyond int32 are out of range, never wrapped into a word (x64 off or on).
    for x64 in (False, True):
        with jax.enable_x64(x64):
            huge = np.array([2**32 + 3, 3], np.int64)
            np.testing.assert_array_equal(layout.to_output(huge), [-1, layout.word_to_output[3]])
            np.testing.assert_array_equal(
                layout.to_output([2**70, 3]), [-1, layout.word_to_output[3]]
            )

    # The documented loop: word ids in, padding (-1) masked.
    p = bsj.h_softmax_init(jax.random.key(0), N_IN, layout.n_outputs, n_classes=layout.n_classes)

    @jax.jit
    def loss_fn(p, x, word_ids):
        t = layout.to_output(word_ids)
        return bsj.h_softmax_loss(x, p, t, mask=word_ids >= 0, class_sizes=layout.class_sizes)

    x = xs(4, dtype=jnp.float32)
    value = loss_fn(p, x, jnp.array([0, 7, 3, -1]))
    ref = bsj.h_softmax_loss(
        x[:3], p, layout.word_to_output[[0, 7, 3]], class_sizes=layout.class_sizes
    )
    np.testing.assert_allclose(value, ref, rtol=1e-6)
