"""The adaptive softmax against PyTorch's AdaptiveLogSoftmaxWithLoss and brute-force references."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from blocksparse_jax import (
    AdaptiveSoftmaxParams,
    adaptive_log_softmax,
    adaptive_softmax_cutoffs,
    adaptive_softmax_from_torch,
    adaptive_softmax_init,
    adaptive_softmax_loss,
    adaptive_softmax_predict,
    adaptive_softmax_to_torch,
    adaptive_softmax_top_k,
)
from blocksparse_jax.adaptive import _buckets, _decode
from tests.adaptive_reference import adaptive_log_softmax_ref, cutoff_cost, nll_ref

TORCH_REASON = "PyTorch (the [bench] extra) is needed to compare with nn.AdaptiveLogSoftmaxWithLoss"

# name: (n_in, n_outputs, cutoffs, div_value, head_bias)
CASES = {
    "one_cluster": (12, 30, [10], 2.0, False),
    "three_clusters_head_bias": (16, 60, [6, 20, 40], 2.0, True),
    "two_clusters_div4": (16, 50, [5, 25], 4.0, False),
}
BATCH = 20


def np64(a):
    return np.asarray(a, np.float64)


def make_params(case, dtype=jnp.float64, *, seed=0, scale=0.6):
    """Random (not initial) weights of the shapes of ``case``: every cluster gets real mass."""
    n_in, n_outputs, cutoffs, div_value, head_bias = CASES[case]
    shapes = jax.eval_shape(
        lambda: adaptive_softmax_init(
            jax.random.key(0), n_in, n_outputs, cutoffs, div_value=div_value, head_bias=head_bias
        )
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), dtype), shapes)


def make_x(case, batch=BATCH, dtype=jnp.float64, *, seed=1, scale=1.5):
    n_in = CASES[case][0]
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal((batch, n_in)), dtype)


def make_target(case, batch=BATCH, *, seed=2):
    """Half the targets in the shortlist, half anywhere: every cluster is hit."""
    _, n_outputs, cutoffs, _, _ = CASES[case]
    rng = np.random.default_rng(seed)
    t = np.where(
        np.arange(batch) % 2 == 0,
        rng.integers(0, cutoffs[0], batch),
        rng.integers(cutoffs[0], n_outputs, batch),
    )
    return jnp.asarray(t, jnp.int32)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows: clusters span several chunks, the last one partial, some empty."""
    monkeypatch.setattr(_buckets, "_CHUNK_ROWS", 3)


# --------------------------------------------------------------------------------------
# Against PyTorch
# --------------------------------------------------------------------------------------


def _torch_module(torch, case, params):
    n_in, n_outputs, cutoffs, div_value, head_bias = CASES[case]
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(
        n_in, n_outputs, cutoffs, div_value=div_value, head_bias=head_bias, dtype=torch.float64
    )
    state = {k: torch.from_numpy(np.array(v)) for k, v in adaptive_softmax_to_torch(params).items()}
    module.load_state_dict(state)
    return module


