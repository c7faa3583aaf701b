"""Every strategy gives what ``gather`` gives, NaN and inf included, in values and gradients.

``gather`` is the reference: a NaN or inf propagates exactly where its selected
products put it (``0 * inf`` is NaN, ``inf - inf`` is NaN) and nowhere else, so a
non-finite value in a block no example selects, in a masked (out-of-range) slot
or in a slot another shard owns never reaches a result.  The comparison is
element by element: the same NaN, +inf and -inf positions, close finite values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType

import blocksparse_jax as bsj
from blocksparse_jax import blocksparse as bs
from blocksparse_jax import parallel

# Every strategy the library has (a new one is checked without editing this file).
ALL = ("gather", *(s for s in bs.STRATEGIES if s != "gather"))

# (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size)
SHAPES = {
    "small": (4, 3, 4, 2, 3, 2, 3),
    # Many pairs on two blocks: grouped stacks 8 rows per step, runs are shorter.
    "runs": (8, 1, 2, 1, 1, 1, 2),
    # Shapes for which auto picks dense, and grouped, on CPU.
    "auto_dense": (64, 2, 2, 2, 2, 16, 16),
    "auto_grouped": (64, 2, 2, 1, 1, 64, 64),
}

PROFILE = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def assert_same(got, ref, what, rtol=1e-9):
    """NaN, +inf and -inf exactly where ``ref`` has them; close finite values elsewhere."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref), err_msg=f"{what}: NaN positions")
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(ref), err_msg=f"{what}: +inf")
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref), err_msg=f"{what}: -inf")
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=rtol, atol=rtol, err_msg=what)


def _ops(strategy, mesh=None):
    if mesh is None:
        kw = dict(strategy=strategy)
        return (
            functools.partial(bsj.sparse_block_gemv, **kw),
            functools.partial(bsj.sparse_block_dot, **kw),
            functools.partial(bsj.sparse_block_outer, **kw),
        )
    kw = dict(strategy=strategy, mesh=mesh)
    return (
        functools.partial(parallel.sparse_block_gemv, **kw),
        functools.partial(parallel.sparse_block_dot, **kw),
        functools.partial(parallel.sparse_block_outer, **kw),
    )


def _everything(gemv, dot, outer, a):
    """Values of the three ops and their VJPs with the given cotangents (NaN/inf allowed)."""
    ii, oi = a["ii"], a["oi"]
    out, vjp = jax.vjp(lambda o, W, h: gemv(o, W, h, ii, oi), a["o"], a["W"], a["h"])
    d, vjp_d = jax.vjp(lambda W, h, b: dot(W, h, ii, b, oi), a["W"], a["h"], a["b"])
    u, vjp_u = jax.vjp(
        lambda Wo, x, y, alpha: outer(Wo, x, y, ii, oi, alpha), a["O"], a["h"], a["y"], a["alpha"]
    )
    return dict(
        gemv=out,
        gemv_grads=vjp(a["g"]),
        dot=d,
        dot_grads=vjp_d(a["g"]),
        outer=u,
        outer_grads=vjp_u(a["G"]),
    )


@functools.cache
def _run_all(strategies):
    """One jitted function: everything for each strategy (indices traced, so under jit)."""
    return jax.jit(lambda a: {s: _everything(*_ops(s), a) for s in strategies})


def _arrays(shape, seed):
    batch, ib, ob, iw, ow, s, t = shape
    rng = np.random.default_rng(seed)
    f = lambda *sh: rng.standard_normal(sh)
    return dict(
        o=f(batch, ow, t),
        W=f(ib, ob, s, t),
        h=f(batch, iw, s),
        b=f(ob, t),
        y=f(batch, ow, t),
        O=f(ib, ob, s, t),
        g=f(batch, ow, t),
        G=f(ib, ob, s, t),
        alpha=np.float64(rng.uniform(-2, 2)),
        ii=rng.integers(0, max(ib, 1), (batch, iw)).astype(np.int32),
        oi=rng.integers(0, max(ob, 1), (batch, ow)).astype(np.int32),
    )


def _check_all_agree(results, what=""):
    ref = jax.tree.leaves(results["gather"])
    for s, res in results.items():
        for k, (got, want) in enumerate(zip(jax.tree.leaves(res), ref, strict=True)):
            assert_same(got, want, f"{what} {s} leaf {k}")


