"""blocksparse_jax.parallel on 8 CPU devices against the single-device functions.

For every mesh one jitted training step (all three ops and the hierarchical
softmax loss, their gradients and an SGD update) and one jitted forward pass
are compiled, compared with the single-device functions, and the step's
compiled HLO is searched for an all-gather.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import blocksparse_jax as bsj
from blocksparse_jax import blocksparse as bs
from blocksparse_jax import parallel

# batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size: o_blocks = 8 splits over every mesh.
B, IB, OB, IW, OW, S, T = 8, 5, 8, 2, 3, 3, 2
# The hierarchical softmax: 23 outputs in 5 classes of 5 (two padded slots); 5 classes
# do not split over 4 or 8 devices, so shard_params pads them.
N_IN, N_OUT, N_CLASSES = 6, 23, 5
LR = 0.1
TOL = dict(rtol=1e-10, atol=1e-12)

MESHES = {
    "1x8": ((1, 8), AxisType.Explicit),
    "2x4": ((2, 4), AxisType.Explicit),
    "8x1": ((8, 1), AxisType.Explicit),
}


def _problem():
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    ii = rng.integers(-IB, IB, (B, IW))  # negative indices count from the end
    oi = rng.integers(-OB, OB, (B, OW))
    oi[0, :] = 3  # repeated blocks within a row and across rows
    oi[1, 0] = 3
    params = bsj.h_softmax_init(
        jax.random.key(0), N_IN, N_OUT, n_classes=N_CLASSES, dtype=jnp.float64
    )
    params = bsj.HSoftmaxParams(*(a + 0.1 * f(*a.shape) for a in params))  # non-zero biases
    return dict(
        W=f(IB, OB, S, T),
        b=f(OB, T),
        o=f(B, OW, T),
        h=f(B, IW, S),
        g=f(B, OW, T),
        ii=jnp.asarray(ii, jnp.int32),
        oi=jnp.asarray(oi, jnp.int16),  # any integer dtype
        alpha=jnp.asarray(-0.5),
        params=params,
        x=f(B, N_IN),
        target=jnp.asarray(rng.integers(0, N_OUT, B), jnp.int32),
        mask=jnp.asarray(np.arange(B) % 3 != 1),
    )


PROBLEM = _problem()


def _ops(mesh):
    """The functions under test: parallel ones on ``mesh``, single-device ones for ``None``."""
    if mesh is None:
        return (
            bsj.sparse_block_gemv,
            bsj.sparse_block_dot,
            bsj.sparse_block_outer,
            bsj.h_softmax_loss,
            bsj.h_log_softmax,
        )
    kw = dict(mesh=mesh)
    return (
        lambda *a: parallel.sparse_block_gemv(*a, **kw),
        lambda *a: parallel.sparse_block_dot(*a, **kw),
        lambda *a: parallel.sparse_block_outer(*a, **kw),
        lambda *a, **k: parallel.h_softmax_loss(*a, **k, **kw),
        lambda *a, **k: parallel.h_log_softmax(*a, **k, **kw),
    )


def _train_step(mesh):
    """One SGD step on every differentiable input of the three ops and the h_softmax loss.

    Also returns the forward values of the three ops and of the target
    log-probabilities (as ``aux``), so one compilation checks values and gradients.
    """
    gemv, dot, outer, hs_loss, log_softmax = _ops(mesh)

    def loss(diff, data):
        W, b, h, g, alpha, params, x = diff
        o, ii, oi, target, mask = data
        aux = dict(
            gemv=gemv(o, W, h, ii, oi),
            dot=dot(W, h, ii, b, oi),
            outer=outer(W, h, g, ii, oi, alpha),
            target=log_softmax(x, params, target, n_outputs=N_OUT),
        )
        hs = hs_loss(x, params, target, n_outputs=N_OUT, mask=mask)
        value = jnp.sum(jnp.sin(aux["gemv"])) + jnp.sum(jnp.cos(aux["dot"])) + hs
        value += 0.1 * jnp.sum(jnp.sin(aux["outer"])) + 0.1 * jnp.sum(aux["target"])
        return value, aux

    def step(diff, data):
        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(diff, data)
        new = jax.tree.map(lambda a, ga: a - LR * ga, diff, grads)
        return value, aux, grads, new

    return jax.jit(step)


def _full_log_softmax(mesh):
    log_softmax = _ops(mesh)[4]
    return jax.jit(lambda params: log_softmax(PROBLEM["x"], params, n_outputs=N_OUT))


def _diff_args(params):
    p = PROBLEM
    return (p["W"], p["b"], p["h"], p["g"], p["alpha"], params, p["x"])


def _data_args():
    p = PROBLEM
    return (p["o"], p["ii"], p["oi"], p["target"], p["mask"])


def _unpad(params, n=N_CLASSES):
    W1, b1, W2, b2 = jax.device_get(params)
    return bsj.HSoftmaxParams(W1[:, :n], b1[:n], W2[:n], b2[:n])


@pytest.fixture(scope="module")
def single():
    """Single-device results, computed once."""
    value, aux, grads, new = _train_step(None)(_diff_args(PROBLEM["params"]), _data_args())
    full = _full_log_softmax(None)(PROBLEM["params"])
    return dict(value=value, fwd=dict(aux, full=full), grads=grads, new=new)


@pytest.fixture(scope="module", params=list(MESHES))
def run(request):
    """Per mesh: placed inputs, the compiled step and its outputs, the forward outputs."""
    shape, axis_type = MESHES[request.param]
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)
    W = jax.device_put(PROBLEM["W"], NamedSharding(mesh, P(None, "model")))
    b = jax.device_put(PROBLEM["b"], NamedSharding(mesh, P("model")))
    params = parallel.shard_params(PROBLEM["params"], mesh)
    batch = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))  # split over data
    args = (
        W,
        b,
        batch(PROBLEM["h"]),
        batch(PROBLEM["g"]),
        PROBLEM["alpha"],
        params,
        batch(PROBLEM["x"]),
    )
    data = tuple(batch(a) for a in _data_args())
    step = _train_step(mesh)
    compiled = step.lower(args, data).compile()
    value, aux, grads, new = compiled(args, data)
    full = _full_log_softmax(mesh)(params)
    return dict(
        mesh=mesh, compiled=compiled, value=value, fwd=dict(aux, full=full), grads=grads, new=new
    )


def test_shard_params_pads_classes(run):
    mesh = run["mesh"]
    params = parallel.shard_params(PROBLEM["params"], mesh)
    m = mesh.shape["model"]
    C = -(-N_CLASSES // m) * m
    chex.assert_shape(params, [(N_IN, C), (C,), (C, N_IN, 5), (C, 5)])
    for a, spec in zip(params, (P(None, "model"), P("model"), P("model"), P("model")), strict=True):
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim)
    chex.assert_trees_all_equal(_unpad(params), PROBLEM["params"])
    assert not np.any(np.asarray(params.W2)[N_CLASSES:])  # padded with zero classes


def test_forward_values_equal_single_device(run, single):
    chex.assert_trees_all_close(jax.device_get(run["fwd"]), jax.device_get(single["fwd"]), **TOL)
    full = np.asarray(run["fwd"]["full"])
    np.testing.assert_allclose(np.exp(full).sum(axis=1), 1.0, rtol=1e-12)  # padded classes: p = 0


def test_training_step_equals_single_device(run, single):
    W, b, h, g, alpha, params, x = run["grads"]
    grads = (W, b, h, g, alpha, _unpad(params), x)
    chex.assert_trees_all_close(run["value"], single["value"], **TOL)
    chex.assert_trees_all_close(jax.device_get(grads), jax.device_get(single["grads"]), **TOL)
    new = run["new"][:5] + (_unpad(run["new"][5]), run["new"][6])
    chex.assert_trees_all_close(jax.device_get(new), jax.device_get(single["new"]), **TOL)
    # The padded classes get no gradient.
    for a in jax.device_get(run["grads"][5]):
        assert not np.any(
            a[..., N_CLASSES:] if a.ndim == 2 and a.shape[0] == N_IN else a[N_CLASSES:]
        )


def test_weight_gradients_stay_sharded(run):
    mesh = run["mesh"]
    m = mesh.shape["model"]
    gW, gb, *_, gparams, _ = run["grads"]
    expected = [
        (gW, P(None, "model"), (IB, OB // m, S, T)),
        (gb, P("model"), (OB // m, T)),
    ]
    C = gparams.W1.shape[1]
    expected += [
        (gparams.W1, P(None, "model"), (N_IN, C // m)),
        (gparams.b1, P("model"), (C // m,)),
        (gparams.W2, P("model"), (C // m, N_IN, 5)),
        (gparams.b2, P("model"), (C // m, 5)),
    ]
    for a, spec, shard_shape in expected:
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (a.sharding, spec)
        assert {s.data.shape for s in a.addressable_shards} == {shard_shape}
    # The updated weights too (the step's output), so the next step starts sharded.
    assert run["new"][0].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 4)


def _all_gathers(hlo: str) -> list[str]:
    return [
        line.strip() for line in hlo.splitlines() if re.search(r"\ball-gather(-start)?\(", line)
    ]


def test_training_step_never_gathers_weights(run):
    hlo = run["compiled"].as_text()
    assert "all-reduce" in hlo or run["mesh"].size == 1  # the data-parallel psum is there ...
    assert _all_gathers(hlo) == []  # ... and no all-gather of W, W1 or W2 (nor anything else)


def test_all_gather_detector_sees_a_gather():
    """The HLO check is not vacuous: gathering the sharded W shows up as all-gather."""
    mesh = jax.make_mesh((1, 8), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    W = jax.device_put(PROBLEM["W"], NamedSharding(mesh, P(None, "model")))
    f = jax.jit(lambda W: W * 2.0, out_shardings=NamedSharding(mesh, P()))
    assert _all_gathers(f.lower(W).compile().as_text())


def test_step_compiles_once():
    """A training loop with changing index values traces and compiles the step once."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    p = PROBLEM
    W = jax.device_put(p["W"], NamedSharding(mesh, P(None, "model")))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(W, oi):
        loss = lambda W: jnp.sum(
            parallel.sparse_block_gemv(p["o"], W, p["h"], p["ii"], oi, mesh=mesh) ** 2
        )
        value, gW = jax.value_and_grad(loss)(W)
        return value, W - 0.01 * gW

    losses = []
    for k in range(3):
        value, W = step(W, jnp.roll(p["oi"], k, axis=0))
        losses.append(float(value))
    assert len(set(losses)) == 3


