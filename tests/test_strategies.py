"""Every execution strategy against the plain loop references, forward and backward.

``strategy="auto"`` may pick any of them, so each is checked on its own: values,
gradients of ``W`` and ``h`` (and of ``sparse_block_outer``'s inputs), under
``jit`` and ``vmap``, grad-of-grad, repeated indices and low-precision dtypes.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blocksparse_jax import sparse_block_dot, sparse_block_gemv, sparse_block_outer
from blocksparse_jax.blocksparse import _cost, _gather
from tests.reference import dot_ref, gemv_grads_ref, gemv_ref, outer_ref

STRATEGIES = ["gather", "loop", "dense", "grouped", "ragged"]
SMALL = (5, 3, 4, 2, 3, 2, 5)  # (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size)


def _problem(shape, seed=0, dtype=np.float64):
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    rng = np.random.default_rng(seed)
    return dict(
        o=rng.standard_normal((batch, o_win, o_size)).astype(dtype),
        W=rng.standard_normal((i_blocks, o_blocks, i_size, o_size)).astype(dtype),
        h=rng.standard_normal((batch, i_win, i_size)).astype(dtype),
        ii=rng.integers(0, i_blocks, (batch, i_win)).astype(np.int32),
        oi=rng.integers(0, o_blocks, (batch, o_win)).astype(np.int32),
        g=rng.standard_normal((batch, o_win, o_size)).astype(dtype),
    )


def _repeated(p):
    """Every example on the same blocks, with repeats in a row: runs longer than a group."""
    ii, oi = np.zeros_like(p["ii"]), np.ones_like(p["oi"])
    ii[:, -1] = p["W"].shape[0] - 1
    return dict(p, ii=ii, oi=oi)


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    return request.param


@pytest.mark.parametrize("case", ["random", "repeated", "ones"])
def test_gemv_and_dot_values_and_grads(strategy, case):
    if case == "ones":
        p = _problem((1, 1, 1, 1, 1, 1, 1))
    else:
        p = _problem((9, 3, 4, 2, 3, 2, 5), seed=1)
        p = _repeated(p) if case == "repeated" else p
    bias = p["W"][0, :, 0, :]  # (o_blocks, o_size)

    @jax.jit
    def run(o, W, h, ii, oi, g, bias):
        f = lambda W, h: sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
        out, vjp = jax.vjp(f, W, h)
        dot = sparse_block_dot(W, h, ii, bias, oi, strategy=strategy)
        return out, vjp(g), dot

    out, (dW, dh), dot = run(p["o"], p["W"], p["h"], p["ii"], p["oi"], p["g"], bias)
    chex.assert_trees_all_close(out, gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"]), rtol=1e-12)
    want = gemv_grads_ref(p["W"], p["h"], p["ii"], p["oi"], p["g"])
    chex.assert_trees_all_close((dW, dh), want, rtol=1e-12, atol=1e-12)
    chex.assert_trees_all_close(dot, dot_ref(p["W"], p["h"], p["ii"], bias, p["oi"]), rtol=1e-12)


def _outer_autodiff(o, x, y, xi, yi, alpha):
    """The outer update written with plain jnp ops, differentiated by JAX itself."""
    upd = jnp.einsum("bis,bjt->bijst", x, y)
    return o.at[xi[:, :, None], yi[:, None, :]].add(alpha * upd)


@pytest.mark.parametrize("case", ["random", "repeated"])
def test_outer_values_and_grads(strategy, case):
    p = _problem((6, 3, 4, 2, 3, 2, 3), seed=2)
    p = _repeated(p) if case == "repeated" else p
    o, x, y, xi, yi = p["W"], p["h"], p["g"], p["ii"], p["oi"]
    alpha = np.float64(-0.7)
    G = np.random.default_rng(3).standard_normal(o.shape)
    outer = functools.partial(sparse_block_outer, strategy=strategy)

    def value_and_grads(f):
        loss = lambda o, x, y, a: jnp.sum(f(o, x, y, xi, yi, a) * G)
        return jax.jit(lambda *a: (f(*a[:3], xi, yi, a[3]), jax.grad(loss, (0, 1, 2, 3))(*a)))

    out, grads = value_and_grads(outer)(o, x, y, alpha)
    chex.assert_trees_all_close(out, outer_ref(o, x, y, xi, yi, alpha), rtol=1e-12)
    _, want = value_and_grads(_outer_autodiff)(o, x, y, alpha)
    chex.assert_trees_all_close(grads, want, rtol=1e-12, atol=1e-12)


def test_vmap_per_example_and_grads(strategy):
    p = _problem((5, 3, 4, 2, 2, 3, 2), seed=6)
    gemv = functools.partial(sparse_block_gemv, strategy=strategy)

    @jax.jit
    def run(W, o, h, ii, oi, g):
        out = jax.vmap(gemv, in_axes=(0, None, 0, 0, 0))(o, W, h, ii, oi)
        loss = lambda W, o, h, ii, oi, g: jnp.sum(gemv(o, W, h, ii, oi) * g)
        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0, 0, 0))
        return out, per_example(W, o, h, ii, oi, g)

    out, grads = run(p["W"], p["o"], p["h"], p["ii"], p["oi"], p["g"])
    chex.assert_trees_all_close(out, gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"]), rtol=1e-12)
    for b in range(5):
        want, _ = gemv_grads_ref(
            p["W"], p["h"][b : b + 1], p["ii"][b : b + 1], p["oi"][b : b + 1], p["g"][b : b + 1]
        )
        chex.assert_trees_all_close(grads[b], want, rtol=1e-12, atol=1e-12)


def _gemv_autodiff(o, W, h, ii, oi):
    return o + jnp.einsum("bis,bijst->bjt", h, W[ii[:, :, None], oi[:, None, :]])


def test_grad_of_grad(strategy):
    """Second derivatives (through the backward's own gemv/outer) match JAX's autodiff."""
    p = _problem((3, 2, 3, 2, 2, 2, 3), seed=7)
    ii, oi = p["ii"], p["oi"]
    ours = {
        "gemv": functools.partial(sparse_block_gemv, strategy=strategy),
        "outer": functools.partial(sparse_block_outer, strategy=strategy),
    }
    plain = {"gemv": _gemv_autodiff, "outer": _outer_autodiff}

    def second(ops):
        def f(W, h, y):
            g1 = jax.grad(lambda W, h: jnp.sum(jnp.sin(ops["gemv"](p["o"], W, h, ii, oi))), (0, 1))
            u = lambda W, h: jnp.sum(g1(W, h)[0] ** 2) + jnp.sum(g1(W, h)[1] ** 2)
            g2 = jax.grad(
                lambda W, x, y: jnp.sum(jnp.cos(ops["outer"](W, x, y, ii, oi, 0.3)) ** 2), (0, 1, 2)
            )
            v = lambda W, x, y: sum(jnp.sum(t**2) for t in g2(W, x, y))
            return jax.grad(u, (0, 1))(W, h), jax.grad(v, (0, 1, 2))(W, h, y)

        return jax.jit(f)(p["W"], p["h"], p["g"])

    chex.assert_trees_all_close(second(ours), second(plain), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision(strategy, dtype):
    p = _problem((6, 3, 3, 2, 2, 4, 4), seed=8)
    cast = lambda a: jnp.asarray(a, dtype)
    o, W, h = cast(p["o"]), cast(p["W"]), cast(p["h"])
    h32 = jnp.asarray(p["h"], jnp.float32)

    @jax.jit
    def run(o, W, h, h32, ii, oi):
        f = lambda W: sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
        mixed = sparse_block_gemv(o, W, h32, ii, oi, strategy=strategy)
        return f(W), jax.grad(lambda W: jnp.sum(f(W).astype(jnp.float32)))(W), mixed

    out, dW, mixed = run(o, W, h, h32, p["ii"], p["oi"])
    assert out.dtype == dW.dtype == mixed.dtype == dtype
    want = gemv_ref(*(np.asarray(a, np.float64) for a in (o, W, h)), p["ii"], p["oi"])
    tol = {jnp.float16: 2e-2, jnp.bfloat16: 1e-1}[dtype]
    chex.assert_trees_all_close(np.asarray(out, np.float64), want, rtol=tol, atol=tol)
    ones = np.ones(p["o"].shape)
    want_dW, _ = gemv_grads_ref(
        np.asarray(W, np.float64), np.asarray(h, np.float64), p["ii"], p["oi"], ones
    )
    chex.assert_trees_all_close(np.asarray(dW, np.float64), want_dW, rtol=tol, atol=tol)


@pytest.mark.parametrize("cpu_choice", ["loop", "grouped"])
def test_auto_platform_dependent_under_transforms(monkeypatch, cpu_choice):
    """``auto`` with a non-gather CPU choice (a ``platform_dependent``) under jit, vmap, grad of grad."""
    monkeypatch.setattr(_cost, "choose_strategy", lambda **kw: cpu_choice)
    p = _problem((5, 3, 4, 2, 2, 3, 2), seed=13)

    @jax.jit
    def run(W, o, h, ii, oi, g):
        out = jax.vmap(sparse_block_gemv, in_axes=(0, None, 0, 0, 0))(o, W, h, ii, oi)
        loss = lambda W, h: jnp.sum(jnp.sin(sparse_block_gemv(o, W, h, ii, oi)) * g)
        dh2 = jax.grad(lambda W: jnp.sum(jax.grad(loss, 1)(W, h) ** 2))(W)
        return out, jax.grad(loss, (0, 1))(W, h), dh2

    def plain(W, o, h, ii, oi, g):
        out = _gemv_autodiff(o, W, h, ii, oi)
        loss = lambda W, h: jnp.sum(jnp.sin(_gemv_autodiff(o, W, h, ii, oi)) * g)
        dh2 = jax.grad(lambda W: jnp.sum(jax.grad(loss, 1)(W, h) ** 2))(W)
        return out, jax.grad(loss, (0, 1))(W, h), dh2

    args = (p["W"], p["o"], p["h"], p["ii"], p["oi"], p["g"])
    chex.assert_trees_all_close(run(*args), jax.jit(plain)(*args), rtol=1e-10, atol=1e-10)


def test_auto_matches_reference():
    p = _problem((9, 3, 4, 2, 3, 2, 5), seed=12)
    out = jax.jit(sparse_block_gemv)(p["o"], p["W"], p["h"], p["ii"], p["oi"])
    chex.assert_trees_all_close(out, gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"]), rtol=1e-12)


def test_gather_chunks_under_budget(monkeypatch):
    """A budget smaller than the batch's blocks: chunks, with a padded last chunk."""
    p = _problem((7, 3, 4, 2, 3, 2, 5), seed=9)
    per_example = 2 * 3 * 2 * 5 * 8
    monkeypatch.setattr(_gather, "GATHER_BUDGET_BYTES", 3 * per_example)
    gemv = functools.partial(sparse_block_gemv, strategy="gather")
    loss = lambda W, h: jnp.sum(gemv(p["o"], W, h, p["ii"], p["oi"]) * p["g"])
    run = jax.jit(lambda W, h: (gemv(p["o"], W, h, p["ii"], p["oi"]), jax.grad(loss, (0, 1))(W, h)))
    out, (dW, dh) = run(p["W"], p["h"])
    chex.assert_trees_all_close(out, gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"]), rtol=1e-12)
    chex.assert_trees_all_close(
        (dW, dh), gemv_grads_ref(p["W"], p["h"], p["ii"], p["oi"], p["g"]), rtol=1e-12, atol=1e-12
    )


def test_out_of_range_under_jit_masked(strategy):
    p = _problem((4, 3, 4, 2, 2, 2, 3), seed=10)
    ii, oi = p["ii"].copy(), p["oi"].copy()
    ii[0, 0], oi[1, 1] = 7, -9
    out = jax.jit(functools.partial(sparse_block_gemv, strategy=strategy))(
        p["o"], p["W"], p["h"], ii, oi
    )
    h = p["h"].copy()
    h[0, 0] = 0.0
    want = gemv_ref(p["o"], p["W"], h, np.where(ii >= 3, 0, ii), np.where(oi < -4, 0, oi))
    want[1, 1] = p["o"][1, 1]
    chex.assert_trees_all_close(out, want, rtol=1e-12)


_NAMES = ("batch", "i_blocks", "o_blocks", "i_win", "o_win", "i_size", "o_size")
# (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size): the benchmark regimes and more.
_SHAPES = [
    (512, 1, 1000, 1, 1, 256, 1000),
    (256, 32, 32, 4, 4, 128, 128),
    (64, 8, 8, 2, 2, 512, 512),
    (1024, 256, 256, 8, 8, 16, 16),
    (256, 4, 4, 4, 4, 8, 8),
    SMALL,
]


def _costs(shape, **changes):
    dims = dict(zip(_NAMES, shape, strict=True)) | changes
    return _cost.estimate_costs(**dims, itemsize=4)


@pytest.mark.parametrize("shape", _SHAPES)
def test_cost_model_grows_with_the_work(shape):
    """Doubling the batch or a block size never makes a strategy cheaper."""
    base = _costs(shape)
    for name in ("batch", "i_size", "o_size", "i_win", "o_win"):
        bigger = _costs(shape, **{name: 2 * shape[_NAMES.index(name)]})
        for strategy, cost in base.items():
            assert bigger[strategy] >= cost, (name, strategy)


@pytest.mark.parametrize("shape", _SHAPES)
def test_cost_model_follows_the_block_grid(shape):
    """More blocks: ``dense`` (it multiplies the whole grid) costs more, ``gather`` and
    ``loop`` (they read only the selected blocks) cost the same, ``grouped`` never less."""
    base = _costs(shape)
    more = _costs(shape, i_blocks=4 * shape[1], o_blocks=4 * shape[2])
    assert more["dense"] > base["dense"]
    assert more["gather"] == pytest.approx(base["gather"])
    assert more["loop"] == pytest.approx(base["loop"])
    assert more["grouped"] >= base["grouped"] * (1 - 1e-12)


@pytest.mark.parametrize("shape", _SHAPES)
def test_auto_picks_the_cheapest_estimate(shape):
    dims = dict(zip(_NAMES, shape, strict=True))
    est = _cost.estimate_costs(**dims, itemsize=4)
    assert _cost.choose_strategy(**dims) == min(est, key=est.get)


def test_cost_model_tiny_problems_stay_on_gather():
    """Every strategy but ``gather`` must save the fixed ``setup`` time to be chosen."""
    dims = dict(zip(_NAMES, (1, 2, 2, 1, 1, 2, 2), strict=True))
    assert _cost.choose_strategy(**dims) == "gather"
    slow = dataclasses.replace(_cost.COSTS, setup=0.0, loop_step=0.0)
    est = _cost.estimate_costs(**dims, itemsize=4, costs=slow)
    assert est["loop"] < est["gather"]  # without the set-up cost another strategy would win


@pytest.mark.parametrize("cpu_choice", ["loop", "grouped"])
def test_auto_exports_each_platform_its_own_branch(monkeypatch, cpu_choice):
    """``auto`` lowers a ``platform_dependent``: the CPU artifact runs the CPU choice (a
    loop), the CUDA and TPU artifacts the loop-free ``gather``; one multi-platform
    artifact runs on CPU with the same values."""
    monkeypatch.setattr(_cost, "choose_strategy", lambda **kw: cpu_choice)
    p = _problem((3, 2, 3, 2, 2, 2, 3), seed=11)
    f = jax.jit(
        jax.grad(lambda W, h: jnp.sum(sparse_block_gemv(p["o"], W, h, p["ii"], p["oi"])), (0, 1))
    )
    loops = {
        platform: jax.export.export(f, platforms=[platform])(p["W"], p["h"])
        .mlir_module()
        .count("stablehlo.while")
        for platform in ("cpu", "cuda", "tpu")
    }
    assert loops["cpu"] > 0 and loops["cuda"] == 0 and loops["tpu"] == 0, loops
    exp = jax.export.export(f, platforms=["cpu", "cuda", "tpu"])(p["W"], p["h"])
    assert exp.platforms == ("cpu", "cuda", "tpu")
    chex.assert_trees_all_close(exp.call(p["W"], p["h"]), f(p["W"], p["h"]), rtol=1e-12)


@pytest.mark.parametrize("bad", ["fast", "Gather", None, 3])
def test_bad_strategy_name(bad):
    p = _problem(SMALL)
    msg = (
        r"strategy must be one of 'auto', 'gather', 'loop', 'dense', 'grouped', 'ragged' "
        r"\(or the experimental 'pallas'\); got"
    )
    with pytest.raises(ValueError, match=msg):
        sparse_block_gemv(p["o"], p["W"], p["h"], p["ii"], p["oi"], strategy=bad)
    with pytest.raises(ValueError, match=msg):
        sparse_block_dot(p["W"], p["h"], p["ii"], p["o"][0], p["oi"], strategy=bad)
    with pytest.raises(ValueError, match=msg):
        sparse_block_outer(p["W"], p["h"], p["g"], p["ii"], p["oi"], strategy=bad)
