"""The first level of the hierarchical softmax, walked in chunks of classes.

The chunks are made narrow here (a few classes each, the last one overlapping
the one before) so that small problems go through every path of the loop;
values and gradients are compared with float64 NumPy written from the formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blocksparse_jax import h_softmax_init, h_softmax_loss
from blocksparse_jax.hsoftmax import _first_level
from blocksparse_jax.hsoftmax._first_level import chunking, class_log_prob
from tests.hsoftmax_reference import h_log_softmax_ref

F64 = np.dtype(np.float64)


@pytest.fixture
def narrow_chunks(monkeypatch):
    """Chunks of 3 classes (11 classes: starts 0, 3, 6 and 8, class 8 in the last two)."""
    monkeypatch.setattr(_first_level, "_CHUNK_ELEMENTS", 8)
    monkeypatch.setattr(_first_level, "_MIN_COLS", 3)
    monkeypatch.setattr(_first_level, "_COL_MULTIPLE", 1)
    jax.clear_caches()  # nothing compiled with the default chunks is reused
    yield
    jax.clear_caches()


@pytest.mark.parametrize("batch", [0, 1, 7, 64, 1024, 100_000])
@pytest.mark.parametrize("n_classes", [1, 7, 120, 820, 1941, 7826])
def test_chunking_covers_every_class_once_within_the_budget(batch, n_classes):
    n_chunks, cols = chunking(batch, n_classes)
    starts = [min(j * cols, n_classes - cols) for j in range(n_chunks)]
    seen = np.zeros(n_classes, int)
    for j, s in enumerate(starts):
        assert 0 <= s and s + cols <= n_classes
        seen[max(s, j * cols) : s + cols] += 1  # the kept classes of chunk j
    assert (seen == 1).all()
    assert cols <= max(_first_level._MIN_COLS, _first_level._CHUNK_ELEMENTS // max(batch, 1))


@pytest.mark.parametrize("elements", [None, 1 << 18, 1 << 20, 1 << 22])
def test_chunking_takes_a_larger_budget_when_given(elements):
    budget = max(_first_level._CHUNK_ELEMENTS, elements or 0)
    for batch, n_classes in [(256, 2731), (256, 4608), (1024, 1941), (64, 7826)]:
        n_chunks, cols = chunking(batch, n_classes, elements=elements)
        assert cols <= max(_first_level._MIN_COLS, budget // batch)
        assert n_chunks == -(-n_classes // cols)
        # as few chunks as the budget allows (to the column multiple)
        assert n_chunks <= -(-batch * n_classes // budget) + 1
    assert chunking(256, 4608, elements=1 << 20) == (2, 2304)
    assert chunking(256, 4608, elements=256 * 4608) == (1, 4608)


def _reference(x, W1, b1, valid, classes, g):
    """``(out, dx, dW1, db1)`` of ``out[b] = log_softmax(x @ W1 + b1)[classes[b]]``, loops in float64."""
    batch, n_classes = x.shape[0], W1.shape[1]
    out = np.zeros(batch)
    dlogits = np.zeros((batch, n_classes))
    for b in range(batch):
        cols = np.flatnonzero(valid)
        logits = np.array([x[b] @ W1[:, c] + b1[c] for c in cols])
        m = logits.max()
        p = np.exp(logits - m) / np.exp(logits - m).sum()
        if not valid[classes[b]]:
            out[b] = -np.inf
            continue
        out[b] = logits[list(cols).index(classes[b])] - m - np.log(np.exp(logits - m).sum())
        dlogits[b, cols] = -g[b] * p
        dlogits[b, classes[b]] += g[b]
    return out, dlogits @ W1.T, x.T @ dlogits, dlogits.sum(0)


def _problem(seed, batch=6, n_in=4, n_classes=11):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n_in))
    W1 = rng.standard_normal((n_in, n_classes))
    b1 = rng.standard_normal(n_classes)
    valid = np.ones(n_classes, bool)
    valid[[2, 5]] = False  # empty classes
    classes = rng.integers(0, n_classes, batch)
    classes[0], classes[1] = 8, 2  # the class in two chunks; an empty class
    return x, W1, b1, valid, classes


def test_values_and_gradients_match_numpy(narrow_chunks, transform):
    assert chunking(6, 11) == (4, 3)
    x, W1, b1, valid, classes = _problem(0)
    g = np.random.default_rng(1).standard_normal(6)  # example 1's class is empty: no gradient
    ref_out, ref_dx, ref_dW1, ref_db1 = _reference(x, W1, b1, valid, classes, g)

    def f(x, W1, b1, valid, classes):
        def weighted(x, W1, b1):
            out = class_log_prob(x, W1, b1, valid, classes, F64)
            return jnp.sum(jnp.where(valid[classes], out, 0.0) * g), out

        (_, out), grads = jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True)(x, W1, b1)
        return out, grads

    out, (dx, dW1, db1) = transform(f)(x, W1, b1, valid, classes)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dW1, ref_dW1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db1, ref_db1, rtol=1e-10, atol=1e-12)
    assert np.all(dW1[:, ~valid] == 0) and np.all(db1[~valid] == 0)


@pytest.mark.parametrize("all_valid", [False, True])
@pytest.mark.parametrize("chunk_elements", [None, 6 * 6, 6 * 11])  # 4 / 2 / 1 chunks
def test_a_larger_chunk_budget_gives_the_same_values(narrow_chunks, chunk_elements, all_valid):
    x, W1, b1, valid, classes = _problem(5)
    if all_valid:  # no class empty: the masks are left out
        valid = np.ones_like(valid)
    g = np.random.default_rng(6).standard_normal(6)
    ref_out, ref_dx, ref_dW1, ref_db1 = _reference(x, W1, b1, valid, classes, g)
    n_chunks = chunking(6, 11, elements=chunk_elements)[0]
    assert n_chunks == {None: 4, 36: 2, 66: 1}[chunk_elements]

    def weighted(x, W1, b1):
        out = class_log_prob(
            x, W1, b1, valid, classes, F64, chunk_elements=chunk_elements, all_valid=all_valid
        )
        return jnp.sum(jnp.where(valid[classes], out, 0.0) * g), out

    (_, out), (dx, dW1, db1) = jax.jit(
        jax.value_and_grad(weighted, argnums=(0, 1, 2), has_aux=True)
    )(x, W1, b1)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    for got, want in [(dx, ref_dx), (dW1, ref_dW1), (db1, ref_db1)]:
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_second_order_matches_finite_differences(narrow_chunks):
    x, W1, b1, valid, classes = _problem(2)
    g = np.random.default_rng(3).standard_normal(6)

    def dW1_norm(x):
        out = lambda W1: class_log_prob(x, W1, b1, valid, classes, F64)
        grad = jax.grad(lambda W1: jnp.sum(jnp.where(valid[classes], out(W1), 0.0) * g))(W1)
        return jnp.sum(grad**2)

    got = jax.grad(dW1_norm)(x)
    ref = lambda x: np.sum(_reference(x, W1, b1, valid, classes, g)[2] ** 2)
    eps = 1e-6
    fd = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        fd[i] = (ref(x + d) - ref(x - d)) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7)


def test_h_softmax_loss_and_gradients_with_chunks(narrow_chunks):
    n_in, V, batch = 4, 30, 9
    params = h_softmax_init(jax.random.key(0), n_in, V, n_classes=11, dtype=jnp.float64)
    params = jax.tree.map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), params
    )
    class_sizes = np.array([3, 3, 0, 2, 3, 1, 3, 3, 0, 3, 2])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((batch, n_in))
    real = [c * 3 + s for c in range(11) for s in range(class_sizes[c]) if c * 3 + s < V]
    target = rng.choice(real, batch)
    mask = np.ones(batch, bool)
    mask[4] = False

    def loss(x, W1, b1):
        p = params._replace(W1=W1, b1=b1)
        return h_softmax_loss(x, p, target, n_outputs=V, mask=mask, class_sizes=class_sizes)

    def ref(x, W1, b1):
        W2, b2 = map(np.asarray, params[2:])
        logp = h_log_softmax_ref(x, W1, b1, W2, b2, V, class_sizes)
        return -np.sum(logp[np.arange(batch), target][mask]) / mask.sum()

    args = (x, np.asarray(params.W1), np.asarray(params.b1))
    np.testing.assert_allclose(loss(*args), ref(*args), rtol=1e-12)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    eps = 1e-6
    for k, (a, got) in enumerate(zip(args, grads, strict=True)):
        fd = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            d = np.zeros_like(a)
            d[i] = eps
            plus = [*args]
            minus = [*args]
            plus[k], minus[k] = a + d, a - d
            fd[i] = (ref(*plus) - ref(*minus)) / (2 * eps)
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)


def test_chunks_on_cpu_one_chunk_on_accelerators(narrow_chunks):
    """One export for cpu, cuda and tpu: a loop over chunks on CPU only, the same values."""
    from jax import export

    params = h_softmax_init(jax.random.key(0), 5, 40, n_classes=11)
    x = jax.random.normal(jax.random.key(1), (6, 5))
    target = jnp.array([0, 3, 8, 17, 25, 39])
    grad = jax.jit(jax.value_and_grad(lambda p, x: h_softmax_loss(x, p, target), argnums=(0, 1)))
    exported = export.export(grad, platforms=["cpu", "cuda", "tpu"])(params, x)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    jax.tree.map(chex_close, exported.call(params, x), grad(params, x))
    for platform in ("cuda", "tpu"):
        module = export.export(grad, platforms=[platform])(params, x).mlir_module()
        assert "stablehlo.while" not in module
    assert "stablehlo.while" in export.export(grad, platforms=["cpu"])(params, x).mlir_module()