def test_eager_call_and_out_of_range_under_jit():
    """Eager calls work; under jit an out-of-range index adds nothing, as on one device."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    p = PROBLEM
    eager = parallel.sparse_block_gemv(p["o"], p["W"], p["h"], p["ii"], p["oi"], mesh=mesh)
    single = jax.jit(bsj.sparse_block_gemv)(p["o"], p["W"], p["h"], p["ii"], p["oi"])
    chex.assert_trees_all_close(eager, single, **TOL)
    oi = p["oi"].at[0, 1].set(OB).at[2, 0].set(-OB - 1)
    ii = p["ii"].at[1, 0].set(IB + 3)
    f = lambda mesh_kw, op: jax.jit(lambda ii, oi: op(p["o"], p["W"], p["h"], ii, oi, **mesh_kw))(
        ii, oi
    )
    par = f(dict(mesh=mesh), parallel.sparse_block_gemv)
    chex.assert_trees_all_close(par, f({}, bsj.sparse_block_gemv), **TOL)
    np.testing.assert_array_equal(np.asarray(par)[0, 1], p["o"][0, 1])
    target = p["target"].at[3].set(N_OUT)
    params = parallel.shard_params(p["params"], mesh)
    lp = jax.jit(lambda t: parallel.h_log_softmax(p["x"], params, t, n_outputs=N_OUT, mesh=mesh))(
        target
    )
    lp1 = jax.jit(lambda t: bsj.h_log_softmax(p["x"], p["params"], t, n_outputs=N_OUT))(target)
    chex.assert_trees_all_close(lp, lp1, **TOL)
    assert np.isneginf(np.asarray(lp)[3])


def test_class_sizes():
    """Uneven classes (frequency_classes layout) with padded parameters, on an ``Auto`` mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    p = PROBLEM
    sizes = jnp.asarray([5, 1, 3, 0, 4], jnp.int32)  # class 3 is empty
    target = jnp.asarray([0, 5, 10, 12, 20, 23, 21, 2], jnp.int32)
    n_out = 25
    params = parallel.shard_params(p["params"], mesh)

    def both(f1, fp):
        loss1 = lambda x, q: f1(x, q, target, n_outputs=n_out, class_sizes=sizes)
        lossp = lambda x, q: fp(x, q, target, n_outputs=n_out, class_sizes=sizes, mesh=mesh)
        v1, g1 = jax.jit(jax.value_and_grad(loss1, argnums=(0, 1)))(p["x"], p["params"])
        vp, gp = jax.jit(jax.value_and_grad(lossp, argnums=(0, 1)))(p["x"], params)
        chex.assert_trees_all_close(vp, v1, **TOL)
        chex.assert_trees_all_close(
            (jax.device_get(gp[0]), _unpad(gp[1])), jax.device_get(g1), **TOL
        )

    both(bsj.h_softmax_loss, parallel.h_softmax_loss)
    full = jax.jit(
        lambda x, q: parallel.h_log_softmax(x, q, n_outputs=n_out, class_sizes=sizes, mesh=mesh)
    )
    full1 = jax.jit(lambda x, q: bsj.h_log_softmax(x, q, n_outputs=n_out, class_sizes=sizes))
    chex.assert_trees_all_close(full(p["x"], params), full1(p["x"], p["params"]), **TOL)


