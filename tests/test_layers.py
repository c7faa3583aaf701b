"""The Flax NNX and Equinox layers: values against the functional API, training, state,
scopes, errors and sparse training, each test run for both frameworks.

What differs between the frameworks (how a layer is made, how its weights are
read, jitted, trained and split into parameters) is in the two small adapters
below; the tests themselves are written once.
"""

import functools
import re
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blocksparse_jax as bsj
import blocksparse_jax.equinox
import blocksparse_jax.flax
from blocksparse_jax._layers import SoftmaxOutput
from tests.doc_blocks import reported, run_blocks, run_doctests

N_IN = 12
# The scripts of docs/layers.md these tests run (and tests/test_doc_blocks.py does not).
DOC_SCRIPTS = {
    "flax": ("train_flax.py", "train_flax_sparse.py"),
    "equinox": ("train_equinox.py", "train_equinox_sparse.py"),
}
COUNTS = np.array([3.0**-i + 1.0 / (i + 1) for i in range(40)])  # 40 words, skewed
LAYOUT = bsj.frequency_classes(COUNTS, 6)


class _Flax:
    """Flax NNX: ``rngs=``, ``nnx.Param`` weights, ``nnx.jit``, ``nnx.Optimizer``, ``nnx.split``."""

    name = "flax"
    module = blocksparse_jax.flax

    @staticmethod
    def make(cls_name, *args, seed=0, **kw):
        return getattr(blocksparse_jax.flax, cls_name)(*args, rngs=nnx.Rngs(seed), **kw)

    @staticmethod
    def value(weight):
        return None if weight is None else weight[...]

    @staticmethod
    def with_weight(layer, name, value):
        getattr(layer, name)[...] = value
        return layer

    jit = staticmethod(nnx.jit)

    @staticmethod
    def train(model, loss_fn, batches, lr):
        """``(model, losses)`` after one SGD step per batch."""
        optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, *batch):
            loss, grads = nnx.value_and_grad(loss_fn)(model, *batch)
            optimizer.update(model, grads)
            return loss

        return model, [float(step(model, optimizer, *b)) for b in batches]

    @staticmethod
    def trained_names(model, loss_of):
        """The weights ``loss_of(model)`` is differentiated with respect to."""
        return set(nnx.state(nnx.grad(loss_of)(model)).keys())

    @staticmethod
    def layout(model):
        return jax.tree.map(np.asarray, nnx.state(model, blocksparse_jax.flax.LayoutState))

    @staticmethod
    def partition(model):
        """``(params, combine)``: the trainable parameters and how to rebuild the model."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return params, lambda params: nnx.merge(graphdef, params, rest)

    @staticmethod
    def updated(model, combine, params):
        nnx.update(model, params)
        return model

    @staticmethod
    def bigram(seed):
        class Bigram(nnx.Module):
            def __init__(self, *, rngs):
                self.embed = nnx.Embed(40, N_IN, rngs=rngs)
                self.softmax = blocksparse_jax.flax.HSoftmax(N_IN, layout=LAYOUT, rngs=rngs)

            def __call__(self, words, next_words):
                return self.softmax(self.embed(words), next_words)

        return Bigram(rngs=nnx.Rngs(seed))


class _Equinox:
    """Equinox: ``key=``, array fields, ``eqx.filter_jit``, optax, ``eqx.partition``."""

    name = "equinox"
    module = blocksparse_jax.equinox

    @staticmethod
    def make(cls_name, *args, seed=0, **kw):
        return getattr(blocksparse_jax.equinox, cls_name)(*args, key=jax.random.key(seed), **kw)

    @staticmethod
    def value(weight):
        return weight

    @staticmethod
    def with_weight(layer, name, value):
        return eqx.tree_at(lambda m: getattr(m, name), layer, value)

    jit = staticmethod(eqx.filter_jit)

    @staticmethod
    def train(model, loss_fn, batches, lr):
        optim = optax.sgd(lr)
        opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(model, opt_state, *batch):
            loss, grads = eqx.filter_value_and_grad(loss_fn)(model, *batch)
            params = eqx.filter(model, eqx.is_inexact_array)
            updates, opt_state = optim.update(grads, opt_state, params)
            return eqx.apply_updates(model, updates), opt_state, loss

        losses = []
        for b in batches:
            model, opt_state, loss = step(model, opt_state, *b)
            losses.append(float(loss))
        return model, losses

    @staticmethod
    def trained_names(model, loss_of):
        grads = eqx.filter_grad(loss_of)(model)
        flat, _ = jax.tree_util.tree_flatten_with_path(grads)
        return {jax.tree_util.keystr(path).split(".")[1].split("[")[0] for path, _ in flat}

    @staticmethod
    def layout(model):
        names = ("word_to_output", "output_to_word", "class_sizes")
        layer = getattr(model, "softmax", model)
        return {name: np.asarray(getattr(layer, name)) for name in names}

    @staticmethod
    def partition(model):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        return params, lambda params: eqx.combine(params, static)

    @staticmethod
    def updated(model, combine, params):
        return combine(params)

    @staticmethod
    def bigram(seed):
        class Bigram(eqx.Module):
            embed: eqx.nn.Embedding
            softmax: blocksparse_jax.equinox.HSoftmax

            def __init__(self, *, key):
                k_embed, k_softmax = jax.random.split(key)
                self.embed = eqx.nn.Embedding(40, N_IN, dtype=jnp.float32, key=k_embed)
                self.softmax = blocksparse_jax.equinox.HSoftmax(N_IN, layout=LAYOUT, key=k_softmax)

            def __call__(self, words, next_words):
                return self.softmax(jax.vmap(self.embed)(words), next_words)

        return Bigram(key=jax.random.key(seed))


@pytest.fixture(params=[_Flax, _Equinox], ids=["flax", "equinox"])
def fw(request):
    return request.param


def _data(n=32, n_in=N_IN, n_out=40, seed=0):
    kx, kt = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, n_in), jnp.float32), jax.random.randint(kt, (n,), 0, n_out)


def _scope_text(f):
    return jax.jit(f).lower().as_text(debug_info=True)


# ---------------------------------------------------------------------------
# HSoftmax


@pytest.mark.parametrize("with_layout", [True, False], ids=["layout", "plain"])
def test_hsoftmax_matches_functional_api(fw, with_layout):
    layout = LAYOUT if with_layout else None
    n_classes = None if with_layout else 7
    layer = fw.make("HSoftmax", N_IN, 40, layout=layout, n_classes=n_classes, seed=3)
    x, words = _data()
    kw = {"n_outputs": layer.config.n_grid}
    if layout is not None:
        kw["class_sizes"] = layout.class_sizes
    ref = bsj.h_log_softmax(x, layer.params, **kw)
    if layout is not None:
        ref = ref[:, layout.word_to_output]  # word order
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
    assert (layer.n_in, layer.n_outputs, layer.n_classes) == (N_IN, 40, layer.config.n_classes)


@pytest.mark.slow
def test_hsoftmax_one_example_vmap_and_jit(fw):
    layer = fw.make("HSoftmax", N_IN, layout=LAYOUT)
    x, words = _data(4)
    batch = layer(x, words)
    one = layer(x[2], words[2])
    np.testing.assert_allclose(one.output, batch.output[2], rtol=1e-6)
    np.testing.assert_allclose(one.loss, -batch.output[2], rtol=1e-6)
    per_example = jax.vmap(layer)(x, words)  # one example at a time
    np.testing.assert_allclose(per_example.output, batch.output, rtol=1e-6)
    np.testing.assert_allclose(per_example.loss, -batch.output, rtol=1e-6)
    # Leading batch dimensions: (2, 2, n_in) gives the (4, n_in) batch's values, reshaped.
    nested = layer(x.reshape(2, 2, N_IN), words.reshape(2, 2))
    np.testing.assert_allclose(nested.output, batch.output.reshape(2, 2), rtol=1e-6)
    np.testing.assert_allclose(layer.log_prob(x[1]), layer.log_prob(x)[1], rtol=1e-6)
    jitted = fw.jit(lambda m, x, t: m(x, t))(layer, x, words)
    np.testing.assert_allclose(jitted.output, batch.output, rtol=1e-6)
    np.testing.assert_array_equal(fw.jit(lambda m, x: m.predict(x))(layer, x), layer.predict(x))


def test_hsoftmax_trains_and_keeps_its_layout(fw):
    layer = fw.make("HSoftmax", N_IN, layout=LAYOUT, seed=1)
    x, words = _data(64)
    # The layout is not trained: only the four weights get gradients.
    assert fw.trained_names(layer, lambda m: m(x, words).loss) == {"W1", "b1", "W2", "b2"}
    layout_before = fw.layout(layer)
    W2_before = np.asarray(fw.value(layer.W2))
    trained, losses = fw.train(layer, lambda m, x, t: m(x, t).loss, [(x, words)] * 60, lr=1.0)
    assert losses[-1] < 0.5 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, fw.layout(trained), layout_before)
    assert not np.array_equal(np.asarray(fw.value(trained.W2)), W2_before)
    # Trained on a fixed batch: the targets are now the model's best guesses mostly.
    assert np.mean(np.asarray(trained.predict(x)) == np.asarray(words)) > 0.5


def _adaptive_softmax_replace(fw):
    """docs/layers.md: AdaptiveSoftmax "drops into the training loops above in place of HSoftmax"."""
    module = fw.module.__name__
    make = {"flax": "rngs=rngs", "equinox": "key=k_softmax"}[fw.name]
    replace = {
        f"from {module} import HSoftmax": f"from {module} import AdaptiveSoftmax",
        f"HSoftmax(n_in, n_words, layout=layout, {make})": (
            f"AdaptiveSoftmax(n_in, n_words, [200, 800], {make})"
        ),
    }
    if fw.name == "equinox":
        replace["softmax: HSoftmax"] = "softmax: AdaptiveSoftmax"
    return replace


@functools.cache
def _documented_runs(fw):
    """docs/layers.md's training scripts of ``fw`` (and the loop with the adaptive softmax),
    run one after the other in one fresh interpreter: the reports of :func:`run_blocks`."""
    train, sparse = DOC_SCRIPTS[fw.name]
    report = "[losses, list(predicted.shape), batch]"
    return run_blocks(
        {
            "train": ("layers.md", train, report, None),
            "sparse": ("layers.md", sparse, report, None),
            "adaptive": ("layers.md", train, "losses", _adaptive_softmax_replace(fw)),
        }
    )


@pytest.mark.slow
@pytest.mark.xdist_group("layers_doc_scripts")  # one worker runs _documented_runs once
def test_documented_training_loop_runs_and_learns(fw):
    losses, predicted_shape, batch = reported(_documented_runs(fw), "train")
    assert losses[-1] < 0.5 * losses[0], losses
    assert predicted_shape == [batch]


# ---------------------------------------------------------------------------
# BlockSparseLinear


@pytest.mark.slow
@pytest.mark.parametrize("use_bias", [True, False])
def test_block_sparse_linear_matches_functional_api(fw, use_bias):
    layer = fw.make("BlockSparseLinear", 5, 6, 4, 3, use_bias=use_bias)
    if use_bias:
        b = jax.random.normal(jax.random.key(9), (6, 3), jnp.float32)
        layer = fw.with_weight(layer, "b", b)
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    h = jax.random.normal(k1, (8, 2, 4), jnp.float32)
    ii = jax.random.randint(k2, (8, 2), 0, 5)
    oi = jax.random.randint(k3, (8, 3), 0, 6)
    W = np.asarray(fw.value(layer.W), np.float64)
    b = np.asarray(fw.value(layer.b), np.float64) if use_bias else np.zeros((6, 3))
    hn, iin, oin = np.asarray(h, np.float64), np.asarray(ii), np.asarray(oi)
    # Plain loops from the formula.
    want = np.zeros((8, 3, 3))
    for e in range(8):
        for j in range(3):
            want[e, j] = b[oin[e, j]] + sum(hn[e, i] @ W[iin[e, i], oin[e, j]] for i in range(2))
    np.testing.assert_allclose(layer(h, ii, oi), want, rtol=1e-5, atol=1e-6)
    if use_bias:
        dot = bsj.sparse_block_dot(fw.value(layer.W), h, ii, fw.value(layer.b), oi)
        np.testing.assert_allclose(layer(h, ii, oi), dot, rtol=1e-6)
    else:
        assert layer.b is None
    # One example (what jax.vmap sees) gives the batch's rows.
    np.testing.assert_allclose(jax.vmap(layer)(h, ii, oi), layer(h, ii, oi), rtol=1e-6)


def test_block_sparse_linear_trains(fw):
    teacher = fw.make("BlockSparseLinear", 4, 4, 6, 5, seed=10)
    student = fw.make("BlockSparseLinear", 4, 4, 6, 5, seed=11)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k1, (64, 2, 6), jnp.float32)
    ii = jax.random.randint(k2, (64, 2), 0, 4)
    oi = jax.random.randint(k3, (64, 2), 0, 4)
    y = teacher(h, ii, oi)

    def loss_fn(model, h, ii, oi, y):
        return jnp.mean((model(h, ii, oi) - y) ** 2)

    _, losses = fw.train(student, loss_fn, [(h, ii, oi, y)] * 60, lr=1.0)
    assert losses[-1] < 0.1 * losses[0], losses


# ---------------------------------------------------------------------------
# Both layers: docstrings, scopes, bad arguments, imports


@pytest.mark.slow
def test_docstring_examples(fw):
    assert run_doctests(fw.module.__name__) >= 10


def test_named_scopes(fw):
    layer = fw.make("HSoftmax", N_IN, layout=LAYOUT)
    lin = fw.make("BlockSparseLinear", 3, 3, 2, 2)
    adaptive = fw.make("AdaptiveSoftmax", N_IN, 40, [8, 20])
    full = fw.make("FullSoftmax", N_IN, 40)
    sampled = fw.make("SampledSoftmax", N_IN, 40, n_sampled=4)
    x, words = _data(4)
    h, idx = jnp.ones((4, 1, 2), jnp.float32), jnp.zeros((4, 1), jnp.int32)
    prefix = fw.module.__name__
    for f, scope in [
        (lambda: layer(x, words), f"{prefix}.HSoftmax"),
        (lambda: layer.top_k(x, 2), f"{prefix}.HSoftmax.top_k"),
        (lambda: layer.sample(x, jax.random.key(0)), f"{prefix}.HSoftmax.sample"),
        (lambda: lin(h, idx, idx), f"{prefix}.BlockSparseLinear"),
        (lambda: adaptive(x, words), f"{prefix}.AdaptiveSoftmax"),
        (lambda: full(x, words), f"{prefix}.FullSoftmax"),
        (lambda: full.top_k(x, 2), f"{prefix}.FullSoftmax.top_k"),
        (lambda: sampled(x, words, key=jax.random.key(0)), f"{prefix}.SampledSoftmax"),
        (lambda: sampled.exact(x, words), f"{prefix}.SampledSoftmax.exact"),
    ]:
        assert scope in _scope_text(f)


def test_bad_arguments(fw):
    with pytest.raises(ValueError, match="needs n_outputs .* or layout="):
        fw.make("HSoftmax", N_IN)
    with pytest.raises(ValueError, match="layout's number of words, 40, or None; got 50"):
        fw.make("HSoftmax", N_IN, 50, layout=LAYOUT)
    with pytest.raises(ValueError, match="n_classes must be the layout's n_classes"):
        fw.make("HSoftmax", N_IN, layout=LAYOUT, n_classes=3)
    with pytest.raises(TypeError, match="layout must be an HSoftmaxLayout"):
        fw.make("HSoftmax", N_IN, layout=(1, 2, 3))
    with pytest.raises(ValueError, match="n_in must be a positive int"):
        fw.make("HSoftmax", 0, 10)
    with pytest.raises(ValueError, match="o_size must be a positive int"):
        fw.make("BlockSparseLinear", 2, 2, 2, 0)
    with pytest.raises(ValueError, match="filter_eps=0.01 cannot be used with label_smoothing"):
        fw.make("FullSoftmax", N_IN, 40, filter_eps=0.01, label_smoothing=0.1)
    with pytest.raises(ValueError, match="z_loss must be a finite number in \\[0.0, inf\\)"):
        fw.make("FullSoftmax", N_IN, 40, z_loss=-1.0)
    with pytest.raises(ValueError, match="n_sampled must be in \\[1, n_outputs\\] = \\[1, 40\\]"):
        fw.make("SampledSoftmax", N_IN, 40, n_sampled=41)
    with pytest.raises(ValueError, match="sampler must be 'log_uniform', 'uniform' or"):
        fw.make("SampledSoftmax", N_IN, 40, n_sampled=4, sampler="zipf")
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'key'"):
        fw.make("SampledSoftmax", N_IN, 40, n_sampled=4)(*_data(2))
    layer = fw.make("HSoftmax", N_IN, layout=LAYOUT)
    x, _ = _data(2)
    with pytest.raises(IndexError, match="target holds 40 at position \\(1,\\)"):
        layer(x, jnp.array([0, 40]))
    out = fw.jit(lambda m, x, t: m(x, t))(layer, x, jnp.array([0, 40]))
    assert np.isfinite(out.output[0]) and out.output[1] == -np.inf


_IMPORTS = """
import sys
import blocksparse_jax as bsj
frameworks = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'equinox'))
print(frameworks())
print(bsj.flax.HSoftmax.__module__, bsj.equinox.HSoftmax.__module__, bsj.parallel.__name__)
print(frameworks() != [])
"""

_MISSING_FLAX = """
import sys
sys.modules["flax"] = None  # as if Flax were not installed
import blocksparse_jax as bsj
try:
    bsj.flax