def _state(module, grads=False):
    return {
        k: (p.grad if grads else p).detach().numpy().copy() for k, p in module.named_parameters()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, monkeypatch):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    if case == "three_clusters_head_bias":  # clusters in several chunks of 3 rows
        monkeypatch.setattr(_buckets, "_CHUNK_ROWS", 3)
    module = _torch_module(torch, case, make_params(case))
    # The weights go the documented way: torch -> NumPy -> adaptive_softmax_from_torch.
    params = adaptive_softmax_from_torch(_state(module))
    assert (params.head_b is not None) == CASES[case][4]
    x, t = make_x(case), make_target(case)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    output, loss = module(xt, torch.tensor(np.asarray(t), dtype=torch.long))
    loss.backward()

    # One jit for every output (one compilation).
    full, at_target, mean, predicted, (gx, gp) = jax.jit(
        lambda x, p, t: (
            adaptive_log_softmax(x, p),
            adaptive_log_softmax(x, p, t),
            adaptive_softmax_loss(x, p, t),
            adaptive_softmax_predict(x, p),
            jax.grad(adaptive_softmax_loss, argnums=(0, 1))(x, p, t),
        )
    )(x, params, t)
    ref = module.log_prob(xt).detach().numpy()
    np.testing.assert_allclose(np64(full), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np64(at_target), output.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(float(mean), loss.item(), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(predicted), module.predict(xt).numpy())
    # Some predictions come from a tail cluster: predict's search was exercised.
    assert np.any(np.asarray(predicted) >= CASES[case][2][0])
    np.testing.assert_allclose(np64(gx), xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    torch_grads = adaptive_softmax_from_torch(_state(module, grads=True))
    chex.assert_trees_all_close(gp, torch_grads, rtol=1e-10, atol=1e-14)


def test_one_example_matches_torch():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    case = "three_clusters_head_bias"
    params = make_params(case)
    module = _torch_module(torch, case, params)
    x, t = make_x(case), make_target(case)
    for b in (0, 1, 5):
        out, loss = module(torch.tensor(np.asarray(x[b])), torch.tensor(int(t[b])))
        assert adaptive_log_softmax(x[b], params, t[b]).shape == ()
        np.testing.assert_allclose(float(adaptive_log_softmax(x[b], params, t[b])), out.item())
        np.testing.assert_allclose(float(adaptive_softmax_loss(x[b], params, t[b])), loss.item())


def test_torch_round_trip_and_errors():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    module = torch.nn.AdaptiveLogSoftmaxWithLoss(8, 40, [5, 15], div_value=2.0, head_bias=True)
    state = {f"decoder.{k}": v.numpy() for k, v in module.state_dict().items()}
    state["encoder.weight"] = np.zeros((3, 3), np.float32)  # outside the prefix: ignored
    params = adaptive_softmax_from_torch(state, prefix="decoder.")
    assert params.head_W.dtype == jnp.float32 and params.cutoffs == (5, 15)
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    ref = module.log_prob(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(adaptive_log_softmax(x, params)), ref, atol=1e-5)
    back = adaptive_softmax_to_torch(params)
    assert sorted(back) == sorted(k for k, _ in module.named_parameters())
    for k, p in module.named_parameters():
        np.testing.assert_array_equal(back[k], p.detach().numpy())

    plain = {k[len("decoder.") :]: v for k, v in state.items() if k.startswith("decoder.")}
    with pytest.raises(ValueError, match="unexpected key 'encoder.weight'"):
        adaptive_softmax_from_torch({**plain, "encoder.weight": state["encoder.weight"]})
    with pytest.raises(KeyError, match=r"no 'head.weight'"):
        adaptive_softmax_from_torch({k: v for k, v in plain.items() if k != "head.weight"})
    with pytest.raises(KeyError, match=r"no tail.1.1.weight"):
        adaptive_softmax_from_torch({k: v for k, v in plain.items() if k != "tail.1.1.weight"})
    with pytest.raises(ValueError, match=r"tail_out\[0\] must have shape \(d_0, cluster_size_0\)"):
        adaptive_softmax_from_torch({**plain, "tail.0.1.weight": np.zeros((10, 3), np.float32)})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        adaptive_softmax_from_torch([("head.weight", plain["head.weight"])])


# --------------------------------------------------------------------------------------
# Values and gradients against the brute-force reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_log_softmax_matches_reference(case):
    params, x, t = make_params(case), make_x(case), make_target(case)
    ref = adaptive_log_softmax_ref(x, *params)
    full, at_target = jax.jit(
        lambda x, p, t: (adaptive_log_softmax(x, p), adaptive_log_softmax(x, p, t))
    )(x, params, t)
    chex.assert_shape(full, (BATCH, CASES[case][1]))
    np.testing.assert_allclose(np64(full), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.exp(np64(full)).sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np64(at_target), ref[np.arange(BATCH), t], rtol=1e-12)


def test_transformed_loss_and_mask(transform, small_chunks):
    case = "three_clusters_head_bias"
    params, x = make_params(case), make_x(case)
    t = np.asarray(make_target(case)).copy()
    mask = np.arange(BATCH) % 3 != 1
    t[~mask] = -1  # padding tokens: ignored
    f = lambda x, p, t, m: {
        r: adaptive_softmax_loss(x, p, t, mask=m, reduction=r) for r in ("mean", "none")
    }
    out = transform(f)(x, params, jnp.asarray(t), jnp.asarray(mask))
    safe = np.where(mask, t, 0)
    for reduction in ("mean", "none"):
        ref = nll_ref(x, params, safe, mask, reduction)
        np.testing.assert_allclose(np64(out[reduction]), ref, rtol=1e-12)


def test_gradient_equals_dense_gradient(small_chunks):
    """The chunked custom VJP against autodiff of the dense path (every output computed)."""
    case = "three_clusters_head_bias"
    params, x, t = make_params(case), make_x(case), make_target(case)
    mask = jnp.asarray(np.arange(BATCH) != 3)
    grad = jax.jit(jax.grad(adaptive_softmax_loss, argnums=(0, 1)))
    sparse = grad(x, params, t, mask=mask)

    def dense_loss(x, p):
        logp = jnp.take_along_axis(adaptive_log_softmax(x, p), t[:, None], axis=1)[:, 0]
        return -jnp.sum(jnp.where(mask, logp, 0.0)) / jnp.sum(mask).astype(logp.dtype)

    dense = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(x, params)
    chex.assert_trees_all_close(sparse, dense, rtol=1e-11, atol=1e-13)
    # A cluster without targets gets exactly zero gradient.
    t_head = jnp.asarray(np.arange(BATCH) % CASES[case][2][0], jnp.int32)
    _, g = grad(x, params, t_head, mask=mask)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in (*g.tail_proj, *g.tail_out))


def test_check_grads_order_2(small_chunks):
    case = "one_cluster"
    params, x, t = make_params(case, scale=0.4), make_x(case, batch=7), make_target(case, 7)
    loss = jax.jit(lambda x, p: adaptive_softmax_loss(x, p, t))
    check_grads(loss, (x, params), order=2, modes=["rev"])


def test_jacrev_twice_matches_dense():
    """Reverse over reverse: the Hessian with respect to x, against the dense path's.

    One chunk per cluster here; test_check_grads_order_2 covers several.
    """
    case = "two_clusters_div4"
    params, x, t = make_params(case), make_x(case, batch=5), make_target(case, 5)

    def dense(x):
        return -jnp.mean(jnp.take_along_axis(adaptive_log_softmax(x, params), t[:, None], axis=1))

    h = jax.jit(jax.jacrev(jax.jacrev(lambda x: adaptive_softmax_loss(x, params, t))))(x)
    ref = jax.jit(jax.jacrev(jax.jacrev(dense)))(x)
    chex.assert_shape(h, (*x.shape, *x.shape))
    assert float(jnp.abs(ref).max()) > 1e-3
    np.testing.assert_allclose(np64(h), np64(ref), rtol=1e-10, atol=1e-12)


def test_per_example_gradients_with_vmap():
    case = "two_clusters_div4"
    params, x, t = make_params(case), make_x(case, batch=6), make_target(case, 6)
    one = lambda p, x, t: adaptive_softmax_loss(x, p, t)  # x (n_in,), t ()
    per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))(params, x, t)
    batch_of_one = jax.jit(jax.grad(one))
    for b in range(6):
        g = batch_of_one(params, x[b : b + 1], t[b : b + 1])
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, b=b: a[b], per_example), g, rtol=1e-12, atol=1e-15
        )