def _selected(a):
    """Boolean (i_blocks, o_blocks): the blocks some in-range pair selects."""
    ib, ob = a["W"].shape[:2]
    sel = np.zeros((ib, ob), bool)
    for ii, oi in zip(a["ii"], a["oi"], strict=True):
        for i in ii:
            for j in oi:
                if 0 <= i < ib and 0 <= j < ob:
                    sel[i, j] = True
    return sel


# ---------------------------------------------------------------------------------------------
# The property: random NaN/inf placement and out-of-range indices, every strategy, under jit.


@st.composite
def hostile(draw):
    shape = draw(st.sampled_from(sorted(SHAPES)))
    seed = draw(st.integers(0, 2**16))
    # How many non-finite entries go where: (array name, count) pairs.
    places = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["W_selected", "W_unselected", "h", "o", "b", "y", "O", "g", "G"]),
                st.integers(1, 3),
                st.sampled_from([np.nan, np.inf, -np.inf]),
            ),
            max_size=4,
        )
    )
    alpha = draw(st.sampled_from([None, None, None, 0.0, np.inf, np.nan]))
    n_bad_idx = draw(st.integers(0, 3))
    return shape, seed, places, alpha, n_bad_idx


def _make_hostile(shape_name, seed, places, alpha, n_bad_idx):
    a = _arrays(SHAPES[shape_name], seed)
    rng = np.random.default_rng(seed + 1)
    for where, count, value in places:
        if where.startswith("W_"):
            sel = _selected(a)
            blocks = np.argwhere(sel if where == "W_selected" else ~sel)
            if not len(blocks):
                continue
            for _ in range(count):
                i, j = blocks[rng.integers(len(blocks))]
                s, t = rng.integers(a["W"].shape[2]), rng.integers(a["W"].shape[3])
                a["W"][i, j, s, t] = value
        else:
            flat = a[where].reshape(-1)
            flat[rng.integers(flat.size, size=count)] = value
    if alpha is not None:
        a["alpha"] = np.float64(alpha)
    for _ in range(n_bad_idx):
        name = "ii" if rng.integers(2) else "oi"
        n = a["W"].shape[0 if name == "ii" else 1]
        r, c = rng.integers(a[name].shape[0]), rng.integers(a[name].shape[1])
        a[name][r, c] = rng.choice([n, n + 5, -n - 1, 2**30, -(2**31)])
    return a


@pytest.mark.slow
@PROFILE
@given(problem=hostile())
def test_every_strategy_matches_gather_on_hostile_values(problem):
    a = _make_hostile(*problem)
    _check_all_agree(_run_all(ALL)(a), what=str(problem))


@pytest.fixture(scope="module")
def mesh22():
    return jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


@functools.cache
def _run_parallel(mesh):
    return jax.jit(
        lambda a: {
            "gather": _everything(*_ops("gather"), a),
            "parallel_auto": _everything(*_ops("auto", mesh), a),
            "parallel_dense": _everything(*_ops("dense", mesh), a),
            "parallel_grouped": _everything(*_ops("grouped", mesh), a),
        }
    )


@settings(PROFILE, max_examples=6)
@given(problem=hostile().filter(lambda p: p[0] == "small"))
def test_parallel_matches_gather_on_hostile_values(mesh22, problem):
    a = _make_hostile(*problem)
    _check_all_agree(_run_parallel(mesh22)(a), what=str(problem))


# ---------------------------------------------------------------------------------------------
# The failures these properties were written for, one by one.


def _gathered(a, strategies=ALL):
    return _run_all(strategies)(a)


def test_unselected_nan_block_stays_out_of_dense():
    a = _arrays(SHAPES["small"], 0)
    a["ii"][:] = np.array([0, 1])
    a["oi"][:] = np.array([0, 1, 2])
    a["W"][2, 0] = np.nan  # block (2, 0): no example selects it (column 0 is used)
    res = _gathered(a)
    assert np.isfinite(np.asarray(res["gather"]["gemv"])).all()
    _check_all_agree(res)
    for s in ALL:
        assert np.isfinite(np.asarray(res[s]["gemv"])).all(), s


