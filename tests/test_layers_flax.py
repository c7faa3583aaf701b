"""The Flax NNX layers: values against the functional API, training, state, scopes and errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blocksparse_jax as bsj
from blocksparse_jax.flax import (
    AdaptiveSoftmax,
    BlockSparseLinear,
    HSoftmax,
    LayoutState,
    SoftmaxOutput,
)
from tests.doc_blocks import run_block, run_doctests

N_IN = 12
COUNTS = np.array([3.0**-i + 1.0 / (i + 1) for i in range(40)])  # 40 words, skewed
LAYOUT = bsj.frequency_classes(COUNTS, 6)


def _data(n=32, n_in=N_IN, n_out=40, seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, n_in), jnp.float32), jax.random.randint(kt, (n,), 0, n_out)


def _reference(layer, layout):
    """The functional API's log-probabilities of every word (or output), in word order."""
    kw = {"n_outputs": layer.config.n_grid}
    if layout is not None:
        kw["class_sizes"] = layout.class_sizes

    def log_prob(x):
        full = bsj.h_log_softmax(x, layer.params, **kw)
        return full if layout is None else full[:, layout.word_to_output]

    return log_prob, kw


@pytest.mark.parametrize("with_layout", [True, False], ids=["layout", "plain"])
def test_hsoftmax_matches_functional_api(with_layout):
    layout = LAYOUT if with_layout else None
    layer = HSoftmax(
        N_IN, 40, layout=layout, n_classes=None if with_layout else 7, rngs=nnx.Rngs(3)
    )
    x, words = _data()
    log_prob, kw = _reference(layer, layout)
    ref = log_prob(x)  # (32, 40)
    np.testing.assert_allclose(np.exp(np.asarray(ref, np.float64)).sum(-1), 1.0, rtol=1e-5)

    out = layer(x, words)
    assert isinstance(out, SoftmaxOutput)
    expected = ref[jnp.arange(32), words]
    np.testing.assert_allclose(out.output, expected, rtol=1e-6)
    np.testing.assert_allclose(out.loss, -np.mean(np.asarray(expected)), rtol=1e-6)
    np.testing.assert_allclose(layer.log_prob(x), ref, rtol=1e-6)

    np.testing.assert_array_equal(layer.predict(x), np.argmax(np.asarray(ref), axis=-1))
    vals, ids = layer.top_k(x, 5)
    ref_vals, ref_ids = jax.lax.top_k(ref, 5)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-6)
    np.testing.assert_array_equal(ids, ref_ids)

    key = jax.random.key(7)
    out_ids = bsj.h_softmax_sample(key, x, layer.params, **kw)
    want = out_ids if layout is None else layout.output_to_word[np.asarray(out_ids)]
    np.testing.assert_array_equal(layer.sample(x, key), want)


def test_hsoftmax_one_example_and_jit():
    layer = HSoftmax(N_IN, layout=LAYOUT, rngs=nnx.Rngs(0))
    x, words = _data(4)
    batch = layer(x, words)
    one = layer(x[2], words[2])
    np.testing.assert_allclose(one.output, batch.output[2], rtol=1e-6)
    np.testing.assert_allclose(one.loss, -batch.output[2], rtol=1e-6)
    # Leading batch dimensions: (2, 2, n_in) gives the (4, n_in) batch's values, reshaped.
    seq = layer(x.reshape(2, 2, N_IN), words.reshape(2, 2))
    np.testing.assert_allclose(seq.output, batch.output.reshape(2, 2), rtol=1e-6)
    np.testing.assert_allclose(seq.loss, batch.loss, rtol=1e-6)
    np.testing.assert_array_equal(
        layer.predict(x.reshape(2, 2, N_IN)), layer.predict(x).reshape(2, 2)
    )
    jitted = nnx.jit(lambda m, x, t: m(x, t))(layer, x, words)
    np.testing.assert_allclose(jitted.output, batch.output, rtol=1e-6)
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m.predict(x))(layer, x), layer.predict(x))


def _train(model, loss_fn, batches, lr):
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, *batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer, *b)) for b in batches]