except ModuleNotFoundError as e:
    print(e)
"""


@pytest.mark.slow
def test_the_frameworks_are_imported_on_first_use():
    run = subprocess.run([sys.executable, "-c", _IMPORTS], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "[]",
        "blocksparse_jax.flax blocksparse_jax.equinox blocksparse_jax.parallel",
        "True",
    ]
    run = subprocess.run([sys.executable, "-c", _MISSING_FLAX], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(
        r'blocksparse_jax.flax needs flax: install it with python3 -m pip install -e "\.\[flax\]" '
        r"from a checkout\n",
        run.stdout,
    ), run.stdout


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


@pytest.mark.parametrize("head_bias", [False, True])
def test_adaptive_softmax_matches_the_formula_and_functional_api(fw, head_bias):
    layer = fw.make(
        "AdaptiveSoftmax", N_IN, 40, [8, 20], div_value=2.0, head_bias=head_bias, seed=4
    )
    x, targets = _data(16)
    params = layer.params
    assert (layer.n_in, layer.n_outputs, layer.cutoffs) == (N_IN, 40, (8, 20))
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


def test_adaptive_softmax_trains(fw):
    layer = fw.make("AdaptiveSoftmax", N_IN, 40, [8, 20], div_value=2.0, seed=1)
    x, words = _data(64)
    loss_of = lambda m: m(x, words).loss
    assert fw.trained_names(layer, loss_of) == {"head_W", "tail_proj", "tail_out"}
    _, losses = fw.train(layer, lambda m, x, t: m(x, t).loss, [(x, words)] * 60, lr=1.0)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
@pytest.mark.xdist_group("layers_doc_scripts")
def test_documented_training_loop_with_the_adaptive_softmax(fw):
    losses = reported(_documented_runs(fw), "adaptive")
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------
# FullSoftmax and SampledSoftmax

FULL_OPTIONS = {
    "plain": {},
    "options": {
        "use_bias": False,
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "softcap": 5.0,
        "chunk_size": 16,
    },
}


def _check_exact_methods(layer, x, options):
    """``log_prob``, ``predict``, ``top_k`` and ``sample`` against the functional API."""
    params = layer.params
    ref = bsj.full_log_softmax(x, params, **options)
    np.testing.assert_allclose(np.exp(np.asarray(ref, np.float64)).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(layer.log_prob(x), ref, rtol=1e-6)
    np.testing.assert_array_equal(layer.predict(x), np.argmax(np.asarray(ref), axis=-1))
    vals, ids = layer.top_k(x, 5)
    ref_vals, ref_ids = jax.lax.top_k(ref, 5)
    np.testing.assert_allclose(vals, ref_vals, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ids, ref_ids)
    key = jax.random.key(7)
    np.testing.assert_array_equal(
        layer.sample(x, key), bsj.full_softmax_sample(key, x, params, **options)
    )
    assert (layer.n_in, layer.n_outputs) == (N_IN, 40)
    return ref


@pytest.mark.parametrize("case", sorted(FULL_OPTIONS))
def test_full_softmax_matches_functional_api(fw, case):
    options = FULL_OPTIONS[case]
    layer = fw.make("FullSoftmax", N_IN, 40, seed=3, **options)
    assert (layer.b is None) == (case == "options")
    x, words = _data()
    eval_options = {k: v for k, v in options.items() if k in ("softcap", "chunk_size")}
    loss_options = {k: v for k, v in options.items() if k != "use_bias"}
    ref = _check_exact_methods(layer, x, eval_options)

    out = layer(x, words)
    assert isinstance(out, SoftmaxOutput)
    # output: the targets' log-probabilities; loss: full_softmax_loss, its options included.
    np.testing.assert_allclose(out.output, ref[jnp.arange(32), words], rtol=1e-6)
    want = bsj.full_softmax_loss(x, layer.params, words, **loss_options)
    np.testing.assert_allclose(out.loss, want, rtol=1e-6)
    if case == "options":
        return
    np.testing.assert_allclose(out.loss, -jnp.mean(out.output), rtol=1e-6)
    # NumPy inputs, one example, jit.
    numpy_out = layer(np.asarray(x), np.asarray(words))
    np.testing.assert_allclose(numpy_out.output, out.output, rtol=1e-6)
    one = layer(x[2], words[2])
    np.testing.assert_allclose(one.output, out.output[2], rtol=1e-6)
    jitted = fw.jit(lambda m, x, t: m(x, t))(layer, x, words)
    np.testing.assert_allclose(jitted.output, out.output, rtol=1e-6)
    np.testing.assert_allclose(jitted.loss, out.loss, rtol=1e-6)
    np.testing.assert_array_equal(fw.jit(lambda m, x: m.predict(x))(layer, x), layer.predict(x))


def test_sampled_softmax_matches_functional_api(fw):
    counts = np.arange(40, 0, -1)  # unigram counts: held as static configuration
    layer = fw.make("SampledSoftmax", N_IN, 40, n_sampled=8, sampler=counts, seed=3)
    x, words = _data()
    key = jax.random.key(5)
    out = layer(x, words, key=key)
    assert isinstance(out, SoftmaxOutput) and layer.n_sampled == 8
    # output: the targets' log-probabilities in the sampled softmax; loss: their negative mean.
    want = bsj.sampled_softmax_loss(
        key, x, layer.params, words, n_sampled=8, sampler=counts, reduction="none"
    )
    np.testing.assert_allclose(out.output, -want, rtol=1e-6)
    np.testing.assert_allclose(out.loss, jnp.mean(want), rtol=1e-6)
    # Evaluation: the exact softmax on the same weights.
    ref = _check_exact_methods(layer, x, {})
    exact = layer.exact(x, words)
    np.testing.assert_allclose(exact.output, ref[jnp.arange(32), words], rtol=1e-6)
    np.testing.assert_allclose(exact.loss, -jnp.mean(exact.output), rtol=1e-6)
    # The sampled log-probability of a target is above its exact one (fewer competitors).
    assert np.all(np.asarray(out.output) > np.asarray(exact.output))
    # NumPy inputs, jit.
    numpy_out = layer(np.asarray(x), np.asarray(words), key=key)
    np.testing.assert_allclose(numpy_out.output, out.output, rtol=1e-6)
    call = fw.jit(lambda m, x, t, k: m(x, t, key=k))
    np.testing.assert_allclose(call(layer, x, words, key).output, out.output, rtol=1e-6)
    other = call(layer, x, words, jax.random.key(6)).output
    assert not np.allclose(other, out.output)  # another key, other classes
    # The counts are configuration: equal by content, not trained, not an array leaf.
    same = fw.make("SampledSoftmax", N_IN, 40, n_sampled=8, sampler=counts.copy(), seed=3)
    assert same.config == layer.config and hash(same.config) == hash(layer.config)
    assert fw.make("SampledSoftmax", N_IN, 40, n_sampled=8, seed=3).config != layer.config
    assert fw.trained_names(layer, lambda m: m(x, words, key=key).loss) == {"W", "b"}


def test_full_and_sampled_softmax_train(fw):
    x, words = _data(64)
    full = fw.make("FullSoftmax", N_IN, 40, seed=1)
    _, losses = fw.train(full, lambda m, x, t: m(x, t).loss, [(x, words)] * 40, lr=1.0)
    assert losses[-1] < 0.5 * losses[0], losses

    sampled = fw.make("SampledSoftmax", N_IN, 40, n_sampled=10, sampler="uniform", seed=1)
    exact_before = float(sampled.exact(x, words).loss)
    keys = jax.random.split(jax.random.key(2), 40)
    batches = [(x, words, k) for k in keys]
    trained, losses = fw.train(sampled, lambda m, x, t, k: m(x, t, key=k).loss, batches, lr=1.0)
    assert losses[-1] < 0.5 * losses[0], losses
    assert float(trained.exact(x, words).loss) < 0.5 * exact_before


# ---------------------------------------------------------------------------
# Sparse training: value_and_sparse_grad and lazy optimizers on the layers


def _by_path(tree):
    """``{path: leaf}`` with ``SparseBlockGrad`` as leaves; paths as ``softmax.W2`` in both frameworks."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, bsj.SparseBlockGrad)
    )
    name = lambda path: ".".join(re.findall(r"\w+", jax.tree_util.keystr(path))).removesuffix(
        ".value"
    )
    return {name(k): v for k, v in flat}