@pytest.mark.parametrize("strategy", bs.STRATEGIES)
def test_every_strategy_runs_sharded(strategy):
    """Each shard runs the single-device strategy on its local problem; same values and grads.

    (On a mesh with ``Auto`` axis types; the other tests use ``jax.make_mesh``'s ``Explicit``.)
    """
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    p = PROBLEM

    def loss(ops, kw):
        gemv, dot, outer = ops

        def f(W, b, h, alpha):
            out = gemv(p["o"], W, h, p["ii"], p["oi"], **kw)
            d = dot(W, h, p["ii"], b, p["oi"], **kw)
            u = outer(W, h, p["g"], p["ii"], p["oi"], alpha, **kw)
            return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(d)) + jnp.sum(jnp.sin(u))

        return jax.jit(jax.value_and_grad(f, argnums=range(4)))(p["W"], p["b"], p["h"], p["alpha"])

    par = (parallel.sparse_block_gemv, parallel.sparse_block_dot, parallel.sparse_block_outer)
    single = (bsj.sparse_block_gemv, bsj.sparse_block_dot, bsj.sparse_block_outer)
    got = loss(par, dict(mesh=mesh, strategy=strategy))
    want = loss(single, dict(strategy="gather"))
    chex.assert_trees_all_close(jax.device_get(got), jax.device_get(want), **TOL)


