"""Sparse gradients (``value_and_sparse_grad``) and lazy optimizers (``optim.lazy``).

References: ``jax.value_and_grad`` (dense gradients), a NumPy lazy Adam written
from the formulas, plain SGD, ``optax.adam`` when every block is touched, and
PyTorch's ``nn.Embedding(sparse=True)`` + ``optim.SparseAdam``.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blocksparse_jax
from blocksparse_jax import (
    SparseBlockGrad,
    embedding_lookup,
    h_softmax_init,
    h_softmax_loss,
    sparse_block_dot,
    sparse_block_gemv,
    value_and_sparse_grad,
)
from blocksparse_jax.optim import _inplace, apply_updates, lazy, training_classes

F32 = jnp.float32


def _dense(tree):
    return jax.tree.map(
        lambda g: g.todense() if isinstance(g, SparseBlockGrad) else g,
        tree,
        is_leaf=lambda g: isinstance(g, SparseBlockGrad),
    )


def _hs_case(V=100, n_in=8, batch=6, seed=0, n_classes=None):
    params = h_softmax_init(jax.random.key(seed), n_in, V, n_classes=n_classes)
    x = jax.random.normal(jax.random.key(seed + 1), (batch, n_in), F32)
    t = jax.random.randint(jax.random.key(seed + 2), (batch,), 0, V)
    return params, x, t


# --------------------------------------------------------------------------------------
# value_and_sparse_grad against jax.value_and_grad
# --------------------------------------------------------------------------------------


@pytest.fixture(params=["jit", "vmap"])
def wrap(request):
    """Runs ``f`` under ``jax.jit``, or under ``jax.vmap`` (a leading axis of 1) and ``jax.jit``."""
    if request.param == "jit":
        return jax.jit

    def vmapped(f):
        def g(*args):
            out = jax.vmap(f)(*jax.tree.map(lambda a: jnp.asarray(a)[None], args))
            return jax.tree.map(lambda a: a[0], out)

        return jax.jit(g)

    return vmapped


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hsoftmax_grads_equal_dense(wrap, reduction):
    params, x, t = _hs_case(V=97)  # 10 classes of 10: padded slots
    mask = jnp.array([True, True, False, True, True, True])
    t = t.at[2].set(-1)  # masked padding target

    def loss(p, x):
        return h_softmax_loss(x, p, t, n_outputs=97, mask=mask, reduction=reduction)

    def both(p, x):
        v, g = value_and_sparse_grad(loss, argnums=(0, 1))(p, x)
        return v, _dense(g)

    v, g = wrap(both)(params, x)
    want_v, want_g = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    chex.assert_trees_all_close((v, g), (want_v, want_g), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_hsoftmax_sparse_leaves_hold_the_target_classes():
    params, x, t = _hs_case()
    _, g = value_and_sparse_grad(lambda p: h_softmax_loss(x, p, t, n_outputs=100))(params)
    assert isinstance(g.W2, SparseBlockGrad) and isinstance(g.b2, SparseBlockGrad)
    assert not isinstance(g.W1, SparseBlockGrad)
    want = np.unique(np.asarray(t) // 10)
    got = np.asarray(g.W2.indices)
    np.testing.assert_array_equal(got[: len(want)], want)
    assert (got[len(want) :] == 10).all()  # padding is n_blocks
    assert int(g.W2.n_touched()) == len(want)
    # the summed blocks are the dense gradient's rows at those classes
    dense = jax.grad(lambda p: h_softmax_loss(x, p, t, n_outputs=100))(params)
    np.testing.assert_allclose(
        np.asarray(g.W2.values)[: len(want)], np.asarray(dense.W2)[want], rtol=1e-5, atol=1e-6
    )


def test_block_sparse_ops_grads_equal_dense(wrap):
    k = jax.random.split(jax.random.key(3), 6)
    W = jax.random.normal(k[0], (5, 6, 3, 4), F32)
    b = jax.random.normal(k[1], (6, 4), F32)
    h = jax.random.normal(k[2], (7, 2, 3), F32)
    ii = jax.random.randint(k[3], (7, 2), -5, 5)  # negative indices count from the end
    oi = jax.random.randint(k[4], (7, 3), 0, 6)
    o = jax.random.normal(k[5], (7, 3, 4), F32)

    def f(W, b, h):
        y = sparse_block_dot(W, h, ii, b, oi)
        z = sparse_block_gemv(o, W, jnp.tanh(h), ii, oi)  # a second use of W: summed
        return jnp.sum(jnp.sin(y)) + jnp.sum(z * z)

    def both(W, b, h):
        v, g = value_and_sparse_grad(f, argnums=(0, 1, 2))(W, b, h)
        assert isinstance(g[0], SparseBlockGrad) and isinstance(g[1], SparseBlockGrad)
        return v, _dense(g)

    got = wrap(both)(W, b, h)
    want = jax.value_and_grad(f, argnums=(0, 1, 2))(W, b, h)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_left", [False, True])
@pytest.mark.parametrize("n_blocks", [9, 40])  # capacity n_blocks (fewer than pairs), pairs
def test_from_pairs_equals_a_numpy_loop(wrap, with_left, n_blocks):
    """Slots, summed blocks and the dense gradient against plain loops over the pairs."""
    rng = np.random.default_rng(n_blocks)
    pairs, a, b = 14, 3, 2
    pb = rng.integers(-3, n_blocks + 3, pairs).astype(np.int32)  # duplicates and padding
    left = rng.standard_normal((pairs, a)).astype(np.float32) if with_left else None
    right = rng.standard_normal((pairs, b)).astype(np.float32)
    shape = (n_blocks, a, b) if with_left else (n_blocks, b)

    def build(pb, left, right):
        g = SparseBlockGrad.from_pairs(pb, left, right, shape=shape)
        again = g.with_values(g.values)  # the values alone, without the pairs they came from
        return g.indices, g.slots.pairs.slot, g.values, g.todense(), g.n_touched(), again.todense()

    indices, slots, blocks, dense, n_touched, again = wrap(build)(pb, left, right)
    touched = sorted({int(k) for k in pb if 0 <= k < n_blocks})
    capacity = min(pairs, n_blocks)
    want_idx = touched + [n_blocks] * (capacity - len(touched))
    want_blocks = np.zeros((capacity, *shape[1:]), np.float32)
    want_dense = np.zeros(shape, np.float32)
    for p, k in enumerate(pb):
        if 0 <= k < n_blocks:
            term = np.outer(left[p], right[p]) if with_left else right[p]
            want_blocks[touched.index(k)] += term
            want_dense[k] += term
            assert int(slots[p]) == touched.index(k)
        else:
            assert int(slots[p]) == capacity  # padding
    np.testing.assert_array_equal(np.asarray(indices), want_idx)
    assert int(n_touched) == len(touched)
    np.testing.assert_allclose(np.asarray(blocks), want_blocks, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(again), want_dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dense), want_dense, rtol=1e-6, atol=1e-6)


def test_embedding_grads_equal_dense_and_has_aux():
    table = jax.random.normal(jax.random.key(0), (50, 4), F32)
    ids = jnp.array([[3, 7, 3], [49, 0, 7]])

    def f(table, w):
        e = embedding_lookup(table, ids)
        return jnp.sum(jnp.tanh(e @ w)), e.shape

    (v, aux), g = value_and_sparse_grad(f, argnums=(0, 1), has_aux=True)(table, jnp.ones((4,), F32))
    (wv, waux), wg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(table, jnp.ones((4,), F32))
    assert aux == waux == (2, 3, 4)
    assert isinstance(g[0], SparseBlockGrad) and g[0].indices.shape == (6,)
    np.testing.assert_array_equal(np.asarray(g[0].indices), [0, 3, 7, 49, 50, 50])
    chex.assert_trees_all_close((v, _dense(g)), (wv, wg), rtol=1e-6, atol=1e-6)


def test_sparse_updates_wait_only_for_the_gradients_that_read_the_weight():
    """W2's in-place update waits for x's gradient (computed through W2), not for W1's."""
    from blocksparse_jax.optim import _trace

    params, x, t = _hs_case(V=64, n_in=8, batch=6)
    loss = lambda W1, b1, W2, b2, x: h_softmax_loss(
        x, blocksparse_jax.HSoftmaxParams(W1, b1, W2, b2), t, n_outputs=64
    )
    plan = _trace.plan(jax.make_jaxpr(loss)(*params, x), 5)
    # leaves: W1, b1, W2, b2, then x
    assert plan.sparse == (2, 3)
    assert plan.readers == {2: frozenset({4}), 3: frozenset({4})}


