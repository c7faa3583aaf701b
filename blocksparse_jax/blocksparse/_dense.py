"""The ``dense`` strategy: scatter the activations into the full block space, one GEMM.

``(batch, i_blocks*i_size) @ (i_blocks*i_size, o_blocks*o_size)``, then the
selected outputs are picked; the weight update is ``X_dense^T @ Y_dense``.
Reads ``W`` once, at the price of the dense flops: best when the selected pairs
cover most of the block grid and the blocks are small.
"""

from __future__ import annotations

import jax.numpy as jnp


def gemv(W, h, input_idx, output_idx, *, transpose_w, acc_dtype):
    batch = h.shape[0]
    nr, nc, s, t = W.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    if transpose_w:
        # h lives in the column space (nc, t); the outputs in the row space (nr, s).
        hd = jnp.zeros((batch, nc, t), h.dtype).at[b, input_idx].add(h)
        y = jnp.einsum("blt,klst->bks", hd, W, preferred_element_type=acc_dtype)
    else:
        hd = jnp.zeros((batch, nr, s), h.dtype).at[b, input_idx].add(h)
        y = jnp.einsum("bks,klst->blt", hd, W, preferred_element_type=acc_dtype)
    return jnp.take_along_axis(y, output_idx[:, :, None], axis=1)


def outer(o, x, y, x_idx, y_idx, alpha, *, acc_dtype):
    batch = x.shape[0]
    nx, ny, sx, sy = o.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    xd = jnp.zeros((batch, nx, sx), x.dtype).at[b, x_idx].add(x)
    yd = jnp.zeros((batch, ny, sy), y.dtype).at[b, y_idx].add(y)
    upd = jnp.einsum("bks,blt->klst", xd, yd, preferred_element_type=acc_dtype)
    return o + alpha * upd
