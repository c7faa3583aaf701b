"""The ``loop`` strategy: a ``lax.fori_loop`` over the ``(example, i, j)`` pairs.

Each iteration reads its block of ``W`` in place with ``lax.dynamic_slice`` (no
gathered copy); the weight update adds each outer product into its block in
place with ``lax.dynamic_update_slice``.  The block of a masked pair is
selected away (``jnp.where``) before its product, and so is its update.

For a low-precision ``o`` (narrower than the accumulation dtype) the update
walks the pairs sorted by block, still one pair per iteration, and adds each
block's float32 sum once: ``grouped``'s loop with one row per step.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse import _grouped
from blocksparse_jax.blocksparse._accumulate import is_low_precision
from blocksparse_jax.blocksparse._carry import carry
from blocksparse_jax.blocksparse._pairs import (
    block,
    block_product,
    loop_operand,
    outer_product,
    pair_blocks,
)


def gemv(W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype):
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    out_size = W.shape[2] if transpose_w else W.shape[3]
    rows, cols = pair_blocks(input_idx, output_idx, transpose_w)
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    hf = h.reshape(batch * i_win, h.shape[2])
    vf = valid_in.reshape(-1)
    n = batch * i_win * o_win
    Wl, w_dtype = loop_operand(W)

    def body(p, out):
        b, rem = p // (i_win * o_win), p % (i_win * o_win)
        i, j = rem // o_win, rem % o_win
        blk = block(Wl, rows[p], cols[p], w_dtype)
        blk = jnp.where(vf[b * i_win + i], blk, jnp.zeros((), blk.dtype))
        hv = lax.dynamic_slice_in_dim(hf, b * i_win + i, 1)  # (1, size)
        y = block_product(hv, blk, transpose_w=transpose_w, acc_dtype=acc_dtype)
        k = b * o_win + j
        cur = lax.dynamic_slice_in_dim(out, k, 1)
        return lax.dynamic_update_slice_in_dim(out, cur + y, k, 0)

    (init,) = carry((jnp.zeros((batch * o_win, out_size), acc_dtype),), W, h, rows, cols)
    out = lax.fori_loop(0, n, body, init)
    return out.reshape(batch, o_win, out_size)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype):
    if is_low_precision(o.dtype, acc_dtype):
        args = (o, x, y, x_idx, y_idx, valid_x, valid_y)
        return _grouped.outer(*args, acc_dtype=acc_dtype, rows_per_step=1)
    batch, x_win, _ = x.shape
    y_win = y.shape[1]
    xf = x.reshape(batch * x_win, x.shape[2])
    yf = y.reshape(batch * y_win, y.shape[2])
    xi, yi = x_idx.reshape(-1), y_idx.reshape(-1)
    vx, vy = valid_x.reshape(-1), valid_y.reshape(-1)
    z = jnp.zeros((), jnp.int32)

    def body(p, o):
        b, rem = p // (x_win * y_win), p % (x_win * y_win)
        kx, ky = b * x_win + rem // y_win, b * y_win + rem % y_win
        xv = lax.dynamic_slice_in_dim(xf, kx, 1)
        yv = lax.dynamic_slice_in_dim(yf, ky, 1)
        upd = outer_product(xv, yv, acc_dtype=acc_dtype)
        upd = jnp.where(vx[kx] & vy[ky], upd, jnp.zeros((), upd.dtype))
        start = (xi[kx], yi[ky], z, z)
        blk = lax.dynamic_slice(o, start, (1, 1, *o.shape[2:]))
        return lax.dynamic_update_slice(o, blk + upd[None, None], start)

    (o,) = carry((o,), x, y, xi, yi)
    return lax.fori_loop(0, batch * x_win * y_win, body, o)