def _stacked_loss(p, h, i1, o1, o2):
    """Two block-sparse layers, the second fed by the first: no dense leaf between them."""
    b = jnp.zeros(p["A"].shape[1::2], p["A"].dtype)
    z = sparse_block_dot(p["A"], h, i1, b, o1)
    return jnp.mean(sparse_block_dot(p["B"], jnp.tanh(z), o1, b, o2) ** 2)


@pytest.mark.slow
def test_stacked_sparse_layers_grads_and_in_place_update(optax_promotion):
    rng = np.random.default_rng(11)
    p = {k: jnp.asarray(rng.standard_normal((4, 4, 3, 3)), F32) for k in ("A", "B")}
    h = jnp.asarray(rng.standard_normal((5, 2, 3)), F32)
    i1, o1, o2 = (jnp.asarray(rng.integers(0, 4, (5, 2)), jnp.int32) for _ in range(3))
    _, g = value_and_sparse_grad(_stacked_loss)(p, h, i1, o1, o2)
    want = jax.grad(_stacked_loss)(p, h, i1, o1, o2)
    for k in ("A", "B"):
        assert isinstance(g[k], SparseBlockGrad)
        np.testing.assert_allclose(g[k].todense(), want[k], rtol=1e-5, atol=1e-6)

    # A lazy Adam step, compiled: the upper layer's weight is updated in place after the
    # backward pass through it (no copy of a 16 MiB weight).
    shape = (32, 32, 64, 64)
    params = {k: jax.ShapeDtypeStruct(shape, F32) for k in ("A", "B")}
    tx = lazy(optax.adam(1e-3))
    state = (params, jax.eval_shape(tx.init, params))
    hs = jax.ShapeDtypeStruct((64, 2, 64), F32)
    idx = jax.ShapeDtypeStruct((64, 2), jnp.int32)

    def step(state, h, i1, o1, o2):
        params, opt = state
        value, g = value_and_sparse_grad(_stacked_loss)(params, h, i1, o1, o2)
        u, opt = tx.update(g, opt, params)
        return value, (apply_updates(params, u), opt)

    compiled = jax.jit(step, donate_argnums=0).lower(state, hs, idx, idx, idx).compile()
    w_bytes = np.prod(shape) * 4
    assert compiled.memory_analysis().temp_size_in_bytes <= w_bytes / 4  # a copy: >= 1x


