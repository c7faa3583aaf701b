"""The GPU and TPU plans, checked on a CPU host through ``jax.export``.

``jax.export`` lowers for ``cuda`` and ``tpu`` without the hardware, so the
programs those backends would run are inspected here: no ``stablehlo.while``
when the gathered blocks fit the default device budget, few large chunks when
they do not, the ``ragged`` strategy's groups bounded by the touched blocks,
no float32 copy of low-precision weights; and the multi-platform artifact runs
on CPU with the CPU plan's values.
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import blocksparse_jax as bsj
from blocksparse_jax.blocksparse import _cost, _dispatch, _gather, _ragged
from tests.reference import gemv_grads_ref, gemv_ref, outer_ref

NAMES = ("batch", "i_blocks", "o_blocks", "i_win", "o_win", "i_size", "o_size")
# (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size); gathered float32 blocks in the comment.
FITS = {
    "wide_blocks": (512, 16, 16, 4, 4, 128, 128),  # 512 MiB
    "many_small": (2048, 128, 128, 8, 8, 16, 16),  # 128 MiB
    "one_input_block": (256, 1, 512, 1, 2, 256, 512),  # 256 MiB
    "tiny": (4, 5, 6, 2, 3, 3, 2),
}
# 8 GiB of gathered blocks: more than the 2 GiB default budget, too many dense activations.
TOO_BIG = (8192, 1024, 1024, 8, 8, 64, 64)


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _abstract(shape, dtype=jnp.float32):
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    return dict(
        o=_sds((batch, o_win, o_size), dtype),
        W=_sds((i_blocks, o_blocks, i_size, o_size), dtype),
        b=_sds((o_blocks, o_size), dtype),
        h=_sds((batch, i_win, i_size), dtype),
        g=_sds((batch, o_win, o_size), dtype),
        ii=_sds((batch, i_win), jnp.int32),
        oi=_sds((batch, o_win), jnp.int32),
    )


def _ops(strategy="auto"):
    """``(forward, gradient)`` of the three ops together, over ``(o, W, b, h, g, ii, oi)``."""

    def loss(o, W, b, h, g, ii, oi):
        out = bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
        d = bsj.sparse_block_dot(W, h, ii, b, oi, strategy=strategy)
        u = bsj.sparse_block_outer(W, h, g, ii, oi, strategy=strategy)
        return jnp.sum(out) + jnp.sum(d) + jnp.sum(u), (out, d, u)

    fwd = lambda *a: loss(*a)[1]
    grad = jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2, 3, 4))
    return fwd, grad


def _module(f, args, platform):
    return export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()


def _loops(text):
    return text.count("stablehlo.while")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", FITS)
def test_no_loop_when_the_work_fits(name, platform):
    a = _abstract(FITS[name])
    args = (a["o"], a["W"], a["b"], a["h"], a["g"], a["ii"], a["oi"])
    for f in _ops():
        assert _loops(_module(f, args, platform)) == 0


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_few_large_chunks_when_it_does_not_fit(platform):
    """``gather`` over 8 GiB of blocks: ``ceil(8 GiB / budget)`` chunks, one loop per gather."""
    a = _abstract(TOO_BIG)
    batch, _, _, i_win, o_win, i_size, o_size = TOO_BIG
    per_example = i_win * o_win * i_size * o_size * 4
    chunk = _gather.chunk_size(batch, per_example, _cost.accelerator_budget(platform))
    n = math.ceil(batch / chunk)
    assert n == 4
    f = lambda o, W, h, ii, oi: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy="gather")
    text = _module(f, (a["o"], a["W"], a["h"], a["ii"], a["oi"]), platform)
    assert _loops(text) == 1
    assert f"tensor<{n}x{chunk}x{i_win}x{i_size}xf32>" in text  # the chunked activations
    # On CUDA ``auto`` chooses that plan too (dense does not fit, ragged would pad per group).
    if platform == "cuda":
        dims = dict(zip(NAMES, TOO_BIG, strict=True))
        assert _cost.choose_accelerator_strategy(platform="cuda", **dims, itemsize=4) == "gather"


def test_a_smaller_budget_makes_more_chunks():
    """The budget is read when tracing: a new function traced inside the override."""
    a = _abstract(FITS["wide_blocks"])
    args = (a["o"], a["W"], a["h"], a["ii"], a["oi"])

    def gemv():
        return lambda o, W, h, ii, oi: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy="gather")

    assert _loops(_module(gemv(), args, "cuda")) == 0
    with bsj.blocksparse.accelerator_costs(default_budget_bytes=2**27, budget_fraction=0.0):
        text = _module(gemv(), args, "cuda")
    assert _loops(text) == 1 and "tensor<4x128x4x128xf32>" in text  # 512 MiB in 4 chunks


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("vocab, batch, width", [(65_536, 512, 256), (600_000, 256, 128)])
def test_h_softmax_loss_gradient_has_no_loop(vocab, batch, width, platform):
    params = jax.eval_shape(lambda: bsj.h_softmax_init(jax.random.key(0), width, vocab))
    x, target = _sds((batch, width)), _sds((batch,), jnp.int32)
    loss = lambda p, x, t: bsj.h_softmax_loss(x, p, t, n_outputs=vocab)
    grad = jax.value_and_grad(loss, argnums=(0, 1))
    assert _loops(_module(grad, (params, x, target), platform)) == 0


def test_accelerator_choice_is_never_a_loop():
    for shape in (*FITS.values(), TOO_BIG):
        dims = dict(zip(NAMES, shape, strict=True))
        plans = _dispatch.plan("auto", **dims, itemsize=4)
        assert {plans[p][0] for p in ("cuda", "rocm", "tpu")} <= set(_cost.ACCELERATOR_STRATEGIES)


def test_ragged_is_costed_by_its_lowering():
    """TPU's grouped matmul makes ``ragged`` cheap where XLA:GPU's padded expansion does not."""
    dims = dict(zip(NAMES, (512, 1, 1000, 1, 1, 256, 1000), strict=True))
    tpu = _cost.estimate_accelerator_costs(platform="tpu", **dims, itemsize=4)
    cuda = _cost.estimate_accelerator_costs(platform="cuda", **dims, itemsize=4)
    assert tpu["ragged"] < tpu["gather"] == cuda["gather"] < cuda["ragged"]
    with bsj.blocksparse.accelerator_costs(grouped_matmul_platforms=("tpu", "cuda")):
        assert _cost.estimate_accelerator_costs(platform="cuda", **dims, itemsize=4) == tpu


def test_ragged_needs_few_groups_for_auto():
    dims = dict(zip(NAMES, FITS["many_small"], strict=True))  # 16384 groups
    assert (
        _cost.estimate_accelerator_costs(platform="tpu", **dims, itemsize=4)["ragged"] == math.inf
    )
    with bsj.blocksparse.accelerator_costs(ragged_max_groups=2**20):
        assert _cost.choose_accelerator_strategy(platform="tpu", **dims, itemsize=4) == "ragged"


def test_accelerator_costs_override_restores():
    before = _cost.current_accelerator_costs()
    with bsj.blocksparse.accelerator_costs(bandwidth=1.0) as c:
        assert c.bandwidth == 1.0 and _cost.current_accelerator_costs() is c
    assert _cost.current_accelerator_costs() is before
    assert bsj.blocksparse.accelerator_budget("tpu") == before.default_budget_bytes


# --------------------------------------------------------------------------------------
# One artifact for every backend, run on CPU.
# --------------------------------------------------------------------------------------

# float64: grouped on CPU, gather on CUDA, ragged on TPU.
THREE_PLANS = (256, 1, 64, 1, 1, 64, 128)


def _problem(shape, dtype=np.float64, seed=0):
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    rng = np.random.default_rng(seed)
    return dict(
        o=rng.standard_normal((batch, o_win, o_size)).astype(dtype),
        W=rng.standard_normal((i_blocks, o_blocks, i_size, o_size)).astype(dtype),
        h=rng.standard_normal((batch, i_win, i_size)).astype(dtype),
        g=rng.standard_normal((batch, o_win, o_size)).astype(dtype),
        ii=rng.integers(0, i_blocks, (batch, i_win)).astype(np.int32),
        oi=rng.integers(0, o_blocks, (batch, o_win)).astype(np.int32),
    )


def test_each_platform_its_own_plan_and_cpu_runs_the_cpu_plan():
    dims = dict(zip(NAMES, THREE_PLANS, strict=True))
    plans = {p: q[0] for p, q in _dispatch.plan("auto", **dims, itemsize=8).items()}
    assert (plans["cpu"], plans["cuda"], plans["tpu"]) == ("grouped", "gather", "ragged")
    p = _problem(THREE_PLANS)

    def f(W, h):
        gemv = lambda W, h: bsj.sparse_block_gemv(p["o"], W, h, p["ii"], p["oi"])
        out, vjp = jax.vjp(gemv, W, h)
        return out, vjp(p["g"])

    args = (p["W"], p["h"])
    cpu = jax.jit(f).lower(*args).as_text()
    assert _loops(cpu) > 0 and "ragged_dot" not in cpu and "platform_index" not in cpu
    assert _loops(_module(f, args, "cuda")) == 0 and "ragged_dot" not in _module(f, args, "cuda")
    assert "chlo.ragged_dot" in _module(f, args, "tpu") and _loops(_module(f, args, "tpu")) == 0
    exp = export.export(jax.jit(f), platforms=["cpu", "cuda", "tpu"])(*args)
    out, (dW, dh) = exp.call(*args)
    want = gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"])
    chex.assert_trees_all_close(out, want, rtol=1e-12, atol=1e-12)
    want = gemv_grads_ref(p["W"], p["h"], p["ii"], p["oi"], p["g"])
    chex.assert_trees_all_close((dW, dh), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# The ragged strategy.
# --------------------------------------------------------------------------------------


def test_ragged_groups_are_the_touched_blocks():
    """12 pairs over a 1000-block grid: 12 groups, never one per block of ``W``."""
    a = _abstract((3, 10, 100, 2, 2, 8, 4))
    f = lambda o, W, h, ii, oi: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy="ragged")
    text = _module(f, (a["o"], a["W"], a["h"], a["ii"], a["oi"]), "tpu")
    assert "tensor<12x8x4xf32>" in text and "tensor<1000x" not in text


def test_ragged_outer_values_with_repeats_and_scale():
    p = _problem((6, 3, 2, 2, 3, 2, 4), seed=3)
    x_idx = np.zeros_like(p["ii"])  # every example on blocks (0, oi): long groups
    W0 = p["W"]
    out = jax.jit(
        lambda W, h, g: bsj.sparse_block_outer(W, h, g, x_idx, p["oi"], 0.25, strategy="ragged")
    )(W0, p["h"], p["g"])
    chex.assert_trees_all_close(
        out, outer_ref(W0, p["h"], p["g"], x_idx, p["oi"], 0.25), rtol=1e-12, atol=1e-12
    )


def test_ragged_under_vmap_and_grad_of_grad():
    p = _problem((5, 3, 4, 2, 2, 3, 2), seed=4)
    gemv = lambda W, h: bsj.sparse_block_gemv(p["o"], W, h, p["ii"], p["oi"], strategy="ragged")
    per_example = jax.vmap(
        lambda o, h, ii, oi: bsj.sparse_block_gemv(o, p["W"], h, ii, oi, strategy="ragged")
    )(p["o"], p["h"], p["ii"], p["oi"])
    chex.assert_trees_all_close(
        per_example, gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"]), rtol=1e-12
    )
    loss = lambda W, h: jnp.sum(gemv(W, h) ** 3)
    dh2 = jax.jit(jax.grad(lambda W: jnp.sum(jax.grad(loss, 1)(W, p["h"]) ** 2)))(p["W"])

    def plain(W, h):
        blocks = W[p["ii"][:, :, None], p["oi"][:, None, :]]
        return p["o"] + jnp.einsum("bis,bijst->bjt", h, blocks)

    ploss = lambda W, h: jnp.sum(plain(W, h) ** 3)
    want = jax.grad(lambda W: jnp.sum(jax.grad(ploss, 1)(W, p["h"]) ** 2))(p["W"])
    chex.assert_trees_all_close(dh2, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("w_dtype", "h_dtype"), [(jnp.float64, jnp.float64), (jnp.bfloat16, jnp.float32)]
)
@pytest.mark.parametrize("transpose_w", [False, True])
def test_ragged_in_chunks_of_groups_gives_gathers_values(transpose_w, w_dtype, h_dtype):
    """A budget of a few groups: ``ragged`` runs its groups in chunks, with gather's values
    (repeated blocks, a masked slot, and a non-finite activation that must stay in its pairs)."""
    p = _problem((6, 3, 4, 2, 3, 2, 4), seed=11)
    acc = np.dtype(np.float64 if h_dtype == jnp.float64 else np.float32)
    small = 3 * (2 * 4 * 8 + 12 * 4 * 8)  # about three groups' blocks and expansions
    # The gemv (or, transposed, its input gradient's gemv): its pairs are (example, i, j).
    W = jnp.asarray(p["W"], w_dtype)
    ii, oi = (p["oi"], p["ii"]) if transpose_w else (p["ii"], p["oi"])
    h = jnp.asarray(p["g"] if transpose_w else p["h"], h_dtype)
    valid_in = np.ones(ii.shape, bool)
    valid_in[2, 1] = False
    kw = dict(transpose_w=transpose_w, acc_dtype=acc)
    gemv = jax.jit(lambda *a: _ragged.gemv(*a, **kw, budget=small))
    gemv_ref = jax.jit(lambda *a: _gather.gemv(*a, **kw))
    for h_case in (h, h.at[0, 0, 0].set(jnp.nan)):  # chunks of ragged_dot, then gather's path
        args = (W, h_case, ii, oi, valid_in)
        chex.assert_trees_all_close(gemv(*args), gemv_ref(*args), rtol=1e-6, atol=1e-6)
    # The weight update, in chunks of groups: each block's sum added once.
    x, y = jnp.asarray(p["h"], h_dtype), jnp.asarray(p["g"], h_dtype)
    valid_x = np.ones(p["ii"].shape, bool)
    valid_x[2, 1] = False
    valid_y = np.ones(p["oi"].shape, bool)
    outer = jax.jit(lambda *a: _ragged.outer(*a, acc_dtype=acc, budget=small))
    outer_ref = jax.jit(lambda *a: _gather.outer(*a, acc_dtype=acc))
    f64 = lambda a: np.asarray(a, np.float64)
    for x_case in (x, x.at[1, 0, 0].set(jnp.inf)):
        args = (W, x_case, y, p["ii"], p["oi"], valid_x, valid_y)
        chex.assert_trees_all_close(f64(outer(*args)), f64(outer_ref(*args)), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Low precision stays low.
# --------------------------------------------------------------------------------------

LOW = (64, 32, 32, 2, 2, 64, 64)  # W: 32 * 32 * 64 * 64 bfloat16 = 8 MiB


def _bf16_problem():
    p = _problem(LOW, dtype=np.float32, seed=5)
    cast = lambda a: jnp.asarray(a, jnp.bfloat16)
    return cast(p["o"]), cast(p["W"]), cast(p["h"]), p["ii"], p["oi"]


@pytest.mark.parametrize("strategy", [s for s in _dispatch.STRATEGIES if s != "auto"])
def test_low_precision_forward_has_no_float32_copy_of_W(strategy):
    """bfloat16 weights: no buffer of ``W``'s shape in float32, compiled (CPU) or exported."""
    o, W, h, ii, oi = _bf16_problem()
    f = lambda o, W, h: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
    compiled = jax.jit(f).lower(o, W, h).compile()
    # A float32 copy of W alone is 2 * W.nbytes (a conversion fused into a gather is no buffer).
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * W.nbytes
    for platform in ("cuda", "tpu"):
        assert "x".join(map(str, W.shape)) + "xf32" not in _module(f, (o, W, h), platform)
    out = jax.jit(f)(o, W, h)
    want = gemv_ref(*(np.asarray(a, np.float64) for a in (o, W, h)), ii, oi)
    chex.assert_trees_all_close(np.asarray(out, np.float64), want, rtol=0.1, atol=0.1)