def test_masked_example_is_free():
    """A masked example's NaN input reaches neither the loss nor any gradient."""
    case = "three_clusters_head_bias"
    params, x, t = make_params(case), make_x(case), make_target(case)
    mask = np.ones(BATCH, bool)
    mask[[4, 7]] = False
    x_nan = np.array(x)
    x_nan[4], x_nan[7] = np.nan, np.inf
    t_bad = np.array(t)
    t_bad[4], t_bad[7] = -1, 10**6
    value_and_grad = jax.jit(jax.value_and_grad(adaptive_softmax_loss, argnums=(0, 1)))
    loss, (gx, gp) = value_and_grad(x_nan, params, t_bad, mask=jnp.asarray(mask))
    # The reference: the same call with clean inputs in the masked rows.
    ref_loss, (ref_gx, ref_gp) = value_and_grad(x, params, t, mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(ref_loss), nll_ref(x, params, t, mask), rtol=1e-12)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-12)
    np.testing.assert_array_equal(np64(gx)[~mask], 0.0)
    np.testing.assert_allclose(np64(gx), np64(ref_gx), rtol=1e-12)
    chex.assert_trees_all_close(gp, ref_gp, rtol=1e-12, atol=1e-15)
    total = adaptive_softmax_loss(x_nan, params, t_bad, mask=jnp.asarray(mask), reduction="sum")
    np.testing.assert_allclose(float(total), nll_ref(x, params, t, mask, "sum"), rtol=1e-12)
    nothing, (gx, gp) = value_and_grad(x_nan, params, t_bad, mask=jnp.zeros(BATCH, bool))
    assert float(nothing) == 0.0
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves((gx, gp)))