def test_tied_leaf_gets_the_full_dense_gradient():
    """An embedding table also used as an output layer: its gradient is dense and complete."""
    table = jax.random.normal(jax.random.key(0), (20, 4), F32)
    ids = jnp.array([1, 5, 5])

    def f(table):
        h = embedding_lookup(table, ids)
        return jnp.sum(jax.nn.log_softmax(h @ table.T))

    with pytest.warns(blocksparse_jax.optim.DenseGradientWarning, match="also used by"):
        v, g = jax.jit(value_and_sparse_grad(f))(table)
    assert not isinstance(g, SparseBlockGrad)
    chex.assert_trees_all_close((v, g), jax.value_and_grad(f)(table), rtol=1e-5, atol=1e-6)


def test_no_sparse_use_is_jax_value_and_grad():
    f = lambda w: jnp.sum(w**2)
    chex.assert_trees_all_equal(
        value_and_sparse_grad(f)(jnp.ones(3, F32)), jax.value_and_grad(f)(jnp.ones(3, F32))
    )


def test_bad_input():
    with pytest.raises(TypeError, match="argnums must be an int or a tuple"):
        value_and_sparse_grad(lambda w: w, argnums="0")
    with pytest.raises(TypeError, match="argument 0 has dtype int32"):
        value_and_sparse_grad(lambda w: w)(jnp.ones(3, jnp.int32))
    table = jnp.ones((4, 2), F32)
    with pytest.raises(TypeError, match="real scalar"):
        value_and_sparse_grad(lambda t: embedding_lookup(t, jnp.array([1])))(table)
    with pytest.raises(IndexError, match="ids holds 4 at position"):
        embedding_lookup(table, jnp.array([4]))
    with pytest.raises(TypeError, match="ids must be an integer array"):
        embedding_lookup(table, jnp.array([1.0]))
    with pytest.raises(ValueError, match=r"table must be 2-D \(n_rows, dim\)"):
        embedding_lookup(jnp.ones(3, F32), jnp.array([1]))


