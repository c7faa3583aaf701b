"""Portability: every public function exports for CPU, CUDA and TPU at once.

``jax.export`` lowers a function for each platform without the hardware, so a
CPU-only custom call, a host callback or a lowering rule missing for CUDA or
TPU fails here.  The exported artifact is then run on CPU and must give the
values of the function it came from.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blocksparse_jax as bsj
from blocksparse_jax import blocksparse as bs
from blocksparse_jax import parallel

PLATFORMS = ("cpu", "cuda", "tpu")
TOL = dict(rtol=1e-12, atol=1e-12)

STRATEGIES = bs.STRATEGIES

# Custom calls that are part of portable StableHLO (sharding annotations), not kernels,
# and CHLO operations that some JAX releases serialize as custom calls (``chlo.ragged_dot``):
# every XLA backend decomposes them.
_PORTABLE_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def _portable(target: str) -> bool:
    return target in _PORTABLE_CUSTOM_CALLS or target.startswith("chlo.")


def _export_and_check(f, *args):
    """Exports ``jax.jit(f)`` for CPU, CUDA and TPU; checks the module and the CPU artifact."""
    exp = export.export(jax.jit(f), platforms=PLATFORMS)(*args)
    assert exp.platforms == PLATFORMS
    text = exp.mlir_module()
    targets = set(re.findall(r"custom_call @([\w.]+)", text))
    targets |= set(re.findall(r'call_target_name = "([\w.]+)"', text))
    assert all(map(_portable, targets)), f"non-portable custom calls: {targets}"
    assert "callback" not in text
    # The artifact runs on CPU with the same values.
    chex.assert_trees_all_close(exp.call(*args), jax.jit(f)(*args), **TOL)
    return exp


def _kw(strategy):
    return {} if strategy is None else {"strategy": strategy}


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = 4, 5, 6, 2, 3, 3, 2
    return dict(
        o=f(batch, o_win, o_size),
        W=f(i_blocks, o_blocks, i_size, o_size),
        b=f(o_blocks, o_size),
        h=f(batch, i_win, i_size),
        g=f(batch, o_win, o_size),
        ii=jnp.asarray(rng.integers(-i_blocks, i_blocks, (batch, i_win)), jnp.int32),
        oi=jnp.asarray(rng.integers(0, o_blocks, (batch, o_win)), jnp.int32),
        alpha=jnp.asarray(0.5),
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ops_and_gradients_export(problem, strategy):
    p, kw = problem, _kw(strategy)

    def ops_and_grads(o, W, b, h, g, alpha):
        def loss(o, W, b, h, g, alpha):
            out = bsj.sparse_block_gemv(o, W, h, p["ii"], p["oi"], **kw)
            d = bsj.sparse_block_dot(W, h, p["ii"], b, p["oi"], **kw)
            u = bsj.sparse_block_outer(W, h, g, p["ii"], p["oi"], alpha, **kw)
            return jnp.sum(out**2) + jnp.sum(jnp.sin(d)) + jnp.sum(jnp.cos(u)), (out, d, u)

        (_, values), grads = jax.value_and_grad(loss, argnums=range(6), has_aux=True)(
            o, W, b, h, g, alpha
        )
        return values, grads

    _export_and_check(ops_and_grads, p["o"], p["W"], p["b"], p["h"], p["g"], p["alpha"])


def test_auto_strategy_exports_a_per_platform_choice():
    """``strategy="auto"`` where the CPU choice is not ``gather``: ``lax.platform_dependent``.

    The exported module carries a branch on the platform index, and its CPU
    branch computes what the CPU strategy computes.
    """
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = 64, 2, 2, 4, 4, 8, 8
    cpu_choice = bs.choose_strategy(
        batch=batch,
        i_blocks=i_blocks,
        o_blocks=o_blocks,
        i_win=i_win,
        o_win=o_win,
        i_size=i_size,
        o_size=o_size,
        itemsize=8,
    )
    assert cpu_choice != "gather"
    rng = np.random.default_rng(1)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    o, W, h = (
        f(batch, o_win, o_size),
        f(i_blocks, o_blocks, i_size, o_size),
        f(batch, i_win, i_size),
    )
    ii = jnp.asarray(rng.integers(0, i_blocks, (batch, i_win)), jnp.int32)
    oi = jnp.asarray(rng.integers(0, o_blocks, (batch, o_win)), jnp.int32)

    def value_and_grads(o, W, h, strategy="auto"):
        loss = lambda W, h: jnp.sum(bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy) ** 2)
        return jax.value_and_grad(loss, argnums=(0, 1))(W, h)

    exp = _export_and_check(value_and_grads, o, W, h)
    assert "platform_index" in exp.mlir_module() and "stablehlo.case" in exp.mlir_module()
    chex.assert_trees_all_close(
        exp.call(o, W, h), jax.jit(value_and_grads, static_argnums=3)(o, W, h, cpu_choice), **TOL
    )


def test_second_order_gradient_exports(problem):
    p = problem

    def grad_of_grad(W, h):  # reverse over reverse (a custom_vjp has no forward mode)
        loss = lambda W, h: jnp.sum(bsj.sparse_block_gemv(p["o"], W, h, p["ii"], p["oi"]) ** 3)
        dh_norm = lambda W: jnp.sum(jax.grad(loss, argnums=1)(W, h) ** 2)
        return jax.grad(dh_norm)(W)

    _export_and_check(grad_of_grad, p["W"], p["h"])


@pytest.fixture(scope="module")
def hs():
    params = bsj.h_softmax_init(jax.random.key(0), 6, 23, n_classes=5, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 6), jnp.float64)
    target = jnp.asarray([0, 7, 22, 13], jnp.int32)
    return params, x, target


def test_h_log_softmax_exports(hs):
    params, x, target = hs
    _export_and_check(lambda x, p: bsj.h_log_softmax(x, p, n_outputs=23), x, params)
    _export_and_check(lambda x, p, t: bsj.h_log_softmax(x, p, t, n_outputs=23), x, params, target)


def _sgd_step(loss_fn):
    def step(params, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
        return loss, jax.tree.map(lambda a, g: a - 0.1 * g, params, grads)

    return step


def test_h_softmax_loss_training_step_exports(hs):
    params, x, target = hs
    mask = jnp.asarray([True, True, False, True])
    step = _sgd_step(lambda p, x, t: bsj.h_softmax_loss(x, p, t, n_outputs=23, mask=mask))
    exp = _export_and_check(step, params, x, target)
    # The exported step trains: a few steps of the artifact lower the loss.
    losses = []
    for _ in range(3):
        loss, params = exp.call(params, x, target)
        losses.append(float(loss))
    assert losses[2] < losses[0]


def test_sharded_training_step_exports(hs):
    """The shard_map step (2 x 4 mesh) exports for all three platforms and runs on 8 CPUs."""
    params, x, target = hs
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded = parallel.shard_params(params, mesh)
    expected = bsj.h_softmax_loss(x, params, target, n_outputs=23)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    target = jax.device_put(target, NamedSharding(mesh, P("data")))
    step = _sgd_step(lambda p, x, t: parallel.h_softmax_loss(x, p, t, n_outputs=23, mesh=mesh))
    exp = _export_and_check(step, sharded, x, target)
    assert exp.nr_devices == 8
    loss, _ = exp.call(sharded, x, target)
    chex.assert_trees_all_close(loss, expected, **TOL)