def test_large_logits_stay_finite():
    case = "three_clusters_head_bias"
    params = jax.tree.map(lambda a: 300.0 * a, make_params(case))
    x, t = make_x(case), make_target(case)
    full, g = jax.jit(
        lambda x, p: (adaptive_log_softmax(x, p), jax.grad(adaptive_softmax_loss, 1)(x, p, t))
    )(x, params)
    full = np64(full)
    assert np.all(np.isfinite(full)) and full.min() < -1e4
    np.testing.assert_allclose(np.exp(full).sum(axis=1), 1.0, rtol=1e-12)
    assert all(np.all(np.isfinite(np64(a))) for a in jax.tree.leaves(g))


def test_low_precision_accumulates_in_float32():
    dtype, atol = jnp.bfloat16, 0.15  # float16 takes the same path
    case = "three_clusters_head_bias"
    params64, x64, t = make_params(case, scale=0.3), make_x(case, scale=1.0), make_target(case)
    params = jax.tree.map(lambda a: a.astype(dtype), params64)
    x = x64.astype(dtype)
    full, (loss, g) = jax.jit(
        lambda x, p: (
            adaptive_log_softmax(x, p),
            jax.value_and_grad(adaptive_softmax_loss, argnums=(0, 1))(x, p, t),
        )
    )(x, params)
    assert full.dtype == loss.dtype == jnp.float32
    # Against float64 on the rounded inputs: the tail's projection is rounded to the
    # inputs' dtype (as a layer of that dtype would), the rest accumulates in float32.
    ref_rounded = adaptive_log_softmax_ref(x, *params)
    np.testing.assert_allclose(np64(full), ref_rounded, atol=atol / 10)
    np.testing.assert_allclose(np64(full), adaptive_log_softmax_ref(x64, *params64), atol=atol)
    np.testing.assert_allclose(np.exp(np64(full)).sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(loss), -ref_rounded[np.arange(BATCH), t].mean(), rtol=1e-4)
    assert all(a.dtype == dtype for a in jax.tree.leaves(g))
    # The gradient against float64 on the rounded inputs.
    up = lambda a: a.astype(jnp.float64)
    ref_g = jax.jit(jax.grad(adaptive_softmax_loss, argnums=(0, 1)))(
        up(x), jax.tree.map(up, params), t
    )
    chex.assert_trees_all_close(jax.tree.map(up, g), ref_g, atol=atol / 10, rtol=0.05)