# --------------------------------------------------------------------------------------
# lazy(...) against references
# --------------------------------------------------------------------------------------


@pytest.fixture
def optax_promotion():
    """optax's own arithmetic mixes Python floats and int32 counts: standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _force(monkeypatch, path: str, k: int = 3):
    """Every sparse leaf updated by ``path``: vectorised, chunks of ``k`` blocks, one block at a time."""
    choice = {"vector": ("vectorised", 0), "chunks": ("chunks", k), "loop": ("blocks", 1)}[path]
    monkeypatch.setattr(
        _inplace,
        "choose_path",
        lambda g, p, n: (
            choice[0],
            min(choice[1], g.capacity) if choice[0] == "chunks" else choice[1],
        ),
    )


@pytest.fixture(params=["vector", "loop", "chunks"])
def path(request, monkeypatch, optax_promotion):
    """Runs a test with the vectorised update, the block-by-block loop and chunks of 3 blocks."""
    _force(monkeypatch, request.param)
    return request.param


def _steps(n_steps, V=60, n_in=6, batch=5):
    """Targets per step that touch different (overlapping) class sets."""
    keys = jax.random.split(jax.random.key(7), n_steps)
    return [
        jax.random.randint(k, (batch,), 0, 24 + 5 * s) for s, k in enumerate(keys)
    ]  # classes < 5


def _hs_train(tx, params, x, targets, *, sparse: bool, V=60):
    loss = lambda p, t: h_softmax_loss(x, p, t, n_outputs=V)
    state = tx.init(params)
    history = []

    @jax.jit
    def step(params, state, t):
        if sparse:
            _, g = value_and_sparse_grad(loss)(params, t)
            u, state = tx.update(g, state, params)
            return apply_updates(params, u), state
        g = jax.grad(loss)(params, t)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for t in targets:
        params, state = step(params, state, t)
        history.append((params, state))
    return history


def test_lazy_sgd_equals_dense_sgd(path):
    params, x, _ = _hs_case(V=60, n_in=6, batch=5)
    targets = _steps(3)
    got = _hs_train(lazy(optax.sgd(0.3)), params, x, targets, sparse=True)
    want = _hs_train(optax.sgd(0.3), params, x, targets, sparse=False)
    for (gp, _), (wp, _) in zip(got, want, strict=True):
        chex.assert_trees_all_close(gp, wp, rtol=1e-6, atol=1e-7)


def _numpy_lazy_adam(params, grads_per_step, touched_per_step, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Lazy Adam from the formulas (optax's eps placement), one NumPy block at a time."""
    p = np.array(params, np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    out = []
    for step, (g, touched) in enumerate(zip(grads_per_step, touched_per_step, strict=True), 1):
        for k in touched:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            mhat, vhat = m[k] / (1 - b1**step), v[k] / (1 - b2**step)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
        out.append((p.copy(), m.copy(), v.copy()))
    return out


def test_lazy_adam_equals_numpy_reference_step_by_step(path):
    params, x, _ = _hs_case(V=60, n_in=6, batch=5)
    targets = _steps(4)
    got = _hs_train(lazy(optax.adam(0.05)), params, x, targets, sparse=True)
    # the reference gets the dense gradients of the parameters the lazy run had at each step
    p = params
    g_steps, touched = [], []
    grad = jax.jit(jax.grad(lambda p, t: h_softmax_loss(x, p, t, n_outputs=60)))
    for t in targets:
        g_steps.append(np.asarray(grad(p, t).W2))
        touched.append(np.unique(np.asarray(t) // 8))
        p = got[len(g_steps) - 1][0]
    ref = _numpy_lazy_adam(params.W2, g_steps, touched, 0.05)
    for (gp, gs), (rp, rm, rv) in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(gp.W2), rp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gs[0].mu.W2), rm, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gs[0].nu.W2), rv, rtol=1e-5, atol=1e-10)
    # untouched blocks: parameters and moments exactly as they were
    never = sorted(set(range(8)) - set(np.concatenate(touched).tolist()))
    assert never, "the case must leave some class untouched"
    np.testing.assert_array_equal(np.asarray(got[-1][0].W2)[never], np.asarray(params.W2)[never])
    assert not np.asarray(got[-1][1][0].mu.W2)[never].any()
    assert int(got[-1][1][0].count) == 4  # the step count is global