LOW_STRATEGIES = [s for s in _dispatch.STRATEGIES if s != "auto"] + ["pallas"]
LOW_GRAD = (16, 64, 32, 2, 2, 64, 64)  # W: 64 * 32 * 64 * 64 bfloat16 = 16 MiB; 64 pairs


def _unfused_buffers(hlo_text):
    """The shapes of the compiled program's instructions outside fusions (its buffers)."""
    fused = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo_text))
    shapes, skip = [], False
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if header:
            skip = header.group(1) in fused
        elif not skip:
            shapes += re.findall(r"= \(?(\w+\[[\d,]*\])", line)
    return shapes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("strategy", LOW_STRATEGIES)
def test_low_precision_gradient_has_no_float32_copy_of_W(strategy, dtype):
    """Low-precision weights: the weight gradient sums each touched block in float32, added once.

    Checked on the compiled CPU program (no float32 buffer of ``W``'s shape, temp
    memory under 1.5x ``W`` where a float32 copy alone is 2x; not for ``pallas``,
    whose CPU program is an interpreter) and on the ``cuda`` and ``tpu`` exports
    (no float32 tensor of ``W``'s shape at all).
    """
    p = _problem(LOW_GRAD, dtype=np.float32, seed=5)
    cast = lambda a: jnp.asarray(a, dtype)
    o, W, h, ii, oi = cast(p["o"]), cast(p["W"]), cast(p["h"]), p["ii"], p["oi"]

    def f(W, h):
        gemv = lambda W, h: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
        out, vjp = jax.vjp(gemv, W, h)
        return out, vjp(jnp.ones_like(out))

    if strategy != "pallas":  # on CPU, Pallas' interpret mode: an emulator that copies operands
        compiled = jax.jit(f).lower(W, h).compile()
        assert "f32[" + ",".join(map(str, W.shape)) + "]" not in _unfused_buffers(
            compiled.as_text()
        )
        assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * W.nbytes
    for platform in ("cuda", "tpu"):
        target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
        checks = [export.DisabledSafetyCheck.custom_call(target)] if strategy == "pallas" else []
        exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(W, h)
        assert "x".join(map(str, W.shape)) + "xf32" not in exp.mlir_module()
    out, (dW, dh) = jax.jit(f)(W, h)
    assert dW.dtype == dtype
    f64 = lambda a: np.asarray(a, np.float64)
    want_dW, want_dh = gemv_grads_ref(f64(W), f64(h), ii, oi, np.ones(o.shape))
    chex.assert_trees_all_close((f64(dW), f64(dh)), (want_dW, want_dh), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("strategy", LOW_STRATEGIES)
def test_low_precision_gradient_rounds_each_block_once(strategy):
    """Many pairs on one bfloat16 block: their float32 sum, rounded once (not once per pair)."""
    batch, s, t = 512, 8, 8
    rng = np.random.default_rng(9)
    W = jnp.zeros((2, 2, s, t), jnp.bfloat16)
    h = jnp.asarray(rng.uniform(0.5, 1.5, (batch, 1, s)), jnp.bfloat16)
    g = jnp.asarray(rng.uniform(0.5, 1.5, (batch, 1, t)), jnp.bfloat16)
    o = jnp.zeros((batch, 1, t), jnp.bfloat16)
    ii = np.zeros((batch, 1), np.int32)
    oi = np.ones((batch, 1), np.int32)
    gemv = lambda W: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
    _, vjp = jax.vjp(gemv, W)
    (dW,) = jax.jit(vjp)(g)
    got = np.asarray(dW, np.float64)
    want = np.einsum("bs,bt->st", np.asarray(h, np.float64)[:, 0], np.asarray(g, np.float64)[:, 0])
    # One rounding to bfloat16 (8 significant bits): within 2**-8 relative.
    np.testing.assert_allclose(got[0, 1], want, rtol=2**-8)
    assert not np.any(got[[0, 1, 1], [0, 0, 1]])  # the untouched blocks


# A bfloat16 W of 28 MiB (1,200 blocks of 128 x 96): 144 pairs, and 900 for the chunked sums.
MIXED = (24, 40, 30, 2, 3, 128, 96)
MIXED_MANY_PAIRS = (150, 40, 30, 2, 3, 128, 96)


@functools.cache
def _mixed_problem(shape):
    p = _problem(shape, dtype=np.float32, seed=7)
    return {k: (jnp.asarray(v, jnp.bfloat16) if k == "W" else v) for k, v in p.items()}


@pytest.mark.parametrize(
    ("shape", "o_dtype", "h_dtype"),
    [(MIXED, o, h) for o in (jnp.bfloat16, jnp.float32) for h in (jnp.bfloat16, jnp.float32)]
    + [(MIXED_MANY_PAIRS, jnp.float32, jnp.float32)],
    ids=["o-bf16-h-bf16", "o-bf16-h-f32", "o-f32-h-bf16", "o-f32-h-f32", "many-pairs"],
)
@pytest.mark.parametrize("strategy", [s for s in _dispatch.STRATEGIES if s != "auto"])
def test_low_precision_gradient_temp_whatever_the_other_dtypes(strategy, shape, o_dtype, h_dtype):
    """A bfloat16 ``W`` with ``o`` and ``h`` (and so the cotangent) in bfloat16 or float32.

    ``dW`` and ``dh`` together hold at most 1.5x ``W``'s bytes of XLA temporaries
    (the weight gradient's own buffer is 1x; a float32 copy of ``W`` alone would
    be 2x), with fewer pairs than blocks, however many; values against float64.
    """
    p = _mixed_problem(shape)
    W, ii, oi = p["W"], p["ii"], p["oi"]
    o, h, g = (jnp.asarray(p[k], d) for k, d in (("o", o_dtype), ("h", h_dtype), ("g", o_dtype)))
    assert ii.size * oi.shape[1] < W.shape[0] * W.shape[1]

    def f(W, h, g):
        gemv = lambda W, h: bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy)
        out, vjp = jax.vjp(gemv, W, h)
        return vjp(g)

    compiled = jax.jit(f).lower(W, h, g).compile()
    assert compiled.memory_analysis().temp_size_in_bytes <= 1.5 * W.nbytes
    dW, dh = compiled(W, h, g)
    assert (dW.dtype, dh.dtype) == (W.dtype, h.dtype)
    f64 = lambda a: np.asarray(a, np.float64)
    want_dW, want_dh = gemv_grads_ref(f64(W), f64(h), ii, oi, f64(g))
    for got, want, dtype in ((dW, want_dW, W.dtype), (dh, want_dh, h.dtype)):
        tol = 2**-7 if dtype == jnp.bfloat16 else 1e-5  # one rounding of the float32 sum
        np.testing.assert_allclose(f64(got), want, rtol=tol, atol=tol * np.max(np.abs(want)))


