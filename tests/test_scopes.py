"""Every public function names its operations: ``jax.named_scope("blocksparse_jax.<name>")``."""

import jax
import jax.numpy as jnp
import pytest

import blocksparse_jax as bsj
from blocksparse_jax import parallel

W = jnp.ones((3, 4, 2, 5), jnp.float32)
h = jnp.ones((2, 1, 2), jnp.float32)
ii, oi = jnp.array([[0], [2]]), jnp.array([[1], [3]])
PARAMS = bsj.h_softmax_init(jax.random.key(0), 4, 10, dtype=jnp.float32)
x = jnp.ones((2, 4), jnp.float32)
t = jnp.array([1, 7])
MESH = jax.make_mesh((1, 1), ("data", "model"))
FULL = bsj.full_softmax_init(jax.random.key(0), 4, 10)

CALLS = {
    "sparse_block_gemv": lambda: bsj.sparse_block_gemv(jnp.zeros((2, 1, 5)), W, h, ii, oi),
    "sparse_block_dot": lambda: bsj.sparse_block_dot(W, h, ii, jnp.zeros((4, 5)), oi),
    "sparse_block_outer": lambda: bsj.sparse_block_outer(W, h, jnp.ones((2, 1, 5)), ii, oi),
    "h_softmax": lambda: bsj.h_softmax(x, 2, 10, 4, 3, *PARAMS),
    "h_log_softmax": lambda: bsj.h_log_softmax(x, PARAMS, t, n_outputs=10),
    "h_softmax_loss": lambda: bsj.h_softmax_loss(x, PARAMS, t, n_outputs=10),
    "h_softmax_sgd_step": lambda: bsj.h_softmax_sgd_step(x, PARAMS, t, 0.1, n_outputs=10),
    "h_softmax_top_k": lambda: bsj.h_softmax_top_k(x, PARAMS, 2, n_outputs=10),
    "h_softmax_sample": lambda: bsj.h_softmax_sample(jax.random.key(1), x, PARAMS, n_outputs=10),
    "full_log_softmax": lambda: bsj.full_log_softmax(x, FULL, t),
    "full_softmax_loss": lambda: bsj.full_softmax_loss(x, FULL, t, filter_eps=1e-3),
    "full_softmax_top_k": lambda: bsj.full_softmax_top_k(x, FULL, 2),
    "full_softmax_sample": lambda: bsj.full_softmax_sample(jax.random.key(1), x, FULL),
    "sampled_softmax_loss": lambda: bsj.sampled_softmax_loss(
        jax.random.key(1), x, FULL, t, n_sampled=3
    ),
    "sample_candidates": lambda: bsj.sample_candidates(
        jax.random.key(1), t, n_outputs=10, n_sampled=3
    ),
    "in_batch_softmax_loss": lambda: bsj.in_batch_softmax_loss(x, x),
    "parallel.full_softmax_loss": lambda: parallel.full_softmax_loss(x, FULL, t, mesh=MESH),
    "parallel.sparse_block_gemv": lambda: parallel.sparse_block_gemv(
        jnp.zeros((2, 1, 5)), W, h, ii, oi, mesh=MESH
    ),
    "parallel.h_softmax_loss": lambda: parallel.h_softmax_loss(
        x, PARAMS, t, n_outputs=10, mesh=MESH
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_public_function_is_a_named_scope(name):
    text = jax.jit(CALLS[name]).lower().as_text(debug_info=True)
    scope = "blocksparse_jax." + name
    assert scope in text, f"{scope} not in the lowered module's locations"