def test_checkify_reports_out_of_range_indices():
    """``checkify.index_checks`` sees through the parallel functions (``Auto`` mesh axes).

    Only genuinely out-of-range indices are reported, not the indices of blocks
    another shard owns.
    """
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    p = PROBLEM
    params = parallel.shard_params(p["params"], mesh)

    def check(f, *args):
        err, _ = checkify.checkify(jax.jit(f), errors=checkify.index_checks)(*args)
        return err.get()

    gemv = lambda oi: parallel.sparse_block_gemv(p["o"], p["W"], p["h"], p["ii"], oi, mesh=mesh)
    assert check(gemv, p["oi"]) is None
    assert "index 8 is out of bounds for axis 0 with size 8" in check(
        gemv, p["oi"].at[5, 1].set(OB)
    )
    hs = lambda t: parallel.h_log_softmax(p["x"], params, t, n_outputs=N_OUT, mesh=mesh)
    assert check(hs, p["target"]) is None
    assert "index 23 is out of bounds for axis 0 with size 23" in check(
        hs, p["target"].at[1].set(N_OUT)
    )


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh24():
    return jax.make_mesh((2, 4), ("data", "model"))


def test_uneven_o_blocks_is_refused(mesh24):
    p = PROBLEM
    W = p["W"][:, :6]
    with pytest.raises(
        ValueError,
        match=r"o_blocks \(W.shape\[1\]\)=6 is not divisible by the size 4 of mesh axis 'model'",
    ):
        parallel.sparse_block_gemv(p["o"], W, p["h"], p["ii"], p["oi"] % 6, mesh=mesh24)
    with pytest.raises(ValueError, match=r"y_blocks \(o.shape\[1\]\)=6 is not divisible"):
        parallel.sparse_block_outer(W, p["h"], p["g"], p["ii"], p["oi"] % 6, mesh=mesh24)


