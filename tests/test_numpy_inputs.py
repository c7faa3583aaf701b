"""NumPy inputs everywhere: every public function, eager and jitted, under ``grad`` and ``vmap``.

Each case calls a public function with NumPy arrays (weights, inputs, index
arrays) and compares the result with the same call on JAX arrays.  The
differentiable functions run under ``jax.grad`` and ``jax.vmap(jax.grad(...))``
with the weights unbatched (per-example gradients); the others (decoding,
sampling, the SGD step, lookups) plain and under ``jax.vmap``.  Under ``jax.grad``
a custom VJP's forward rule receives the NumPy arrays the user passed, which is
where NumPy used to reach a strategy.

Functions that work on host data only (``frequency_classes``,
``adaptive_softmax_cutoffs``, the PyTorch converters, the ``*_init`` functions,
which take a key) are not traced and not listed here.
"""

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import blocksparse_jax as bsj
import blocksparse_jax.equinox as beqx
import blocksparse_jax.flax as bflax
from blocksparse_jax import parallel
from blocksparse_jax.blocksparse import STRATEGIES

BATCH = 3
RNG = np.random.default_rng(0)
# Block-sparse problems: W (i_blocks=4, o_blocks=5, i_size=3, o_size=2), i_win=2, o_win=3.
W = RNG.standard_normal((4, 5, 3, 2))
H = RNG.standard_normal((BATCH, 2, 3))
G = RNG.standard_normal((BATCH, 3, 2))
BIAS = RNG.standard_normal((5, 2))
COTANGENT = RNG.standard_normal(W.shape)
II = RNG.integers(0, 4, (BATCH, 2)).astype(np.int32)
OI = RNG.integers(0, 5, (BATCH, 3)).astype(np.int32)
# Softmaxes over 10 outputs.
HS = bsj.HSoftmaxParams(
    *(np.asarray(a) for a in bsj.h_softmax_init(jax.random.key(0), 5, 10, dtype=jnp.float64))
)
AD = jax.tree.map(
    np.asarray, bsj.adaptive_softmax_init(jax.random.key(1), 8, 10, [4, 7], dtype=jnp.float64)
)
X5 = RNG.standard_normal((BATCH, 5))
X8 = RNG.standard_normal((BATCH, 8))
T = RNG.integers(0, 10, BATCH).astype(np.int32)
LAYOUT = bsj.frequency_classes(np.arange(10, 0, -1), 3)
TABLE = RNG.standard_normal((10, 3))
FS = bsj.FullSoftmaxParams(RNG.standard_normal((5, 10)), RNG.standard_normal((10,)))
IDS = RNG.integers(0, 10, (BATCH, 2)).astype(np.int32)
MESH = jax.make_mesh((1, 1), ("data", "model"))


class Case(NamedTuple):
    """``fn(*args)``, differentiated with respect to ``args[0]`` when ``grad``.

    Under ``jax.vmap`` the arguments with an ``in_axes`` of 0 are split into
    examples, or with ``stack`` (functions that need a batch axis) stacked as
    two batches.
    """

    fn: Any
    args: tuple
    in_axes: tuple
    grad: bool = True
    stack: bool = False

    def vmap_args(self) -> tuple:
        if not self.stack:
            return self.args
        return tuple(
            a if ax is None else np.stack([a, a[::-1]])
            for a, ax in zip(self.args, self.in_axes, strict=True)
        )


def _layer_cases():
    """Each layer of both frameworks, differentiated with respect to its weights."""
    eqx_layers = {
        "HSoftmax": beqx.HSoftmax(5, 10, key=jax.random.key(3), param_dtype=jnp.float64),
        "AdaptiveSoftmax": beqx.AdaptiveSoftmax(
            8, 10, [4, 7], key=jax.random.key(3), param_dtype=jnp.float64
        ),
        "BlockSparseLinear": beqx.BlockSparseLinear(
            4, 5, 3, 2, key=jax.random.key(3), param_dtype=jnp.float64
        ),
    }
    nnx_layers = {
        "HSoftmax": bflax.HSoftmax(5, 10, rngs=nnx.Rngs(3), param_dtype=jnp.float64),
        "AdaptiveSoftmax": bflax.AdaptiveSoftmax(
            8, 10, [4, 7], rngs=nnx.Rngs(3), param_dtype=jnp.float64
        ),
        "BlockSparseLinear": bflax.BlockSparseLinear(
            4, 5, 3, 2, rngs=nnx.Rngs(3), param_dtype=jnp.float64
        ),
    }
    args = {"HSoftmax": (X5, T), "AdaptiveSoftmax": (X8, T), "BlockSparseLinear": (H, II, OI)}
    cases = {}
    for name, layer in eqx_layers.items():
        weights, static = eqx.partition(layer, eqx.is_inexact_array)
        call = lambda w, *a, static=static: eqx.combine(w, static)(*a)
        cases[f"equinox.{name}"] = (call, weights)
    for name, layer in nnx_layers.items():
        graphdef, weights = nnx.split(layer)
        call = lambda w, *a, graphdef=graphdef: nnx.merge(graphdef, w)(*a)
        cases[f"flax.{name}"] = (call, weights)
    return {
        name: Case(
            lambda w, *a, call=call: call(w, *a).loss if len(a) == 2 else jnp.sum(call(w, *a) ** 2),
            (jax.tree.map(np.asarray, weights), *args[name.split(".")[1]]),
            (None,) + (0,) * len(args[name.split(".")[1]]),
        )
        for name, (call, weights) in cases.items()
    }