def _check_sparse_step(fw, model, loss_of, *, jit=False):
    """The paths of the parameters whose gradients are sparse, after checking them.

    Sparse gradients must equal the dense ones (``jax.value_and_grad``) and one
    step of ``lazy(optax.sgd)`` must give the parameters of a dense
    ``optax.sgd`` step.  The sparse step runs eagerly, or with ``jit`` as one
    ``jax.jit`` (one compilation instead of one per operation).
    """
    params, combine = fw.partition(model)
    loss_fn = lambda params: loss_of(combine(params))
    lazy_sgd, sgd = bsj.optim.lazy(optax.sgd(0.5)), optax.sgd(0.5)
    sparse = set()

    def sparse_step(params):
        loss, grads = bsj.value_and_sparse_grad(loss_fn)(params)
        by_path = _by_path(grads)
        sparse.update(k for k, g in by_path.items() if isinstance(g, bsj.SparseBlockGrad))
        # A SparseBlockGrad stays inside the function that made it: densified here.
        dense_by_path = {k: g.todense() if k in sparse else g for k, g in by_path.items()}
        updates, _ = lazy_sgd.update(grads, lazy_sgd.init(params), params)
        return loss, dense_by_path, _by_path(bsj.optim.apply_updates(params, updates))

    loss, by_path, new = (jax.jit(sparse_step) if jit else sparse_step)(params)
    dense_loss, dense = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-6)
    dense_by_path = _by_path(dense)
    assert by_path.keys() == dense_by_path.keys()
    for k, g in by_path.items():
        np.testing.assert_allclose(g, dense_by_path[k], rtol=1e-5, atol=1e-6, err_msg=k)

    dense_updates, _ = sgd.update(dense, sgd.init(params), params)
    want = _by_path(optax.apply_updates(params, dense_updates))
    assert new.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(new[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    return sparse


@pytest.mark.slow
@pytest.mark.xdist_group("layers_sparse_steps")  # shares eager compilations
def test_hsoftmax_trains_sparsely(fw):
    model = fw.bigram(seed=0)
    words = jax.random.randint(jax.random.key(1), (64,), 0, 40)
    next_words = (7 * words + 3) % 40
    sparse = _check_sparse_step(fw, model, lambda m: m(words, next_words).loss)
    assert sparse == {"softmax.W2", "softmax.b2"}, sparse
    if fw.name == "equinox":  # the whole model is not a valid argument: its layout is int32
        with pytest.raises(TypeError, match="float arrays only"):
            bsj.value_and_sparse_grad(lambda m: m(words, next_words).loss)(model)

    tx = bsj.optim.lazy(optax.sgd(0.5, momentum=0.9))  # optax.adam trips strict promotion
    opt_state = tx.init(fw.partition(model)[0])
    layout_before = fw.layout(model.softmax)

    @fw.jit
    def train_step(model, opt_state):
        params, combine = fw.partition(model)
        loss_fn = lambda params: combine(params)(words, next_words).loss
        loss, grads = bsj.value_and_sparse_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        model = fw.updated(model, combine, bsj.optim.apply_updates(params, updates))
        return model, opt_state, loss

    losses = []
    for _ in range(30):
        model, opt_state, loss = train_step(model, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    jax.tree.map(np.testing.assert_array_equal, fw.layout(model.softmax), layout_before)


@pytest.mark.slow
@pytest.mark.xdist_group("layers_sparse_steps")  # shares eager compilations
def test_block_sparse_linear_trains_sparsely(fw):
    layer = fw.make("BlockSparseLinear", 4, 5, 6, 3)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k1, (8, 2, 6), jnp.float32)
    ii = jax.random.randint(k2, (8, 2), 0, 4)
    oi = jax.random.randint(k3, (8, 2), 0, 5)
    sparse = _check_sparse_step(fw, layer, lambda m: jnp.mean(m(h, ii, oi) ** 2))
    assert sparse == {"W", "b"}, sparse


@pytest.mark.slow
@pytest.mark.xdist_group("layers_sparse_steps")  # shares eager compilations
def test_embed_equals_the_lookup_and_trains_sparsely(fw):
    layer = fw.make("Embed", 50, 6)
    table = layer._table()
    assert table.shape == (50, 6) and layer.num_embeddings == 50 and layer.features == 6
    np.testing.assert_allclose(float(jnp.std(table)), 6**-0.5, rtol=0.2)
    ids = jnp.array([[3, 7], [3, 49]])
    np.testing.assert_array_equal(layer(ids), bsj.embedding_lookup(table, ids))
    # -1 padding under jit reads zeros; eagerly it is refused
    padded = fw.jit(lambda m, i: m(i))(layer, jnp.array([-1, 4]))
    np.testing.assert_array_equal(padded[0], 0.0)
    with pytest.raises(IndexError, match="ids holds -1"):
        layer(jnp.array([-1, 4]))
    sparse = _check_sparse_step(fw, layer, lambda m: jnp.sum(jnp.tanh(m(ids)) ** 2))
    assert sparse == {"embedding" if fw.name == "flax" else "weight"}, sparse
    half = fw.make("Embed", 50, 6, dtype=jnp.bfloat16)
    assert half(ids).dtype == jnp.bfloat16 and half._table().dtype == jnp.float32


def test_full_and_sampled_softmax_train_sparsely(fw):
    # A peaked problem: the targets are in the first chunk of 8 and hold almost all the mass.
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((N_IN, 6)))
    x = jnp.asarray(3.0 * q.T, jnp.float32)
    words = jnp.asarray(rng.permutation(8)[:6], jnp.int32)
    W = 0.3 * rng.standard_normal((N_IN, 40))
    W[:, np.asarray(words)] = 8.0 * np.asarray(x).T / 3.0
    full = fw.make("FullSoftmax", N_IN, 40, filter_eps=1e-3, chunk_size=8)
    full = fw.with_weight(full, "W", jnp.asarray(W, jnp.float32))
    sparse = _check_sparse_step(fw, full, lambda m: m(x, words).loss, jit=True)
    assert sparse == {"W"}, sparse

    sampled = fw.make("SampledSoftmax", N_IN, 40, n_sampled=6)
    key = jax.random.key(4)
    sparse = _check_sparse_step(fw, sampled, lambda m: m(x, words, key=key).loss, jit=True)
    assert sparse == {"W", "b"}, sparse


def test_full_and_sampled_softmax_in_rows(fw):
    """``layout="rows"``: ``W (n_outputs, n_in)``, the same draws, values and sparse steps."""
    x, words = _data()
    cols = fw.make("FullSoftmax", N_IN, 40, seed=3, chunk_size=16)
    rows = fw.make("FullSoftmax", N_IN, 40, seed=3, chunk_size=16, layout="rows")
    assert type(rows.params) is bsj.FullSoftmaxRowParams and rows.params.W.shape == (40, N_IN)
    np.testing.assert_array_equal(rows.params.W, cols.params.W.T)
    for call in (lambda m: m(x, words), lambda m: m.log_prob(x), lambda m: m.top_k(x, 3)):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), call(rows), call(cols)
        )
    with pytest.raises(ValueError, match='layout must be "columns" or "rows"'):
        fw.make("FullSoftmax", N_IN, 40, layout="row")
    sampled = fw.make("SampledSoftmax", N_IN, 40, n_sampled=6, layout="rows")
    assert sampled.params.W.shape == (40, N_IN)
    key = jax.random.key(4)
    sparse = _check_sparse_step(fw, sampled, lambda m: m(x, words, key=key).loss, jit=True)
    assert sparse == {"W", "b"}, sparse


@pytest.mark.slow
@pytest.mark.xdist_group("layers_doc_scripts")
def test_documented_sparse_training_loop_runs_and_learns(fw):
    losses, predicted_shape, batch = reported(_documented_runs(fw), "sparse")
    assert losses[-1] < 0.5 * losses[0], losses
    assert predicted_shape == [batch]