def test_one_examples_nan_activation_stays_in_its_blocks():
    """dense's weight gradient multiplied every example's activations by every other's."""
    a = _arrays(SHAPES["small"], 1)
    a["ii"][:] = np.array([[0, 0], [1, 1], [2, 2], [2, 2]])
    a["oi"][:] = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]])
    a["h"][0, 0, 0] = np.inf
    res = _gathered(a)
    dW = np.asarray(res["gather"]["gemv_grads"][1])
    assert not np.isfinite(dW[0, 0]).all() and np.isfinite(dW[1:]).all()
    _check_all_agree(res)


def test_grouped_padded_lanes_do_not_multiply_foreign_inf():
    """A run shorter than a step: the other lanes hold another block's pairs (with inf)."""
    a = _arrays(SHAPES["runs"], 2)
    a["oi"][:, 0] = [0, 1, 1, 1, 1, 1, 1, 1]
    a["y"][1:] = np.inf
    a["g"][1:] = np.inf
    res = _gathered(a, ("gather", "grouped"))
    assert np.isfinite(np.asarray(res["gather"]["outer"])[0, 0]).all()
    _check_all_agree(res)


def test_out_of_range_index_under_jit_never_multiplies_block_zero():
    a = _arrays(SHAPES["small"], 3)
    a["W"][0] = np.inf  # block row 0 (where a masked input slot was parked) and column 0
    a["W"][:, 0] = np.inf
    a["ii"][:] = np.array([1, 2])
    a["oi"][:] = np.array([1, 2, 3])
    a["ii"][0, 0] = 7  # out of range: adds nothing
    a["oi"][1, 2] = -9  # out of range: out == o there
    a["h"][1, 0] = np.inf  # in range: its products are infinite (some NaN) in example 1 only
    a["y"][0] = np.inf  # outer: example 0's y is infinite; its pairs with x_idx 7 are dropped
    res = _gathered(a)
    _check_all_agree(res)
    g = res["gather"]
    out, dW = np.asarray(g["gemv"]), np.asarray(g["gemv_grads"][1])
    np.testing.assert_array_equal(out[1, 2], a["o"][1, 2])
    assert np.isfinite(out[0]).all() and np.isfinite(np.asarray(g["dot"])[0]).all()
    assert np.isfinite(dW[0]).all() and np.isfinite(dW[:, 0]).all()  # masked slots' blocks
    dx, dy = (np.asarray(v) for v in g["outer_grads"][1:3])
    assert np.isfinite(dx[0, 0]).all() and (dx[0, 0] == 0).all()  # the masked x slot
    assert np.isfinite(np.asarray(g["outer"])[0]).all()


def test_masked_slot_with_nan_activation_gets_zero_gradient():
    """The ``where`` trap: a masked example's NaN must not reach any gradient."""
    a = _arrays(SHAPES["small"], 4)
    a["oi"][0] = 99  # example 0: every output slot out of range
    a["ii"][0] = -99
    a["h"][0] = np.nan
    a["y"][0] = np.nan
    res = _gathered(a)
    _check_all_agree(res)
    for s in ALL:
        for leaf in jax.tree.leaves(res[s]):
            assert np.isfinite(np.asarray(leaf)).all(), s


@pytest.mark.parametrize("strategy", ALL)
def test_low_precision_sums_repeated_blocks_in_float32(strategy):
    """dense scattered float16 activations in float16: 60000 + 60000 was inf."""
    h = jnp.full((1, 2, 1), 60000.0, jnp.float16)
    idx = jnp.zeros((1, 2), jnp.int32)
    out = bsj.sparse_block_gemv(
        jnp.zeros((1, 1, 1), jnp.float32),
        jnp.ones((1, 1, 1, 1), jnp.float16),
        h,
        idx,
        idx[:, :1],
        strategy=strategy,
    )
    assert float(out[0, 0, 0]) == 120000.0
    upd = bsj.sparse_block_outer(
        jnp.zeros((1, 1, 1, 1), jnp.float32), h, h, idx, idx, strategy=strategy
    )
    assert float(upd[0, 0, 0, 0]) == 4 * 60000.0**2