@pytest.mark.parametrize("distinct", [7, 20])  # chunks of padding skipped / every chunk run
def test_lazy_adam_in_chunks_equals_numpy_reference(distinct, monkeypatch, optax_promotion):
    """The vectorised update in chunks of slots (small chunks here), against the formulas."""
    monkeypatch.setattr(_inplace, "_MIN_CHUNK", 4)  # slots 0:5, 5:10, 10:15, 15:20
    rng = np.random.default_rng(distinct)
    table = jnp.asarray(rng.standard_normal((4096, 2)), F32)
    w = jnp.asarray([0.7, -1.3], F32)
    loss = lambda t, ids: jnp.sum(jnp.tanh(embedding_lookup(t, ids) @ w))
    steps = []
    for _ in range(3):
        rows = rng.choice(4096, distinct, replace=False)
        steps.append(jnp.asarray(np.concatenate([rows, rng.choice(rows, 20 - distinct)])))
    tx = lazy(optax.adam(0.05))

    @jax.jit
    def step(t, s, ids):
        _, g = value_and_sparse_grad(loss)(t, ids)
        assert g.capacity == 20
        u, s = tx.update(g, s, t)
        return apply_updates(t, u), s

    t, s, got, g_steps = table, tx.init(table), [], []
    for ids in steps:
        g_steps.append(np.asarray(jax.grad(loss)(t, ids)))
        t, s = step(t, s, ids)
        got.append((t, s))
    ref = _numpy_lazy_adam(table, g_steps, [np.unique(np.asarray(i)) for i in steps], 0.05)
    for (gt, gs), (rp, rm, rv) in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.asarray(gt), rp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gs[0].mu), rm, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(gs[0].nu), rv, rtol=1e-5, atol=1e-10)
    # under vmap the skipped chunks cost no copy of the table or the moments
    batched = jax.tree.map(lambda a: a[None], (table, tx.init(table), steps[0]))
    mem = jax.jit(jax.vmap(step), donate_argnums=(0, 1)).lower(*batched).compile()
    assert mem.memory_analysis().temp_size_in_bytes < table.nbytes


@pytest.mark.parametrize(
    "path_name,name",
    [
        ("vector", "adam"),
        ("loop", "adam"),
        ("vector", "adamw"),
        ("loop", "adamw"),
        ("vector", "lion"),
        ("loop", "lion"),
    ],
)
def test_lazy_equals_inner_when_every_block_is_touched(
    path_name, name, monkeypatch, optax_promotion
):
    _force(monkeypatch, path_name)
    make = {
        "adam": lambda: optax.adam(0.05),
        "adamw": lambda: optax.adamw(0.05),
        "lion": lambda: optax.lion(0.01),
    }[name]
    V, n_in, batch = 40, 6, 16
    params, x, _ = _hs_case(V=V, n_in=n_in, batch=batch, n_classes=4)  # 4 classes of 10
    targets = [jnp.arange(batch, dtype=jnp.int32) * 10 % V + s for s in range(3)]
    got = _hs_train(lazy(make()), params, x, targets, sparse=True, V=V)
    want = _hs_train(make(), params, x, targets, sparse=False, V=V)
    for (gp, gs), (wp, ws) in zip(got, want, strict=True):
        chex.assert_trees_all_close((gp, gs), (wp, ws), rtol=2e-5, atol=1e-6)