def test_hsoftmax_trains_and_keeps_its_layout():
    layer = HSoftmax(N_IN, layout=LAYOUT, rngs=nnx.Rngs(1))
    layout_before = jax.tree.map(np.asarray, nnx.state(layer, LayoutState))
    W2_before = np.asarray(layer.W2[...])
    x, words = _data(64)
    losses = _train(layer, lambda m, x, t: m(x, t).loss, [(x, words)] * 60, lr=1.0)
    assert losses[-1] < 0.5 * losses[0], losses
    # The layout is state, not a parameter: neither differentiated nor updated.
    grads = nnx.grad(lambda m: m(x, words).loss)(layer)
    assert not jax.tree.leaves(nnx.state(grads, LayoutState))
    assert set(nnx.state(grads).keys()) == {"W1", "b1", "W2", "b2"}
    jax.tree.map(np.testing.assert_array_equal, nnx.state(layer, LayoutState), layout_before)
    assert not np.array_equal(np.asarray(layer.W2[...]), W2_before)
    # Trained on a fixed batch: the targets are now the model's best guesses mostly.
    assert np.mean(np.asarray(layer.predict(x)) == np.asarray(words)) > 0.5


@pytest.mark.parametrize("use_bias", [True, False])
def test_block_sparse_linear_matches_functional_api(use_bias):
    layer = BlockSparseLinear(5, 6, 4, 3, use_bias=use_bias, rngs=nnx.Rngs(0))
    if use_bias:
        layer.b[...] = jax.random.normal(jax.random.key(9), (6, 3), jnp.float32)
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k1, (8, 2, 4), jnp.float32)
    ii = jax.random.randint(k2, (8, 2), 0, 5)
    oi = jax.random.randint(k3, (8, 3), 0, 6)
    W = np.asarray(layer.W[...], np.float64)
    hn, iin, oin = np.asarray(h, np.float64), np.asarray(ii), np.asarray(oi)
    b = np.asarray(layer.b[...], np.float64) if use_bias else np.zeros((6, 3))
    # Plain loops from the formula.
    want = np.zeros((8, 3, 3))
    for e in range(8):
        for j in range(3):
            want[e, j] = b[oin[e, j]] + sum(hn[e, i] @ W[iin[e, i], oin[e, j]] for i in range(2))
    np.testing.assert_allclose(layer(h, ii, oi), want, rtol=1e-5, atol=1e-6)
    if use_bias:
        np.testing.assert_allclose(
            layer(h, ii, oi), bsj.sparse_block_dot(layer.W[...], h, ii, layer.b[...], oi), rtol=1e-6
        )
    else:
        assert layer.b is None and set(nnx.state(layer, nnx.Param).keys()) == {"W"}


def test_block_sparse_linear_trains():
    teacher = BlockSparseLinear(4, 4, 6, 5, rngs=nnx.Rngs(10))
    student = BlockSparseLinear(4, 4, 6, 5, rngs=nnx.Rngs(11))
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k1, (64, 2, 6), jnp.float32)
    ii = jax.random.randint(k2, (64, 2), 0, 4)
    oi = jax.random.randint(k3, (64, 2), 0, 4)
    y = teacher(h, ii, oi)

    def loss_fn(model, h, ii, oi, y):
        return jnp.mean((model(h, ii, oi) - y) ** 2)

    losses = _train(student, loss_fn, [(h, ii, oi, y)] * 60, lr=1.0)
    assert losses[-1] < 0.1 * losses[0], losses


def test_documented_training_loop_runs_and_learns():
    out = run_block("layers.md", "train_flax.py", "[losses, list(predicted.shape), batch]")
    losses, predicted_shape, batch = out
    assert losses[-1] < 0.5 * losses[0], losses
    assert predicted_shape == [batch]


def test_docstring_examples():
    assert run_doctests("blocksparse_jax.flax") >= 10