def test_jitted_training_step_compiles_once():
    params = adaptive_softmax_init(jax.random.key(0), 8, 40, [4, 12, 24], div_value=2.0)
    opt = optax.sgd(0.5, momentum=0.9)
    state = opt.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x, t, mask):
        loss, g = jax.value_and_grad(adaptive_softmax_loss, argnums=1)(x, params, t, mask=mask)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 40, 16), jnp.int32)
    losses = []
    for i in range(20):
        mask = jnp.asarray(np.arange(16) != i % 16)
        params, state, loss = step(params, state, x, t, mask)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_loss_never_builds_a_cluster_for_the_whole_batch():
    """XLA's temp memory of the gradient stays far below one (batch, cluster) array."""
    batch, n_in, n_outputs = 128, 16, 400_000
    params = jax.eval_shape(
        lambda: adaptive_softmax_init(jax.random.key(0), n_in, n_outputs, [100, 2000])
    )
    x = jax.ShapeDtypeStruct((batch, n_in), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    grad = jax.grad(lambda p, x: adaptive_softmax_loss(x, p, t), argnums=(0, 1))
    temp = jax.jit(grad).lower(params, x).compile().memory_analysis().temp_size_in_bytes
    one_cluster = batch * (n_outputs - 2000) * 4
    assert temp < one_cluster / 4, (temp, one_cluster)
    search = lambda p, x: adaptive_softmax_top_k(x, p, 5)
    temp = jax.jit(search).lower(params, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < one_cluster / 4, (temp, one_cluster)


# --------------------------------------------------------------------------------------
# Out-of-range targets and bad input
# --------------------------------------------------------------------------------------


def _log(x, p, t):
    return adaptive_log_softmax(x, p, t)


def _loss(x, p, t):
    return adaptive_softmax_loss(x, p, t, reduction="none")


@pytest.mark.parametrize("fn", [_log, _loss])
@pytest.mark.parametrize("bad", [60, 61, -1, 2**40])
def test_target_out_of_range_eager(fn, bad):
    case = "three_clusters_head_bias"
    t = np.asarray(make_target(case), np.int64).copy()
    t[2] = bad
    with pytest.raises(IndexError, match=rf"target holds {bad} at position \(2,\).*n_outputs=60"):
        fn(make_x(case), make_params(case), jnp.asarray(t))


@pytest.mark.parametrize("fn, fill", [(_log, -np.inf), (_loss, np.inf)])
def test_target_out_of_range_under_jit(fn, fill):
    """Documented: ``-inf`` log-probability (``inf`` loss), no gradient, checkify reports it."""
    case = "three_clusters_head_bias"
    x, p = make_x(case), make_params(case)
    t = make_target(case)
    checked = checkify.checkify(jax.jit(fn), errors=checkify.index_checks)
    err, ref = checked(x, p, t)
    assert err.get() is None
    err, out = checked(x, p, t.at[2].set(60))
    assert "index 60 is out of bounds" in err.get()
    assert np64(out)[2] == fill
    np.testing.assert_allclose(np.delete(np64(out), 2), np.delete(np64(ref), 2), rtol=1e-12)
    err, _ = checked(x, p, t.at[2].set(-3))
    assert "index -3 is out of bounds" in err.get()
    if fn is _loss:  # the mean is inf; the gradient ignores the bad example
        value_and_grad = jax.jit(jax.value_and_grad(lambda x, t: adaptive_softmax_loss(x, p, t)))
        (bad, g_bad), (_, g_ok) = value_and_grad(x, t.at[2].set(60)), value_and_grad(x, t)
        assert float(bad) == np.inf
        np.testing.assert_array_equal(np64(g_bad)[2], 0.0)
        # The mean's denominator still counts the bad example.
        np.testing.assert_allclose(np.delete(np64(g_bad), 2, 0), np.delete(np64(g_ok), 2, 0))


def _replace(p, **kw):
    return p._replace(**kw)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda p: p[:3], TypeError, "params must be an AdaptiveSoftmaxParams"),
        (
            lambda p: _replace(p, head_W=p.head_W[0]),
            ValueError,
            r"head_W must be 2-D \(n_in, shortlist \+ n_clusters\); got shape \(9,\)",
        ),
        (
            lambda p: _replace(p, head_W=p.head_W.astype(jnp.int32)),
            TypeError,
            "head_W must have a floating dtype",
        ),
        (
            lambda p: _replace(p, head_b=p.head_b[:-1]),
            ValueError,
            r"head_b must have shape \(shortlist \+ n_clusters,\) = \(9,\)",
        ),
        (
            lambda p: _replace(p, tail_out=p.tail_out[:2]),
            ValueError,
            "tail_proj and tail_out must hold one array per tail cluster each; got 3 and 2",
        ),
        (
            lambda p: _replace(p, tail_proj=(), tail_out=()),
            ValueError,
            "at least one tail cluster",
        ),
        (
            lambda p: _replace(p, tail_proj=list(p.tail_proj[:1]) * 9, tail_out=p.tail_out[:1] * 9),
            ValueError,
            r"head_W must have shape \(n_in, shortlist \+ n_clusters\) with a shortlist of at least 1",
        ),
        (
            lambda p: _replace(p, tail_proj=(p.tail_proj[0][:3], *p.tail_proj[1:])),
            ValueError,
            r"tail_proj\[0\] must have shape \(n_in, d_0\) with n_in=16 .*got shape \(3, 8\)",
        ),
        (
            lambda p: _replace(p, tail_out=(p.tail_out[0], p.tail_out[1][:2], p.tail_out[2])),
            ValueError,
            r"tail_out\[1\] must have shape \(d_1, cluster_size_1\) with d_1=4",
        ),
        (lambda p: _replace(p, tail_out=p.tail_out[0]), TypeError, "tail_out must be a tuple"),
    ],
)
def test_bad_params(change, error, match):
    case = "three_clusters_head_bias"
    with pytest.raises(error, match=match):
        adaptive_log_softmax(make_x(case), change(make_params(case)))