def test_lazy_adam_matches_torch_sparse_adam(path):
    torch = pytest.importorskip("torch")
    n, d, lr = 30, 4, 0.05
    table0 = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    steps = [np.array([1, 5, 5, 9]), np.array([5, 2, 29]), np.array([1, 1, 3])]

    emb = torch.nn.Embedding(n, d, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(table0))
    opt = torch.optim.SparseAdam(emb.parameters(), lr=lr, eps=1e-8)

    tx = lazy(optax.adam(lr, eps=1e-8))
    table = jnp.asarray(table0)
    state = tx.init(table)
    loss = lambda t, ids: jnp.sum(jnp.tanh(embedding_lookup(t, ids)) ** 2)

    @jax.jit
    def step(table, state, ids):
        _, g = value_and_sparse_grad(loss)(table, ids)
        u, state = tx.update(g, state, table)
        return apply_updates(table, u), state

    for ids in steps:
        opt.zero_grad()
        torch.sum(torch.tanh(emb(torch.from_numpy(ids))) ** 2).backward()
        opt.step()
        table, state = step(table, state, jnp.asarray(ids, jnp.int32))
        # eps placement differs (PyTorch: uncorrected sqrt(v)); equal up to ~eps / sqrt(v)
        np.testing.assert_allclose(
            np.asarray(table), emb.weight.detach().numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(state[0].mu), opt.state[emb.weight]["exp_avg"].numpy(), rtol=1e-5, atol=1e-7
        )


def test_lazy_under_vmap_and_mixed_trees(optax_promotion):
    """A vmapped training step (one model per batch entry) and dense leaves next to sparse ones."""
    table = jax.random.normal(jax.random.key(0), (10, 3), F32)
    w = jnp.ones((3,), F32)
    ids = jnp.array([[1, 2], [2, 7]])
    f = lambda p, i: jnp.sum(embedding_lookup(p["table"], i) @ p["w"])
    params = {"table": table, "w": w}
    tx = lazy(optax.sgd(0.5))

    def step(p, i):
        _, g = value_and_sparse_grad(f)(p, i)
        return apply_updates(p, tx.update(g, tx.init(p), p)[0])

    both = jax.vmap(step, in_axes=(None, 0))(params, ids)
    for k in range(2):
        one = step(params, ids[k])
        chex.assert_trees_all_close(jax.tree.map(lambda a, k=k: a[k], both), one, rtol=1e-6)
    new = step(params, ids[0])
    np.testing.assert_allclose(new["table"][1], table[1] - 0.5 * w, rtol=1e-6)
    np.testing.assert_array_equal(new["table"][3], table[3])
    np.testing.assert_allclose(new["w"], w - 0.5 * (table[1] + table[2]), rtol=1e-6)


@pytest.mark.slow
def test_elementwise_check(optax_promotion):
    """Element-wise transformations run a chunk at a time; the others on all touched blocks at once."""
    from blocksparse_jax.optim._lazy import _is_elementwise

    table = jnp.ones((6, 2), F32)
    _, g = value_and_sparse_grad(
        lambda t, w: jnp.sum(embedding_lookup(t, jnp.array([1, 4])) @ w), argnums=(0, 1)
    )(table, jnp.ones(2, F32))
    leaves, treedef = jax.tree.flatten(g, is_leaf=lambda x: isinstance(x, SparseBlockGrad))

    def _elementwise(tx, name):
        return _is_elementwise(tx, treedef, leaves, [table, jnp.ones(2, F32)], [0], {})

    for tx in (
        optax.sgd(0.1, momentum=0.9),
        optax.adam(1e-3),
        optax.adagrad(0.1),
        optax.rmsprop(0.1),
        optax.chain(optax.clip(1.0), optax.adam(1e-3)),
        optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
    ):
        assert _elementwise(optax.with_extra_args_support(tx), "tx")
    for tx in (
        optax.clip_by_global_norm(1.0),
        optax.chain(optax.clip_by_global_norm(1e3), optax.adam(1e-3)),
        optax.apply_if_finite(optax.adam(1e-3), 2),
        optax.noisy_sgd(0.1, key=0),
        optax.lamb(1e-3),
    ):
        assert not _elementwise(optax.with_extra_args_support(tx), "tx")
    with pytest.raises(ValueError, match="MultiSteps cannot run lazily"):
        lazy(optax.MultiSteps(optax.adam(1e-3), 2).gradient_transformation())
    with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
        lazy(lambda g: g)


