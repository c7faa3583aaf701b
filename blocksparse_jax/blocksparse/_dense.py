"""The ``dense`` strategy: scatter the activations into the full block space, one GEMM.

``(batch, i_blocks*i_size) @ (i_blocks*i_size, o_blocks*o_size)``, then the
selected outputs are picked; the weight update is ``X_dense^T @ Y_dense``.
Reads ``W`` once, at the price of the dense flops: best when the selected pairs
cover most of the block grid and the blocks are small.  The activations are
scattered in the accumulation dtype (repeated blocks of one example add up in
float32 for float16/bfloat16).

The dense products also multiply the blocks no example selects, by zero.  That
is exact only while the factors are finite (``0 * inf`` is NaN), so each call
checks, at run time, the operand the dense product multiplies by zero: ``W``
for the gemv, the activations for the weight update.  If one holds a NaN or an
inf, the call computes with :mod:`~blocksparse_jax.blocksparse._gather` instead
(``lax.cond``), which gives the reference values, NaN and inf where the selected
products put them and nowhere else.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse import _gather
from blocksparse_jax.blocksparse._gather import GATHER_BUDGET_BYTES


def _all_finite(*xs):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def _dense_activations(W, h, input_idx, *, transpose_w, acc_dtype):
    """``h`` scattered into the full block space, summed in ``acc_dtype``, then in ``W``'s dtype.

    Returns ``(hd, fits)``: ``fits`` is ``False`` where a sum does not fit
    ``W``'s dtype (float16 overflow), in which case the caller takes the exact
    path.  Casting the activations, never ``W``, keeps low-precision weights
    low in memory: no float32 copy of ``W`` is made.
    """
    batch = h.shape[0]
    nr, nc, s, t = W.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    shape = (batch, nc, t) if transpose_w else (batch, nr, s)
    hd = jnp.zeros(shape, acc_dtype).at[b, input_idx].add(h.astype(acc_dtype))
    hd_w = hd.astype(W.dtype)
    return hd_w, jnp.all(jnp.isfinite(hd_w) | ~jnp.isfinite(hd))


def _gemv_dense(W, hd, output_idx, *, transpose_w, acc_dtype):
    # Masked input rows are zero and every block is finite here: they add exactly 0.
    if transpose_w:
        # hd lives in the column space (nc, t); the outputs in the row space (nr, s).
        y = jnp.einsum("blt,klst->bks", hd, W, preferred_element_type=acc_dtype)
    else:
        y = jnp.einsum("bks,klst->blt", hd, W, preferred_element_type=acc_dtype)
    return jnp.take_along_axis(y, output_idx[:, :, None], axis=1, mode="clip")


def gemv(
    W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, budget=GATHER_BUDGET_BYTES
):
    kw = dict(transpose_w=transpose_w, acc_dtype=acc_dtype)
    hd, fits = _dense_activations(W, h, input_idx, **kw)
    return lax.cond(
        _all_finite(W) & fits,
        lambda W, hd, h, ii, oi, vi: _gemv_dense(W, hd, oi, **kw),
        lambda W, hd, h, ii, oi, vi: _gather.gemv(W, h, ii, oi, vi, **kw, budget=budget),
        W,
        hd,
        h,
        input_idx,
        output_idx,
        valid_in,
    )


def _outer_dense(o, x, y, x_idx, y_idx, *, acc_dtype):
    batch = x.shape[0]
    nx, ny, sx, sy = o.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    # Masked rows are zero and every factor is finite here: their pairs add exactly 0.
    xd = jnp.zeros((batch, nx, sx), acc_dtype).at[b, x_idx].add(x.astype(acc_dtype))
    yd = jnp.zeros((batch, ny, sy), acc_dtype).at[b, y_idx].add(y.astype(acc_dtype))
    return o + jnp.einsum("bks,blt->klst", xd, yd, preferred_element_type=acc_dtype)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget=GATHER_BUDGET_BYTES):
    return lax.cond(
        _all_finite(x, y),
        lambda *a: _outer_dense(*a[:5], acc_dtype=acc_dtype),
        lambda *a: _gather.outer(*a, acc_dtype=acc_dtype, budget=budget),
        o,
        x,
        y,
        x_idx,
        y_idx,
        valid_x,
        valid_y,
    )