def test_bad_inputs():
    case = "three_clusters_head_bias"
    p, x, t = make_params(case), make_x(case), make_target(case)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, n_in\) with n_in=16"):
        adaptive_softmax_loss(x[:, :3], p, t)
    with pytest.raises(ValueError, match=r"x must be 2-D \(batch, n_in\) or, for one example"):
        adaptive_log_softmax(x[None], p)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        adaptive_softmax_predict(x.astype(jnp.int32), p)
    with pytest.raises(ValueError, match=r"target must have shape \(batch,\) or \(batch, 1\)"):
        adaptive_softmax_loss(x, p, t[:5])
    with pytest.raises(ValueError, match=r"target must be a scalar .* for a 1-D x"):
        adaptive_log_softmax(x[0], p, t)
    with pytest.raises(TypeError, match="target must be an array of integer"):
        adaptive_softmax_loss(x, p, t.astype(jnp.float32))
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'; got 'max'"):
        adaptive_softmax_loss(x, p, t, reduction="max")
    with pytest.raises(ValueError, match=r"mask must have shape \(batch,\) = \(20,\)"):
        adaptive_softmax_loss(x, p, t, mask=jnp.ones((3,), jnp.bool_))
    with pytest.raises(TypeError, match="mask must be a bool array"):
        adaptive_softmax_loss(x, p, t, mask=jnp.ones((BATCH,), jnp.int32))
    with pytest.raises(ValueError, match=r"k must be in \[1, n_outputs\] = \[1, 60\]; got k=61"):
        adaptive_softmax_top_k(x, p, 61)
    with pytest.raises(ValueError, match=r"k must be in \[1, n_outputs\] = \[1, 60\]; got k=0"):
        adaptive_softmax_top_k(x, p, 0)
    with pytest.raises(TypeError, match="k must be a Python int; got float"):
        adaptive_softmax_top_k(x, p, 2.0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cutoffs=[]), ValueError, "cutoffs must hold at least one value"),
        (dict(cutoffs=[5, 5]), ValueError, r"strictly increasing ints in \[1, n_outputs - 1\]"),
        (dict(cutoffs=[0, 5]), ValueError, r"= \[1, 19\] \(n_outputs=20\); got \[0, 5\]"),
        (dict(cutoffs=[5, 20]), ValueError, r"got \[5, 20\]"),
        (dict(cutoffs=[5.0]), TypeError, "cutoffs must be ints"),
        (dict(cutoffs=5), TypeError, "cutoffs must be a sequence of ints; got int"),
        (dict(n_in=0), ValueError, "n_in must be a positive int; got 0"),
        (dict(div_value=0.0), ValueError, "div_value must be a finite number > 0"),
        (dict(dtype=jnp.int32), TypeError, "dtype must have a floating dtype"),
    ],
)
def test_init_errors(kwargs, error, match):
    args = dict(n_in=8, n_outputs=20, cutoffs=[5, 10]) | kwargs
    with pytest.raises(error, match=match):
        adaptive_softmax_init(jax.random.key(0), **args)


