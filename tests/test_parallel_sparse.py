"""Sparse training over a mesh: ``value_and_sparse_grad`` through every ``parallel`` function.

Reference: the same lazy-Adam steps on one device.  The weights are never
gathered: no all-gather in the compiled step is as large as a weight.
"""

import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blocksparse_jax as bsj
from blocksparse_jax import parallel
from blocksparse_jax.optim import apply_updates, lazy

F32 = jnp.float32


def _all_gather_sizes(hlo: str) -> list[int]:
    sizes = []
    for m in re.finditer(r"= (\w+)\[([\d,]*)\][^ ]* all-gather\(", hlo):
        dims = [int(d) for d in m.group(2).split(",") if d]
        sizes.append(math.prod(dims))
    return sizes


def _train(loss, params, data, steps=3):
    # eps large enough that Adam does not amplify the float noise of a near-zero gradient
    # (the devices sum in another order)
    tx = lazy(optax.adam(0.1, eps=0.1))

    def step(state, *data):
        p, o = state
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a dense fallback would warn
            value, g = bsj.value_and_sparse_grad(loss)(p, *data)
        assert all(isinstance(s, bsj.SparseBlockGrad) for s in sparse_leaves(g)), g
        with jax.numpy_dtype_promotion("standard"):
            u, o = tx.update(g, o, p)
        return value, (apply_updates(p, u), o)

    state = (params, tx.init(params))
    jitted = jax.jit(step, donate_argnums=0)
    hlo = jitted.lower(state, *data).compile().as_text()
    for _ in range(steps):
        _, state = jitted(state, *data)
    return state[0], hlo


def sparse_leaves(g):
    leaves = g["out"]._asdict() if "out" in g else g
    return [leaves[k] for k in leaves if k in ("W", "b", "W2", "b2")]


@pytest.fixture(params=[(2, 4), (1, 8), (8, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def mesh(request):
    return jax.make_mesh(request.param, ("data", "model"))


@pytest.mark.parametrize("op", ["gemv", "dot"])
def test_block_sparse_ops_train_lazily_over_a_mesh(mesh, op):
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.standard_normal((6, 16, 8, 8)), F32)
    b = jnp.asarray(rng.standard_normal((16, 8)), F32)
    h = jnp.asarray(rng.standard_normal((8, 2, 8)), F32)
    ii = jnp.asarray(rng.integers(0, 6, (8, 2)), jnp.int32)
    oi = jnp.asarray(rng.integers(0, 16, (8, 3)), jnp.int32)
    o = jnp.zeros((8, 3, 8), F32)

    def loss(lib, **kw):
        def f(p, h, ii, oi):
            if op == "dot":
                out = lib.sparse_block_dot(p["W"], h, ii, p["b"], oi, **kw)
            else:  # a dense leaf beside the sparse one
                out = lib.sparse_block_gemv(o, p["W"], h * p["scale"][None, None, :], ii, oi, **kw)
            return jnp.mean(jnp.tanh(out) ** 2)

        return f

    params = {"W": W, "b": b} if op == "dot" else {"W": W, "scale": jnp.ones((8,), F32)}
    specs = {"W": P(None, "model"), "b": P("model"), "scale": P()}
    sharded = {
        k: jax.device_put(jnp.copy(v), NamedSharding(mesh, specs[k])) for k, v in params.items()
    }
    got, hlo = _train(loss(parallel, mesh=mesh), sharded, (h, ii, oi))
    want, _ = _train(loss(bsj), jax.tree.map(jnp.copy, params), (h, ii, oi))
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert got["W"].sharding.spec[:2] == (None, "model")
    assert max(_all_gather_sizes(hlo), default=0) < W.size // 4


@pytest.mark.slow
def test_hsoftmax_trains_lazily_over_a_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    V, n_in, batch = 60, 8, 8
    params = bsj.h_softmax_init(jax.random.key(0), n_in, V, n_classes=8)  # 8 classes of 8
    x = jax.random.normal(jax.random.key(1), (batch, n_in), F32)
    t = jax.random.randint(jax.random.key(2), (batch,), 0, V)
    mask = jnp.arange(batch) != 3

    def loss(lib, **kw):
        def f(p, x, t):
            out = lib.h_softmax_loss(x, p["out"], t, n_outputs=V, mask=mask, **kw)
            return out + 0.0 * jnp.sum(p["scale"])

        return f

    sharded = {
        "out": parallel.shard_params(jax.tree.map(jnp.copy, params), mesh),
        "scale": jnp.ones((2,), F32),
    }
    got, hlo = _train(loss(parallel, mesh=mesh), sharded, (x, t))
    want, _ = _train(loss(bsj), {"out": params, "scale": jnp.ones((2,), F32)}, (x, t))
    for a, b in zip(jax.tree.leaves(got["out"]), jax.tree.leaves(want["out"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert got["out"].W2.sharding.spec[:1] == ("model",)
    assert max(_all_gather_sizes(hlo), default=0) < params.W2.size // 4