def test_uneven_batch_is_refused(mesh24):
    p = PROBLEM
    with pytest.raises(
        ValueError, match=r"batch=7 is not divisible by the size 2 of mesh axis 'data'"
    ):
        parallel.sparse_block_dot(p["W"], p["h"][:7], p["ii"][:7], p["b"], p["oi"][:7], mesh=mesh24)


def test_unpadded_classes_are_refused(mesh24):
    p = PROBLEM
    with pytest.raises(ValueError, match=r"n_classes=5 is not divisible .* parallel.shard_params"):
        parallel.h_softmax_loss(p["x"], p["params"], p["target"], n_outputs=N_OUT, mesh=mesh24)


def test_bad_mesh_arguments(mesh24):
    p = PROBLEM
    args = (p["o"], p["W"], p["h"], p["ii"], p["oi"])
    with pytest.raises(ValueError, match=r"model_axis='x' is not an axis of the mesh"):
        parallel.sparse_block_gemv(*args, mesh=mesh24, model_axis="x")
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh"):
        parallel.sparse_block_gemv(*args, mesh="data")
    with pytest.raises(ValueError, match=r"data_axis and model_axis must differ"):
        parallel.sparse_block_gemv(*args, mesh=mesh24, data_axis="model")


def test_single_device_errors_are_kept(mesh24):
    p = PROBLEM
    with pytest.raises(
        ValueError,
        match=r"W must be 4-D \(i_blocks, o_blocks, i_size, o_size\); got shape \(5, 8\)",
    ):
        parallel.sparse_block_gemv(
            p["o"], p["W"][:, :, 0, 0], p["h"], p["ii"], p["oi"], mesh=mesh24
        )
    with pytest.raises(TypeError, match=r"output_idx must be an array of integer block indices"):
        parallel.sparse_block_gemv(
            p["o"], p["W"], p["h"], p["ii"], p["oi"].astype(jnp.float32), mesh=mesh24
        )
    with pytest.raises(IndexError, match=r"output_idx holds 8 at position \(0, 0\)"):
        parallel.sparse_block_gemv(
            p["o"], p["W"], p["h"], p["ii"], p["oi"].at[0, 0].set(8), mesh=mesh24
        )
    with pytest.raises(IndexError, match=r"target holds 23 at position \(2,\)"):
        parallel.h_log_softmax(
            p["x"],
            parallel.shard_params(p["params"], mesh24),
            p["target"].at[2].set(23),
            n_outputs=N_OUT,
            mesh=mesh24,
        )
    with pytest.raises(
        ValueError, match=r"h must be 3-D \(batch, i_win, i_size\) for the parallel ops"
    ):
        parallel.sparse_block_gemv(
            p["o"][0], p["W"], p["h"][0], p["ii"][0], p["oi"][0], mesh=mesh24
        )