def test_named_scopes():
    layer = HSoftmax(N_IN, layout=LAYOUT, rngs=nnx.Rngs(0))
    lin = BlockSparseLinear(3, 3, 2, 2, rngs=nnx.Rngs(0))
    x, words = _data(4)
    h, idx = jnp.ones((4, 1, 2), jnp.float32), jnp.zeros((4, 1), jnp.int32)
    for f, scope in [
        (lambda: layer(x, words), "blocksparse_jax.flax.HSoftmax"),
        (lambda: layer.top_k(x, 2), "blocksparse_jax.flax.HSoftmax.top_k"),
        (lambda: lin(h, idx, idx), "blocksparse_jax.flax.BlockSparseLinear"),
    ]:
        assert scope in jax.jit(f).lower().as_text(debug_info=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs n_outputs .* or layout="):
        HSoftmax(N_IN, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layout's number of words, 40, or None; got 50"):
        HSoftmax(N_IN, 50, layout=LAYOUT, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_classes must be the layout's n_classes"):
        HSoftmax(N_IN, layout=LAYOUT, n_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_in must be a positive int"):
        HSoftmax(0, 10, rngs=nnx.Rngs(0))
    layer = HSoftmax(N_IN, layout=LAYOUT, rngs=nnx.Rngs(0))
    x, _ = _data(2)
    with pytest.raises(IndexError, match="target holds 40 at position \\(1,\\)"):
        layer(x, jnp.array([0, 40]))
    out = nnx.jit(lambda m, x, t: m(x, t))(layer, x, jnp.array([0, 40]))
    assert np.isfinite(out.output[0]) and out.output[1] == -np.inf


def test_importing_the_package_does_not_import_the_frameworks():
    code = "import sys, blocksparse_jax; print(sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'equinox')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------------------
# AdaptiveSoftmax


def _adaptive_reference(params, x):
    """log p of every output from the formula, in float64 NumPy."""
    x = np.asarray(x, np.float64)
    head = x @ np.asarray(params.head_W, np.float64)
    if params.head_b is not None:
        head = head + np.asarray(params.head_b, np.float64)

    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    head = log_softmax(head)
    S = params.head_W.shape[1] - len(params.tail_out)
    parts = [head[:, :S]]
    for i, (proj, out) in enumerate(zip(params.tail_proj, params.tail_out, strict=True)):
        tail = log_softmax(x @ np.asarray(proj, np.float64) @ np.asarray(out, np.float64))
        parts.append(head[:, S + i : S + i + 1] + tail)
    return np.concatenate(parts, axis=1)


def _check_adaptive(layer, x, targets):
    params = layer.params
    ref = _adaptive_reference(params, x)  # (batch, n_outputs)
    np.testing.assert_allclose(np.exp(ref).sum(-1), 1.0, rtol=1e-9)
    out = layer(x, targets)
    assert isinstance(out, SoftmaxOutput)
    expected = ref[np.arange(len(targets)), np.asarray(targets)]
    np.testing.assert_allclose(out.output, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.loss, -expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(out.output, bsj.adaptive_log_softmax(x, params, targets), rtol=1e-6)
    np.testing.assert_allclose(layer.log_prob(x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.predict(x), np.argmax(ref, axis=-1))
    vals, ids = layer.top_k(x, 4)
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1, kind="stable")[:, :4])
    np.testing.assert_allclose(vals, np.sort(ref, axis=-1)[:, ::-1][:, :4], rtol=1e-5, atol=1e-5)
    # Sampling: the empirical frequencies of one example's draws match its distribution.
    n = 20000
    draws = np.asarray(layer.sample(jnp.broadcast_to(x[0], (n, x.shape[1])), jax.random.key(5)))
    freq = np.bincount(draws, minlength=ref.shape[1]) / n
    p = np.exp(ref[0])
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-3)


@pytest.mark.parametrize("head_bias", [False, True])
def test_adaptive_softmax_matches_the_formula_and_functional_api(head_bias):
    layer = AdaptiveSoftmax(N_IN, 40, [8, 20], div_value=2.0, head_bias=head_bias, rngs=nnx.Rngs(4))
    x, words = _data(16)
    _check_adaptive(layer, x, words)


def test_adaptive_softmax_trains():
    layer = AdaptiveSoftmax(N_IN, 40, [8, 20], div_value=2.0, rngs=nnx.Rngs(1))
    x, words = _data(64)
    losses = _train(layer, lambda m, x, t: m(x, t).loss, [(x, words)] * 60, lr=1.0)
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(nnx.state(nnx.grad(lambda m: m(x, words).loss)(layer)).keys()) == {
        "head_W", "tail_proj", "tail_out",
    }  # fmt: skip


def test_adaptive_softmax_named_scope():
    layer = AdaptiveSoftmax(N_IN, 40, [8, 20], rngs=nnx.Rngs(0))
    x, words = _data(4)
    assert "blocksparse_jax.flax.AdaptiveSoftmax" in jax.jit(
        lambda: layer(x, words)
    ).lower().as_text(debug_info=True)


def test_documented_training_loop_with_the_adaptive_softmax():
    # docs/layers.md: AdaptiveSoftmax "drops into the training loops above in place of HSoftmax".
    replace = {
        "from blocksparse_jax.flax import HSoftmax": "from blocksparse_jax.flax import AdaptiveSoftmax",
        "HSoftmax(n_in, n_words, layout=layout, rngs=rngs)": "AdaptiveSoftmax(n_in, n_words, [200, 800], rngs=rngs)",
    }
    losses = run_block("layers.md", "train_flax.py", "losses", replace=replace)
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------
# Sparse training: value_and_sparse_grad and lazy optimizers on the layers


def _by_path(tree):
    """``{keystr: leaf}`` with ``SparseBlockGrad`` as leaves."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, bsj.SparseBlockGrad)
    )
    return {jax.tree_util.keystr(k): v for k, v in flat}


class _Bigram(nnx.Module):
    def __init__(self, *, rngs):
        self.embed = nnx.Embed(40, N_IN, rngs=rngs)
        self.softmax = HSoftmax(N_IN, layout=LAYOUT, rngs=rngs)

    def __call__(self, words, next_words):
        return self.softmax(self.embed(words), next_words)


def _check_sparse_step(model, loss_of):
    """The paths of the parameters whose gradients are sparse, after checking them.

    Sparse gradients must equal the dense ones (``jax.value_and_grad``) and one
    step of ``lazy(optax.sgd)`` must give the parameters of a dense
    ``optax.sgd`` step.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        return loss_of(nnx.merge(graphdef, params, rest))

    loss, grads = jax.jit(bsj.value_and_sparse_grad(loss_fn))(params)
    dense_loss, dense = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
    by_path, dense_by_path = _by_path(grads), _by_path(dense)
    assert by_path.keys() == dense_by_path.keys()
    sparse = {k for k, g in by_path.items() if isinstance(g, bsj.SparseBlockGrad)}
    for k, g in by_path.items():
        g = g.todense() if k in sparse else g
        np.testing.assert_allclose(g, dense_by_path[k], rtol=1e-5, atol=1e-6, err_msg=k)

    lazy_sgd, sgd = bsj.optim.lazy(optax.sgd(0.5)), optax.sgd(0.5)
    updates, _ = lazy_sgd.update(grads, lazy_sgd.init(params), params)
    new = _by_path(bsj.optim.apply_updates(params, updates))
    dense_updates, _ = sgd.update(dense, sgd.init(params), params)
    want = _by_path(optax.apply_updates(params, dense_updates))
    assert new.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    return sparse


def test_hsoftmax_trains_sparsely():
    model = _Bigram(rngs=nnx.Rngs(0))
    words = jax.random.randint(jax.random.key(1), (64,), 0, 40)
    next_words = (7 * words + 3) % 40
    sparse = _check_sparse_step(model, lambda m: m(words, next_words).loss)
    assert sparse == {"['softmax']['W2'].value", "['softmax']['b2'].value"}, sparse

    tx = bsj.optim.lazy(optax.sgd(0.5, momentum=0.9))  # optax.adam trips strict promotion
    opt_state = tx.init(nnx.state(model, nnx.Param))
    layout_before = jax.tree.map(np.asarray, nnx.state(model, LayoutState))

    @nnx.jit
    def train_step(model, opt_state):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(params):
            return nnx.merge(graphdef, params, rest)(words, next_words).loss

        loss, grads = bsj.value_and_sparse_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, bsj.optim.apply_updates(params, updates))
        return opt_state, loss

    losses = []
    for _ in range(30):
        opt_state, loss = train_step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, LayoutState), layout_before)


def test_block_sparse_linear_trains_sparsely():
    layer = BlockSparseLinear(4, 5, 6, 3, rngs=nnx.Rngs(0))
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k1, (8, 2, 6), jnp.float32)
    ii = jax.random.randint(k2, (8, 2), 0, 4)
    oi = jax.random.randint(k3, (8, 2), 0, 5)
    sparse = _check_sparse_step(layer, lambda m: jnp.mean(m(h, ii, oi) ** 2))
    assert sparse == {"['W'].value", "['b'].value"}, sparse


def test_documented_sparse_training_loop_runs_and_learns():
    report = "[losses, list(predicted.shape), batch]"
    losses, predicted_shape, batch = run_block("layers.md", "train_flax_sparse.py", report)
    assert losses[-1] < 0.5 * losses[0], losses
    assert predicted_shape == [batch]