def test_low_precision_h_softmax_gradient_has_no_float32_copy_of_W2():
    """bfloat16 parameters: ``h_softmax_loss``'s gradient keeps ``W2`` low (CPU and exports)."""
    vocab, batch, width = 65_536, 200, 128  # a batch other than the 256 classes: no shape clash
    params = bsj.h_softmax_init(jax.random.key(0), width, vocab, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (batch, width), jnp.bfloat16)
    t = jax.random.randint(jax.random.key(2), (batch,), 0, vocab)
    grad = jax.jit(jax.grad(lambda p, x: bsj.h_softmax_loss(x, p, t), argnums=(0, 1)))
    W2 = params.W2
    compiled = grad.lower(params, x).compile()
    assert "f32[" + ",".join(map(str, W2.shape)) + "]" not in _unfused_buffers(compiled.as_text())
    assert compiled.memory_analysis().temp_size_in_bytes < 1.5 * W2.nbytes
    for platform in ("cuda", "tpu"):
        module = export.export(grad, platforms=[platform])(params, x).mlir_module()
        assert "x".join(map(str, W2.shape)) + "xf32" not in module
    dp, dx = grad(params, x)
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, x))
    want_dp, want_dx = jax.grad(lambda p, x: bsj.h_softmax_loss(x, p, t), argnums=(0, 1))(*f32)
    f64 = lambda a: np.asarray(a, np.float64)
    scale = np.max(np.abs(f64(want_dp.W2)))
    np.testing.assert_allclose(f64(dp.W2), f64(want_dp.W2), rtol=0.02, atol=0.02 * scale)
    np.testing.assert_allclose(
        f64(dx), f64(want_dx), rtol=0.05, atol=0.05 * np.max(np.abs(f64(want_dx)))
    )