def test_update_and_apply_errors(optax_promotion):
    table = jnp.ones((4, 2), F32)
    _, g = value_and_sparse_grad(lambda t: jnp.sum(embedding_lookup(t, jnp.array([1]))))(table)
    tx = lazy(optax.sgd(0.1))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(g, tx.init(table))
    np.testing.assert_allclose(apply_updates(table, g), table + g.todense())  # additive


# --------------------------------------------------------------------------------------
# Memory: a lazy step's temporaries do not grow with the vocabulary.
# --------------------------------------------------------------------------------------


def _lazy_step_temp(V, *, n_in=128, batch=256, n_classes=None):
    params = jax.eval_shape(lambda: h_softmax_init(jax.random.key(0), n_in, V, n_classes=n_classes))
    tx = lazy(optax.adam(1e-3))
    state = jax.eval_shape(tx.init, params)
    x = jax.ShapeDtypeStruct((batch, n_in), F32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def step(params, state, x, t):
        loss, g = value_and_sparse_grad(
            lambda p, x: h_softmax_loss(x, p, t, n_outputs=V), argnums=(0, 1)
        )(params, x)
        u, state = tx.update(g[0], state, params)
        return loss, apply_updates(params, u), state, g[1]

    mem = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, t).compile()
    w2 = np.prod(params.W2.shape) * 4
    return mem.memory_analysis().temp_size_in_bytes, w2


@pytest.mark.parametrize("V,n_classes", [(65_536, None), (262_144, None), (262_144, 4096)])
def test_lazy_step_temp_memory_is_small(V, n_classes, optax_promotion):
    temp, w2 = _lazy_step_temp(V, n_classes=n_classes)
    assert temp <= w2 / 8, (temp, w2)


