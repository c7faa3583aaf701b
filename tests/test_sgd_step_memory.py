"""``h_softmax_sgd_step`` in the form the README documents: no copy of ``W2``.

Jitted with the parameters donated and all of ``(loss, params, dx)`` kept, at a
realistic size (batch 256, width 128), alone and with ``dx`` fed into a layer
below.  Asserted on XLA's compiled memory analysis.
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from blocksparse_jax import h_softmax_init, h_softmax_loss, h_softmax_sgd_step

V, BATCH, WIDTH = 65_536, 256, 128


def _shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


@pytest.fixture(scope="module")
def params():
    return _shapes(jax.eval_shape(lambda: h_softmax_init(jax.random.key(0), WIDTH, V)))


def _temp(f, *args, donate):
    return jax.jit(f, donate_argnums=donate).lower(*args).compile().memory_analysis()


def test_documented_step_keeps_dx_without_copying_w2(params):
    x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32)
    t = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    step = jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)
    mem = step.lower(x, params, t, 0.1, n_outputs=V).compile().memory_analysis()
    w2 = params.W2.shape[0] * params.W2.shape[1] * params.W2.shape[2] * 4
    assert mem.temp_size_in_bytes <= w2 / 8, (mem.temp_size_in_bytes, w2)


def test_step_with_dx_into_a_layer_below(params):
    """A tanh layer below the softmax, trained by plain SGD from the step's ``dx``."""
    x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32)
    t = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    Wb = jax.ShapeDtypeStruct((WIDTH, WIDTH), jnp.float32)

    def train(Wb, params, x, t):
        h, vjp = jax.vjp(lambda W: jnp.tanh(x @ W), Wb)
        loss, params, dh = h_softmax_sgd_step(h, params, t, 0.1, n_outputs=V)
        (dWb,) = vjp(dh)
        return loss, Wb - 0.1 * dWb, params

    mem = _temp(train, Wb, params, x, t, donate=(0, 1))
    w2 = params.W2.shape[0] * params.W2.shape[1] * params.W2.shape[2] * 4
    assert mem.temp_size_in_bytes <= w2 / 8, (mem.temp_size_in_bytes, w2)


def test_step_values_unchanged_by_the_ordering():
    """The ordering trick leaves the values alone: the step equals the dense SGD step."""
    n_out = 300
    p = h_softmax_init(jax.random.key(1), 16, n_out)
    x = jax.random.normal(jax.random.key(2), (64, 16), jnp.float32)
    t = jax.random.randint(jax.random.key(3), (64,), 0, n_out)
    want_loss, grads = jax.jit(
        jax.value_and_grad(lambda x, p: h_softmax_loss(x, p, t, n_outputs=n_out), argnums=(0, 1))
    )(x, p)
    want = jax.tree.map(lambda a, g: a - 0.1 * g, p, grads[1])
    step = jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)
    loss, new, dx = step(x, p, t, 0.1, n_outputs=n_out)
    chex.assert_trees_all_close((loss, new, dx), (want_loss, want, grads[0]), rtol=1e-5, atol=1e-6)