def test_init_is_pytorch_shaped():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    for n_in, n_outputs, cutoffs, div_value, head_bias in CASES.values():
        params = adaptive_softmax_init(
            jax.random.key(1), n_in, n_outputs, cutoffs, div_value=div_value, head_bias=head_bias
        )
        module = torch.nn.AdaptiveLogSoftmaxWithLoss(
            n_in, n_outputs, cutoffs, div_value=div_value, head_bias=head_bias
        )
        ours = adaptive_softmax_to_torch(params)
        assert {k: v.shape for k, v in ours.items()} == {
            k: tuple(v.shape) for k, v in module.state_dict().items()
        }
        assert params.cutoffs == tuple(cutoffs) and params.n_outputs == n_outputs
        # Uniform in +-1/sqrt(fan_in), as nn.Linear.
        for k, v in ours.items():
            bound = 1 / np.sqrt(v.shape[-1] if k.endswith("weight") else n_in)
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound
            assert v.dtype == np.float32


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def test_top_k_equals_brute_force(monkeypatch):
    """Against lax.top_k of the reference, for a flat model (every cluster opened).

    Blocks of at most 7 logits: many row chunks and column blocks per cluster,
    the last block shifted back.  (A confident model, one block per cluster:
    test_top_k_vmap_one_example_and_no_gradient.)
    """
    monkeypatch.setattr(_decode, "_CHUNK_ELEMENTS", 7)
    case = "three_clusters_head_bias"
    params, x = make_params(case, scale=0.3), make_x(case)
    ref = adaptive_log_softmax_ref(x, *params)
    order = np.argsort(-ref, axis=1, kind="stable")
    for k in (5, 60):  # a shortlist of 6: k = 60 needs every cluster to fill up
        vals, idx = adaptive_softmax_top_k(x, params, k)
        chex.assert_shape((vals, idx), (BATCH, k))
        np.testing.assert_array_equal(np.asarray(idx), order[:, :k])
        ref_vals = np.take_along_axis(ref, order[:, :k], 1)
        np.testing.assert_allclose(np64(vals), ref_vals, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(adaptive_softmax_predict(x, params)), order[:, 0])


def test_top_k_vmap_one_example_and_no_gradient():
    case = "two_clusters_div4"
    params, x = make_params(case, scale=2.0), make_x(case)
    ref = adaptive_log_softmax_ref(x, *params)
    order = np.argsort(-ref, axis=1, kind="stable")
    f = lambda x: (adaptive_softmax_top_k(x, params, 5), adaptive_softmax_predict(x, params))
    (vals, idx), ids = jax.jit(jax.vmap(f))(x)  # per-example calls, vmapped
    np.testing.assert_array_equal(np.asarray(idx), order[:, :5])
    np.testing.assert_array_equal(np.asarray(ids), order[:, 0])
    assert np.any(order[:, 0] >= 5) and np.any(order[:, 0] < 5)  # both kinds of winner
    ref_vals = np.take_along_axis(ref, order[:, :5], 1)
    np.testing.assert_allclose(np64(vals), ref_vals, rtol=1e-12, atol=1e-12)
    (one_v, one_i), one_id = jax.eval_shape(f, x[3])  # one example: no batch axis
    assert (one_v.shape, one_i.shape, one_id.shape) == ((5,), (5,), ())
    g = jax.jit(jax.grad(lambda p: jnp.sum(adaptive_softmax_top_k(x, p, 5)[0])))(params)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g))


def test_predict_ties_go_to_the_lower_id():
    """All-zero weights: the winning cluster's outputs tie; argmax's first index wins."""
    z = lambda *shape: jnp.zeros(shape, jnp.float32)
    head_b = z(5).at[4].set(5.0)  # the last cluster (outputs 7 .. 11) wins
    params = AdaptiveSoftmaxParams(z(4, 5), head_b, (z(4, 2), z(4, 1)), (z(2, 4), z(1, 5)))
    x = jnp.ones((2, 4), jnp.float32)
    np.testing.assert_array_equal(np.asarray(adaptive_softmax_predict(x, params)), [7, 7])