@pytest.mark.parametrize("V,batch", [(65_536, 256), (65_536, 1024), (589_824, 256)])
def test_lazy_step_temp_memory_with_training_classes(V, batch, optax_promotion):
    # The step of benchmarks/bench_sparse_training.py: the parameters differentiated,
    # (params, state) donated.  At 65,536 the recommended classes are many (820 at batch
    # 1,024) and W2 small (32 MiB): the first level's (batch, n_classes) arrays alone,
    # three of them built at once, would pass W2 / 8.  At 589,824 the first level runs
    # as one chunk of (batch, n_classes) logits (up to W2 / 64 of them).
    n_in = 128
    n_classes = training_classes(V, n_in=n_in, batch=batch)
    params = jax.eval_shape(lambda: h_softmax_init(jax.random.key(0), n_in, V, n_classes=n_classes))
    tx = lazy(optax.adam(1e-3))
    state = (params, jax.eval_shape(tx.init, params))
    x = jax.ShapeDtypeStruct((batch, n_in), F32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def step(state, x, t):
        params, opt = state
        loss, g = value_and_sparse_grad(lambda p: h_softmax_loss(x, p, t, n_outputs=V))(params)
        u, opt = tx.update(g, opt, params)
        return loss, (apply_updates(params, u), opt)

    compiled = jax.jit(step, donate_argnums=0).lower(state, x, t).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    w2 = np.prod(params.W2.shape) * 4
    assert temp <= w2 / 8, (n_classes, temp, w2)


def _layer_step_temp(monkeypatch, *, chunks: bool):
    """Temp of a lazy Adam step of a layer of 65,536 blocks of 16 x 16 (64 MiB), 2,048 pairs."""
    if not chunks:
        _force(monkeypatch, "loop")
    jax.clear_caches()
    ib = ob = 256
    params = {
        "W": jax.ShapeDtypeStruct((ib, ob, 16, 16), F32),
        "b": jax.ShapeDtypeStruct((ob, 16), F32),
    }
    tx = lazy(optax.adam(1e-3))
    state = (params, jax.eval_shape(tx.init, params))
    h = jax.ShapeDtypeStruct((256, 8, 16), F32)
    idx = jax.ShapeDtypeStruct((256, 8), jnp.int32)

    def step(state, h, ii, oi):
        params, opt = state
        loss = lambda p: jnp.mean(jnp.tanh(sparse_block_dot(p["W"], h, ii, p["b"], oi)) ** 2)
        value, g = value_and_sparse_grad(loss)(params)
        u, opt = tx.update(g, opt, params)
        return value, (apply_updates(params, u), opt)

    compiled = jax.jit(step, donate_argnums=0).lower(state, h, idx, idx).compile()
    monkeypatch.undo()
    jax.clear_caches()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_update_of_small_blocks_stays_within_its_budget(monkeypatch, optax_promotion):
    shape = (256, 256, 16, 16)
    W_bytes = math.prod(shape) * 4
    assert W_bytes // 16 > _inplace._VECTOR_FLOOR  # the budget is W / 16
    g = SparseBlockGrad.from_pairs(
        jnp.arange(2_048, dtype=jnp.int32),
        jnp.ones((2_048, 16)),
        jnp.ones((2_048, 16)),
        shape=shape,
    )
    path, k = _inplace.choose_path(g, jax.ShapeDtypeStruct(shape, F32), 2)
    assert path == "chunks" and 16 <= k < 2_048  # neither all at once nor one block at a time
    loop = _layer_step_temp(monkeypatch, chunks=False)
    chunked = _layer_step_temp(monkeypatch, chunks=True)
    # A chunk's gathered blocks take at most W / 16 (no copy of W or of a moment)
    assert chunked <= loop + W_bytes // 16, (chunked, loop)


@pytest.mark.slow
def test_every_path_gives_the_same_update_for_unsorted_pairs(monkeypatch, optax_promotion):
    """Pairs in the order the ops report them (not by block), over many chunks of 3 blocks."""
    rng = np.random.default_rng(3)
    table = jnp.asarray(rng.normal(size=(50, 4)))
    ids = jnp.asarray(rng.integers(0, 50, (3, 40)))  # ~28 distinct rows per step, unsorted
    loss = lambda t, i: jnp.sum(jnp.sin(embedding_lookup(t, i)))
    tx = lazy(optax.adam(0.1))

    def train():
        t, state = table, tx.init(table)
        for i in ids:
            _, g = value_and_sparse_grad(loss)(t, i)
            u, state = tx.update(g, state, t)
            t = apply_updates(t, u)
        return t, state

    want = train()
    for path in ("chunks", "loop"):
        _force(monkeypatch, path)
        chex.assert_trees_all_close(train(), want, rtol=1e-12, atol=1e-12)


def test_top_level_names():
    assert blocksparse_jax.value_and_sparse_grad is value_and_sparse_grad
    assert blocksparse_jax.optim.lazy is lazy


@pytest.mark.slow
def test_optim_docstring_examples():
    """The examples of the optim modules (the shared docstring test covers the top-level names)."""
    import doctest
    import importlib
    import subprocess
    import sys

    code = (
        "import doctest, importlib, sys\n"
        "bad = 0\n"
        "for m in ('_blocks', '_value_and_grad', '_embedding', '_lazy', '_classes', '_step'):\n"
        "    mod = importlib.import_module('blocksparse_jax.optim.' + m)\n"
        "    r = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)\n"
        "    bad += r.failed\n"
        "    assert r.attempted, m\n"
        "sys.exit(bad)\n"
    )
    del doctest, importlib
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=root
    )
    assert run.returncode == 0, run.stdout + run.stderr