def test_accelerator_costs_docstring_example():
    import doctest

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(_cost.accelerator_costs, "accelerator_costs", globs={}):
        assert runner.run(test).failed == 0


def test_cost_model_counts_its_chunks():
    dims = dict(zip(NAMES, TOO_BIG, strict=True))
    small = _cost.estimate_accelerator_costs(platform="cuda", **dims, itemsize=4)
    with bsj.blocksparse.accelerator_costs(default_budget_bytes=2**26):
        tiny_budget = _cost.estimate_accelerator_costs(platform="cuda", **dims, itemsize=4)
    assert tiny_budget["gather"] > small["gather"]
    assert re.fullmatch(r"\d+", str(_cost.accelerator_budget("cuda")))


def test_device_benchmark_stops_on_cpu(capsys):
    from benchmarks import device

    assert device.main([]) == 2
    assert "needs a GPU or TPU" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# The experimental Pallas kernel.
# --------------------------------------------------------------------------------------


def test_pallas_values_and_gradients_in_interpret_mode():
    """On CPU ``strategy="pallas"`` runs the TPU kernel in interpret mode: reference values."""
    p = _problem((4, 3, 5, 2, 3, 4, 8), seed=6)
    p["ii"][1] = 2  # a repeated block

    @jax.jit
    def run(W, h):
        gemv = lambda W, h: bsj.sparse_block_gemv(p["o"], W, h, p["ii"], p["oi"], strategy="pallas")
        out, vjp = jax.vjp(gemv, W, h)
        return out, vjp(p["g"])

    out, (dW, dh) = run(p["W"], p["h"])
    want = gemv_ref(p["o"], p["W"], p["h"], p["ii"], p["oi"])
    chex.assert_trees_all_close(out, want, rtol=1e-12, atol=1e-12)
    want_grads = gemv_grads_ref(p["W"], p["h"], p["ii"], p["oi"], p["g"])
    chex.assert_trees_all_close((dW, dh), want_grads, rtol=1e-12, atol=1e-12)
    assert "pallas" not in _dispatch.STRATEGIES  # experimental: never among auto's choices


@pytest.mark.parametrize(
    "platform, target", [("tpu", "tpu_custom_call"), ("cuda", "__gpu$xla.gpu.triton")]
)
def test_pallas_exports_its_kernel(platform, target):
    a = _abstract((8, 4, 4, 2, 2, 16, 32))

    def f(o, W, h, ii, oi):
        loss = lambda W, h: jnp.sum(bsj.sparse_block_gemv(o, W, h, ii, oi, strategy="pallas"))
        return jax.grad(loss, argnums=(0, 1))(W, h)

    checks = [export.DisabledSafetyCheck.custom_call(target)]
    exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
        a["o"], a["W"], a["h"], a["ii"], a["oi"]
    )
    assert exp.mlir_module().count(target) == 1  # the transposed gemv of dh; dW is gather's
