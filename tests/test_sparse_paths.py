"""``value_and_sparse_grad`` on the paths next to the plain call: every transformation x every op.

Reference: ``jax.value_and_grad`` of the same function (values and every
gradient, the sparse ones densified), and which leaves come back sparse.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocksparse_jax as bsj
from blocksparse_jax import SparseBlockGrad, value_and_sparse_grad
from blocksparse_jax.optim import DenseGradientWarning

F32 = jnp.float32


def _dense(tree):
    return jax.tree.map(
        lambda g: g.todense() if isinstance(g, SparseBlockGrad) else g,
        tree,
        is_leaf=lambda g: isinstance(g, SparseBlockGrad),
    )


def _kinds(tree):
    leaves = jax.tree.leaves(tree, is_leaf=lambda g: isinstance(g, SparseBlockGrad))
    return ["sparse" if isinstance(g, SparseBlockGrad) else "dense" for g in leaves]


# --------------------------------------------------------------------------------------
# The ops, each as (params, one call on a batch of inputs)
# --------------------------------------------------------------------------------------


def _embedding():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"table": jax.random.normal(k1, (11, 3), F32), "w": jax.random.normal(k2, (3,), F32)}

    def call(p, ids):  # ids (batch,)
        return jnp.tanh(bsj.embedding_lookup(p["table"], ids) @ p["w"])

    def inputs(key, batch):
        return jax.random.randint(key, (batch,), 0, 11)

    return params, call, inputs, ["sparse", "dense"]


def _gemv():
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {
        "W": jax.random.normal(k1, (4, 5, 3, 2), F32),
        "h0": jax.random.normal(k2, (2, 3), F32),
    }

    def call(p, idx):  # idx (batch, 3): two input blocks, one output block
        h = jnp.broadcast_to(p["h0"], (idx.shape[0], 2, 3))
        o = jnp.zeros((idx.shape[0], 1, 2), F32)
        out = bsj.sparse_block_gemv(o, p["W"], h, idx[:, :2], idx[:, 2:])
        return jnp.sin(out).sum(axis=(1, 2))

    def inputs(key, batch):
        return jax.random.randint(key, (batch, 3), 0, 4)

    return params, call, inputs, ["sparse", "dense"]


def _dot():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    params = {
        "W": jax.random.normal(k1, (3, 6, 2, 4), F32),
        "b": jax.random.normal(k2, (6, 4), F32),
        "x": jax.random.normal(k3, (2,), F32),
    }

    def call(p, idx):  # idx (batch, 3): one input block, two output blocks
        h = jnp.broadcast_to(p["x"], (idx.shape[0], 1, 2)) * (1.0 + idx[:, :1, None].astype(F32))
        out = bsj.sparse_block_dot(p["W"], h, idx[:, :1] % 3, p["b"], idx[:, 1:])
        return jnp.cos(out).sum(axis=(1, 2))

    def inputs(key, batch):
        return jax.random.randint(key, (batch, 3), 0, 6)

    return params, call, inputs, ["sparse", "sparse", "dense"]


def _hsoftmax():
    params = bsj.h_softmax_init(jax.random.key(3), 5, 30)  # 6 classes of 5
    x0 = jax.random.normal(jax.random.key(4), (5,), F32)

    def call(p, t):  # t (batch,)
        x = jnp.tanh(x0[None, :] * (1.0 + t[:, None].astype(F32) / 7.0))
        return bsj.h_softmax_loss(x, p, t, n_outputs=30, reduction="none")

    def inputs(key, batch):
        return jax.random.randint(key, (batch,), 0, 30)

    return params, call, inputs, ["dense", "dense", "sparse", "sparse"]


OPS = {"embedding": _embedding, "gemv": _gemv, "dot": _dot, "hsoftmax": _hsoftmax}


# --------------------------------------------------------------------------------------
# The transformations around the call, each a loss(params, inputs (T, batch, ...))
# --------------------------------------------------------------------------------------


def _plain(call):
    return lambda p, xs: jnp.sum(call(p, xs[0]))


def _scan(call):  # an RNN-like loop over time steps
    def loss(p, xs):
        def step(c, x):
            return c + jnp.sum(call(p, x)), None

        return jax.lax.scan(step, jnp.zeros((), F32), xs)[0]

    return loss


def _scan_nested(call):
    def loss(p, xs):
        def outer(c, x2):
            inner = jax.lax.scan(lambda c2, x: (c2 + jnp.sum(call(p, x)), None), c, x2)[0]
            return inner, None

        return jax.lax.scan(outer, jnp.zeros((), F32), xs.reshape(2, -1, *xs.shape[1:]))[0]

    return loss


def _fori(call):
    def loss(p, xs):
        return jax.lax.fori_loop(0, xs.shape[0], lambda i, c: c + jnp.sum(call(p, xs[i])), 0.0)

    return loss


def _cond(call):
    def loss(p, xs):
        pick = jnp.sum(xs) % 2 == 0
        return jax.lax.cond(
            pick, lambda: jnp.sum(call(p, xs[0])), lambda: 2.0 * jnp.sum(call(p, xs[1]))
        )

    return loss


def _switch(call):
    def loss(p, xs):
        i = jnp.sum(xs) % 3
        branches = [
            lambda: jnp.sum(call(p, xs[0])),
            lambda: jnp.zeros((), F32),
            lambda: jnp.sum(call(p, xs[1])) + jnp.sum(call(p, xs[2])),
        ]
        return jax.lax.switch(i, branches)

    return loss


def _vmap(call):  # per-example calls, the weights shared
    def loss(p, xs):
        return jnp.sum(jax.vmap(lambda x: call(p, x[None]))(xs[0]))

    return loss


def _checkpoint(call):
    return lambda p, xs: jax.checkpoint(lambda p: jnp.sum(call(p, xs[0])))(p)


def _inner_jit(call):
    return lambda p, xs: jax.jit(lambda p, x: jnp.sum(call(p, x)))(p, xs[0])


def _closure(call):  # the same weights also closed over, and used: jax.grad ignores the closure
    def loss(p, xs):
        return jnp.sum(call(p, xs[0])) + jnp.sum(call(_closure.params, xs[1]))

    return loss


TRANSFORMS = {
    "plain": _plain,
    "scan": _scan,
    "scan_nested": _scan_nested,
    "fori_loop": _fori,
    "cond": _cond,
    "switch": _switch,
    "vmap": _vmap,
    "checkpoint": _checkpoint,
    "inner_jit": _inner_jit,
    "closure": _closure,
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_sparse_equals_dense(op, transform):
    params, call, inputs, kinds = OPS[op]()
    _closure.params = params
    loss = TRANSFORMS[transform](call)
    xs = inputs(jax.random.key(5), 4 * 3).reshape(4, 3, *inputs(jax.random.key(5), 1).shape[1:])

    kinds_seen = []

    @jax.jit
    def sparse(p, xs):
        v, g = value_and_sparse_grad(loss)(p, xs)
        kinds_seen.append(_kinds(g))
        return v, _dense(g)

    got_v, got_g = sparse(params, xs)
    want_v, want_g = jax.jit(jax.value_and_grad(loss))(params, xs)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert kinds_seen == [kinds]


@pytest.mark.slow
@pytest.mark.parametrize("op", list(OPS))
def test_outer_grad_through_value_and_gradient(op):
    """An outer ``jax.grad`` / ``jax.jacrev`` through ``value_and_sparse_grad`` is that of ``jax.value_and_grad``."""
    params, call, inputs, _ = OPS[op]()
    xs = inputs(jax.random.key(6), 4)
    loss = lambda p: jnp.sum(call(p, xs) ** 2)

    def through(vg):
        def f(p):
            v, g = vg(loss)(p)
            return v + 0.5 * sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(_dense(g)))

        return f

    got = jax.jit(jax.grad(through(value_and_sparse_grad)))(params)
    want = jax.jit(jax.grad(through(jax.value_and_grad)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The Jacobian of the sparse leaf's gradient with respect to that leaf.
    leaves, treedef = jax.tree.flatten(params)
    k = kinds_sparse = [i for i, kind in enumerate(OPS[op]()[3]) if kind == "sparse"][0]

    def jac(vg):
        def grad_of(w):
            p = jax.tree.unflatten(treedef, [w if i == k else a for i, a in enumerate(leaves)])
            return jax.tree.leaves(_dense(vg(loss)(p)[1]))[k]

        return jax.jit(jax.jacrev(grad_of))(leaves[k])

    np.testing.assert_allclose(
        jac(value_and_sparse_grad), jac(jax.value_and_grad), rtol=1e-4, atol=1e-6
    )
    del kinds_sparse


def test_while_loop_and_custom_vjp_fall_back_to_dense_with_a_warning():
    params, call, inputs, _ = _embedding()
    xs = inputs(jax.random.key(7), 6).reshape(2, 3)

    @jax.custom_vjp
    def passthrough(t):
        return t

    passthrough.defvjp(lambda t: (t, None), lambda _, g: (g,))

    losses = {
        "while_loop": lambda p: jax.lax.while_loop(
            lambda c: c[0] < 2,
            lambda c: (c[0] + 1, c[1] + jnp.sum(call(p, xs[c[0]]))),
            (0, jnp.zeros((), F32)),
        )[1],
        "custom_vjp": lambda p: jnp.sum(call({**p, "table": passthrough(p["table"])}, xs[0])),
        "tied": lambda p: jnp.sum(call(p, xs[0])) + jnp.sum(p["table"] ** 2),
        "cast": lambda p: jnp.sum(
            call({**p, "table": p["table"].astype(jnp.bfloat16).astype(F32)}, xs[0])
        ),
        "vmapped weight": lambda p: jnp.sum(
            jax.vmap(lambda t: call({**p, "table": t}, xs[0]))(jnp.stack([p["table"]] * 2))
        ),
    }
    for name, loss in losses.items():
        if name == "while_loop":  # reverse mode through while_loop fails in JAX as well
            with pytest.warns(DenseGradientWarning, match=r"argument 0\['table'\].*while_loop"):
                with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
                    value_and_sparse_grad(loss)(params)
            continue
        with pytest.warns(DenseGradientWarning, match=r"argument 0\['table'\] gets a dense"):
            v, g = jax.jit(value_and_sparse_grad(loss))(params)
        want_v, want_g = jax.value_and_grad(loss)(params)
        np.testing.assert_allclose(v, want_v, rtol=1e-6, err_msg=name)
        assert not isinstance(g["table"], SparseBlockGrad), name
        np.testing.assert_allclose(g["table"], want_g["table"], rtol=1e-5, atol=1e-6, err_msg=name)


def test_aliased_leaves_each_get_their_gradient():
    table = jax.random.normal(jax.random.key(8), (9, 2), F32)
    params = {"a": table, "b": table}  # the same array under two keys
    ids_a, ids_b = jnp.array([1, 2, 2]), jnp.array([2, 7])

    def loss(p):
        ea, eb = bsj.embedding_lookup(p["a"], ids_a), bsj.embedding_lookup(p["b"], ids_b)
        return jnp.sum(ea**2) + jnp.sum(jnp.sin(eb))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v, g = value_and_sparse_grad(loss)(params)
    want_v, want_g = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(v, want_v, rtol=1e-6)
    for k in "ab":
        assert isinstance(g[k], SparseBlockGrad)
        np.testing.assert_allclose(g[k].todense(), want_g[k], rtol=1e-6)
    assert np.asarray(g["a"].indices).tolist() == [1, 2, 9]


def test_grads_leaving_the_jit_are_refused_clearly():
    params, call, inputs, _ = _embedding()
    loss = lambda p: jnp.sum(call(p, jnp.array([1, 2])))
    with pytest.raises(TypeError, match="returned from the jax.jit"):
        jax.jit(value_and_sparse_grad(loss))(params)