def _gemv_loss(W, h, ii, oi, strategy="auto"):
    o = np.zeros((*oi.shape, 2))
    return jnp.sum(bsj.sparse_block_gemv(o, W, h, ii, oi, strategy=strategy) ** 2)


def _h_softmax(W1, x, t=None):
    return bsj.h_softmax(x, x.shape[0], 10, 4, 3, W1, HS.b1, HS.W2, HS.b2, t)


def _value_and_sparse_grad(W, h, ii, oi):
    loss = lambda W: jnp.sum(bsj.sparse_block_gemv(np.zeros((*oi.shape, 2)), W, h, ii, oi) ** 2)
    value, grad = bsj.value_and_sparse_grad(loss)(W)
    return value, grad.todense()  # a SparseBlockGrad stays inside the jit that made it


CASES = {
    **_layer_cases(),
    "sparse_block_gemv": Case(_gemv_loss, (W, H, II, OI), (None, 0, 0, 0)),
    "sparse_block_dot": Case(
        lambda W, h, ii, oi: jnp.sum(bsj.sparse_block_dot(W, h, ii, BIAS, oi) ** 2),
        (W, H, II, OI),
        (None, 0, 0, 0),
    ),
    "sparse_block_outer": Case(
        lambda W, x, y, ii, oi: jnp.sum(bsj.sparse_block_outer(W, x, y, ii, oi, 0.5) ** 2),
        (W, H, G, II, OI),
        (None, 0, 0, 0, 0),
    ),
    "h_log_softmax": Case(
        lambda p, x, t: jnp.sum(bsj.h_log_softmax(x, p, t)), (HS, X5, T), (None, 0, 0)
    ),
    "h_log_softmax[all]": Case(
        lambda p, x: jnp.sum(bsj.h_log_softmax(x, p)[..., 3]), (HS, X5), (None, 0)
    ),
    "h_softmax_loss": Case(lambda p, x, t: bsj.h_softmax_loss(x, p, t), (HS, X5, T), (None, 0, 0)),
    "h_softmax": Case(
        lambda W1, x, t: jnp.sum(_h_softmax(W1, x, t)), (HS.W1, X5, T), (None, 0, 0), stack=True
    ),
    "h_softmax[all]": Case(
        lambda W1, x: jnp.sum(_h_softmax(W1, x)[:, 3]), (HS.W1, X5), (None, 0), stack=True
    ),
    "h_softmax_sgd_step": Case(
        lambda p, x, t: bsj.h_softmax_sgd_step(x, p, t, 0.1), (HS, X5, T), (None, 0, 0), False
    ),
    "h_softmax_top_k": Case(lambda p, x: bsj.h_softmax_top_k(x, p, 3), (HS, X5), (None, 0), False),
    "h_softmax_top_k[approximate]": Case(
        lambda p, x: bsj.h_softmax_top_k(x, p, 3, approximate=True), (HS, X5), (None, 0), False
    ),
    "h_softmax_sample": Case(
        lambda p, x: bsj.h_softmax_sample(jax.random.key(2), x, p), (HS, X5), (None, 0), False
    ),
    "HSoftmaxLayout.to_output": Case(LAYOUT.to_output, (T,), (0,), False),
    "HSoftmaxLayout.to_word": Case(LAYOUT.to_word, (T,), (0,), False),
    "adaptive_log_softmax": Case(
        lambda p, x, t: jnp.sum(bsj.adaptive_log_softmax(x, p, t)), (AD, X8, T), (None, 0, 0)
    ),
    "adaptive_log_softmax[all]": Case(
        lambda p, x: jnp.sum(bsj.adaptive_log_softmax(x, p)[..., 3]), (AD, X8), (None, 0)
    ),
    "adaptive_softmax_loss": Case(
        lambda p, x, t: bsj.adaptive_softmax_loss(x, p, t), (AD, X8, T), (None, 0, 0)
    ),
    "adaptive_softmax_predict": Case(
        lambda p, x: bsj.adaptive_softmax_predict(x, p), (AD, X8), (None, 0), False
    ),
    "adaptive_softmax_top_k": Case(
        lambda p, x: bsj.adaptive_softmax_top_k(x, p, 3), (AD, X8), (None, 0), False
    ),
    "full_log_softmax": Case(
        lambda p, x, t: jnp.sum(bsj.full_log_softmax(x, p, t, chunk_size=4)),
        (FS, X5, T),
        (None, 0, 0),
    ),
    "full_softmax_loss": Case(
        lambda p, x, t: bsj.full_softmax_loss(x, p, t, z_loss=0.1, chunk_size=4),
        (FS, X5, T),
        (None, 0, 0),
    ),
    "full_softmax_top_k": Case(
        lambda p, x: bsj.full_softmax_top_k(x, p, 3, chunk_size=4), (FS, X5), (None, 0), False
    ),
    "full_softmax_sample": Case(
        lambda p, x: bsj.full_softmax_sample(jax.random.key(2), x, p), (FS, X5), (None, 0), False
    ),
    "sampled_softmax_loss": Case(
        lambda p, x, t: bsj.sampled_softmax_loss(jax.random.key(2), x, p, t, n_sampled=4),
        (FS, X5, T),
        (None, 0, 0),
    ),
    "in_batch_softmax_loss": Case(
        lambda q, c: bsj.in_batch_softmax_loss(q, c), (X5, X5[::-1]), (0, 0), stack=True
    ),
    "embedding_lookup": Case(
        lambda table, ids: jnp.sum(bsj.embedding_lookup(table, ids) ** 2), (TABLE, IDS), (None, 0)
    ),
    "value_and_sparse_grad": Case(_value_and_sparse_grad, (W, H, II, OI), (None, 0, 0, 0), False),
    "parallel.h_log_softmax": Case(
        lambda p, x, t: jnp.sum(parallel.h_log_softmax(x, p, t, mesh=MESH)),
        (HS, X5, T),
        (None, 0, 0),
        stack=True,
    ),
    "parallel.h_softmax_loss": Case(
        lambda p, x, t: parallel.h_softmax_loss(x, p, t, mesh=MESH),
        (HS, X5, T),
        (None, 0, 0),
        stack=True,
    ),
    # Linear in the sharded results: eager vmap(grad) of a non-linear function of an
    # explicitly sharded array is refused by JAX itself (it asks for lowering_platforms).
    "parallel.sparse_block_gemv": Case(
        lambda W, h, ii, oi: jnp.sum(
            parallel.sparse_block_gemv(np.zeros((*oi.shape, 2)), W, h, ii, oi, mesh=MESH)
        ),
        (W, H, II, OI),
        (None, 0, 0, 0),
        stack=True,
    ),
    "parallel.sparse_block_dot": Case(
        lambda W, h, ii, oi: jnp.sum(parallel.sparse_block_dot(W, h, ii, BIAS, oi, mesh=MESH)),
        (W, H, II, OI),
        (None, 0, 0, 0),
        stack=True,
    ),
    "parallel.sparse_block_outer": Case(
        lambda W, x, y, ii, oi: jnp.sum(
            parallel.sparse_block_outer(W, x, y, ii, oi, mesh=MESH) * COTANGENT
        ),
        (W, H, G, II, OI),
        (None, 0, 0, 0, 0),
        stack=True,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_numpy_inputs(name):
    """Eager and jitted calls on NumPy arrays give the values of a jitted call on JAX arrays."""
    case = CASES[name]
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(case.args))
    f = jax.grad(case.fn) if case.grad else case.fn
    calls = {"": (f, case.args), "vmap": (jax.vmap(f, in_axes=case.in_axes), case.vmap_args())}
    for label, (g, args) in calls.items():
        jitted = jax.jit(g)
        expected = jax.tree.leaves(jitted(*jax.tree.map(jnp.asarray, args)))
        for mode, h in (("eager", g), ("jit", jitted)):
            got = jax.tree.leaves(h(*args))
            for a, b in zip(got, expected, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"{mode} {label}")


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "auto"])
def test_numpy_weights_per_example_gradients_every_strategy(strategy):
    """Per-example gradients of a NumPy ``W``, eager: the strategies only see JAX arrays.

    (The backward pass of ``sparse_block_gemv`` runs ``sparse_block_outer``'s
    core and the transposed gemv with the same strategy.)
    """
    grads = jax.vmap(jax.grad(_gemv_loss), in_axes=(None, 0, 0, 0, None))
    expected = jax.jit(grads, static_argnums=4)(jnp.asarray(W), H, II, OI, "gather")
    np.testing.assert_allclose(grads(W, H, II, OI, strategy), expected, rtol=1e-12, atol=1e-12)