@pytest.mark.parametrize("strategy", ALL)
def test_non_finite_alpha_touches_only_selected_blocks(strategy):
    a = _arrays(SHAPES["small"], 5)
    a["ii"][:] = np.array([0, 1])
    a["oi"][:] = np.array([0, 1, 2])
    for alpha in (np.inf, np.nan):
        out = bsj.sparse_block_outer(
            a["O"], a["h"], a["y"], a["ii"], a["oi"], alpha, strategy=strategy
        )
        np.testing.assert_array_equal(out[2:], a["O"][2:])  # unselected rows untouched
        np.testing.assert_array_equal(out[:, 3], a["O"][:, 3])


# The contract returns before any strategy runs when a size is 0; two suffice.
@pytest.mark.parametrize("strategy", ["gather", "auto"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 0, 1, 1, 2, 3),  # no output blocks
        (2, 0, 3, 1, 1, 2, 3),  # no input blocks
        (2, 3, 4, 1, 1, 0, 3),  # empty input blocks
        (2, 3, 4, 1, 1, 2, 0),  # empty output blocks
        (0, 3, 4, 1, 1, 2, 3),  # empty batch
        (2, 3, 4, 0, 1, 2, 3),  # i_win 0
        (2, 3, 4, 1, 0, 2, 3),  # o_win 0
    ],
)
def test_degenerate_sizes_under_jit(strategy, shape):
    """Every index is out of range without blocks: gemv gives o, dot zeros, outer o."""
    batch, ib, ob, iw, ow, s, t = shape
    a = _arrays(shape, 6)
    a["ii"] = np.zeros((batch, iw), np.int32)
    a["oi"] = np.zeros((batch, ow), np.int32)
    res = jax.jit(lambda a: _everything(*_ops(strategy), a))(a)
    np.testing.assert_array_equal(res["gemv"], a["o"])  # nothing to add in any of these
    np.testing.assert_array_equal(res["outer"], a["O"])
    for leaf in jax.tree.leaves(res):
        assert np.isfinite(np.asarray(leaf)).all()
    np.testing.assert_array_equal(res["gemv_grads"][0], a["g"])


def test_parallel_nan_in_another_shards_block_stays_out_of_dh(mesh22):
    a = _arrays(SHAPES["small"], 7)
    a["oi"][:] = np.array([0, 1, 0])  # every slot on model shard 0 (blocks 0, 1)
    a["W"][:, 2:] = np.nan  # shard 1's blocks: never selected
    a["W"][:, 3, 0, 0] = np.inf
    res = _run_parallel(mesh22)(a)
    for leaf in jax.tree.leaves(res["parallel_auto"]["gemv_grads"][2]):
        assert np.isfinite(np.asarray(leaf)).all()
    _check_all_agree(res)


# ---------------------------------------------------------------------------------------------
# Forward mode: not supported (custom VJPs); reverse mode to any order is.


def test_forward_mode_raises_and_jacrev_of_jacrev_works():
    a = _arrays(SHAPES["small"], 8)
    f = lambda W: jnp.sum(jnp.sin(bsj.sparse_block_gemv(a["o"], W, a["h"], a["ii"], a["oi"])) ** 2)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(f, (a["W"],), (a["W"],))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jacfwd(f)(a["W"])
    W = a["W"][:2, :2, :1, :1].copy()
    sub = dict(a, W=W, ii=a["ii"] % 2, oi=a["oi"] % 2, h=a["h"][..., :1], o=a["o"][..., :1])
    g = lambda W: jnp.sum(
        jnp.sin(
            bsj.sparse_block_gemv(sub["o"], W, sub["h"], sub["ii"], sub["oi"], strategy="gather")
        )
        ** 2
    )
    hess = jax.jit(jax.jacrev(jax.jacrev(g)))(jnp.asarray(W))
    want = jax.jit(jax.hessian(lambda W: _dense_loss(W, sub)))(jnp.asarray(W))
    assert hess.shape == W.shape * 2
    np.testing.assert_allclose(hess, want, rtol=1e-9, atol=1e-12)


def _dense_loss(W, a):
    """The same loss with plain jnp indexing (forward mode works here)."""
    blocks = W[a["ii"][:, :, None], a["oi"][:, None, :]]  # (b, i, j, s, t)
    out = a["o"] + jnp.einsum("bis,bijst->bjt", a["h"], blocks)
    return jnp.sum(jnp.sin(out) ** 2)