# --------------------------------------------------------------------------------------
# Cutoffs from counts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_clusters", [1, 2])
@pytest.mark.parametrize("shortlist_mass", [0.0, 0.6])
def test_cutoffs_minimise_the_cost_model(n_clusters, shortlist_mass):
    rng = np.random.default_rng(0)
    counts = rng.zipf(1.5, 14).astype(np.float64)
    n_in = 32
    layout = adaptive_softmax_cutoffs(
        counts, n_in, n_clusters=n_clusters, div_value=2.0, shortlist_mass=shortlist_mass
    )
    widths = [n_in // 2 ** (i + 1) for i in range(n_clusters)]
    ranked = np.sort(counts)[::-1]
    cum = np.concatenate([[0.0], np.cumsum(ranked)]) / ranked.sum()
    candidates = [
        c
        for c in itertools.combinations(range(1, 14), n_clusters)
        if cum[c[0]] >= shortlist_mass - 1e-12
    ]
    best = min(cutoff_cost(cum, c, 14, n_in, widths) for c in candidates)
    assert cutoff_cost(cum, layout.cutoffs, 14, n_in, widths) == pytest.approx(best, rel=1e-12)
    assert cum[layout.cutoffs[0]] >= shortlist_mass - 1e-12
    # Output ids are frequency ranks.
    np.testing.assert_array_equal(counts[layout.output_to_word], ranked)
    np.testing.assert_array_equal(layout.output_to_word[layout.word_to_output], np.arange(14))
    assert layout.n_outputs == 14
    assert 1 <= layout.cutoffs[0] and all(np.diff(layout.cutoffs) > 0) and layout.cutoffs[-1] < 14


def test_cutoffs_large_vocabulary_and_errors():
    counts = 1.0 / np.arange(1, 200_001)
    layout = adaptive_softmax_cutoffs(counts, 128, n_clusters=3)
    assert len(layout.cutoffs) == 3 and 1 <= layout.cutoffs[0] < layout.cutoffs[-1] < 200_000
    mass = np.cumsum(counts) / counts.sum()
    assert mass[layout.cutoffs[0] - 1] < 0.9
    big = adaptive_softmax_cutoffs(counts, 128, n_clusters=3, shortlist_mass=0.9).cutoffs
    assert mass[big[0] - 1] >= 0.9 - 1e-3 and big[0] > layout.cutoffs[0]
    with pytest.raises(ValueError, match=r"counts must be 1-D \(n_words,\); got shape \(2, 2\)"):
        adaptive_softmax_cutoffs(np.ones((2, 2)), 8)
    with pytest.raises(ValueError, match="counts must be finite and non-negative"):
        adaptive_softmax_cutoffs(np.array([1.0, -1.0, 2.0]), 8, n_clusters=1)
    with pytest.raises(ValueError, match="at least n_clusters \\+ 1 = 4 words"):
        adaptive_softmax_cutoffs(np.ones(3), 64, n_clusters=3)
    with pytest.raises(ValueError, match="the last tail cluster would have width"):
        adaptive_softmax_cutoffs(np.ones(30), 16, n_clusters=3)
    with pytest.raises(ValueError, match=r"shortlist_mass must be in \[0, 1\]"):
        adaptive_softmax_cutoffs(np.ones(30), 16, n_clusters=1, shortlist_mass=1.5)


def test_params_properties():
    params = adaptive_softmax_init(jax.random.key(0), 32, 100, [10, 30, 60], head_bias=True)
    assert isinstance(params, AdaptiveSoftmaxParams)
    assert (params.n_in, params.n_clusters, params.shortlist_size) == (32, 3, 10)
    assert params.cluster_sizes == (20, 30, 40) and params.cutoffs == (10, 30, 60)
    assert [p.shape[1] for p in params.tail_proj] == [8, 2, 0]  # 32 // 4**3 == 0, as PyTorch
    logp = adaptive_log_softmax(jnp.ones((2, 32)), params)
    np.testing.assert_allclose(np.exp(np64(logp)).sum(1), 1.0, rtol=1e-5)
    # A zero-width cluster is uniform within itself.
    np.testing.assert_allclose(np64(logp)[:, 60:], np64(logp)[:, 60:61] * np.ones((1, 40)))


def test_empty_batch():
    params = make_params("two_clusters_div4")
    x, t = jnp.zeros((0, 16)), jnp.zeros((0,), jnp.int32)
    loss, g = jax.jit(jax.value_and_grad(adaptive_softmax_loss, argnums=1))(x, params, t)
    assert float(loss) == 0.0 and all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g))
    vals, idx = adaptive_softmax_top_k(x, params, 3)
    assert vals.shape == idx.shape == (0, 3)
