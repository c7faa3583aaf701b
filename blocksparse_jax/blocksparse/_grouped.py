"""The ``grouped`` strategy: sort the pairs by block, multiply each distinct block once.

The ``(example, i, j)`` pairs are sorted by the block they use; a loop then
walks the runs of pairs sharing a block: each block is read once and multiplied
by up to ``rows`` stacked activation rows (a small GEMM); the weight update
adds ``X_run^T @ Y_run`` into each block once, in place.  Memory traffic is the
distinct blocks touched, which is the bandwidth bound.  Masked pairs sort
after every real one (their block key is one past the last block) and the
loop stops before them; the lanes of a step beyond its run are selected away
(``jnp.where``) on both factors, never multiplied by zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse._accumulate import is_low_precision
from blocksparse_jax.blocksparse._carry import carry
from blocksparse_jax.blocksparse._cost import group_rows
from blocksparse_jax.blocksparse._pairs import (
    block,
    block_product,
    loop_operand,
    outer_product,
    pair_blocks,
)


def _runs(rows, cols, valid, n_rows):
    """Sorts the pairs by block; returns ``(perm, rows, cols, run_end, n_valid)`` in sorted order.

    ``run_end[p]`` is one past the last sorted position using the same block as
    ``p``; the ``n_valid`` pairs with ``valid`` come first (a masked pair's row
    key is ``n_rows``, past every block).
    """
    n = rows.shape[0]
    rows = jnp.where(valid, rows, jnp.int32(n_rows))
    iota = jnp.arange(n, dtype=jnp.int32)
    rs, cs, perm = lax.sort((rows, cols, iota), num_keys=2)
    start = jnp.concatenate([jnp.ones((1,), jnp.bool_), (rs[1:] != rs[:-1]) | (cs[1:] != cs[:-1])])
    nxt = jnp.where(start, iota, n)
    # run_end[p] = min over q > p of nxt[q]  (a reverse cumulative minimum).
    shifted = jnp.concatenate([nxt[1:], jnp.full((1,), n, jnp.int32)])
    run_end = lax.cummin(shifted, reverse=True)
    return perm, rs, cs, run_end, jnp.sum(valid, dtype=jnp.int32)


def gemv(W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype):
    batch, i_win, in_size = h.shape
    o_win = output_idx.shape[1]
    out_size = W.shape[2] if transpose_w else W.shape[3]
    n = batch * i_win * o_win
    P = group_rows(n, W.shape[0] * W.shape[1])
    rows, cols = pair_blocks(input_idx, output_idx, transpose_w)
    valid = jnp.broadcast_to(valid_in[:, :, None], rows.shape).reshape(-1)
    perm, rs, cs, run_end, n_valid = _runs(rows.reshape(-1), cols.reshape(-1), valid, W.shape[0])
    pb = perm // (i_win * o_win)
    pi = (perm // o_win) % i_win
    pj = perm % o_win
    hs = h[pb, pi]  # (n, in_size), activations in sorted order
    hs = jnp.concatenate([hs, jnp.zeros((P, in_size), hs.dtype)])
    lane = jnp.arange(P, dtype=jnp.int32)
    Wl, w_dtype = loop_operand(W)

    def cond(state):
        return state[0] < n_valid

    def body(state):
        pos, ys = state
        blk = block(Wl, rs[pos], cs[pos], w_dtype)
        x = lax.dynamic_slice_in_dim(hs, pos, P)
        y = block_product(x, blk, transpose_w=transpose_w, acc_dtype=acc_dtype)
        end = jnp.minimum(pos + P, run_end[pos])
        old = lax.dynamic_slice_in_dim(ys, pos, P)
        new = jnp.where((lane < end - pos)[:, None], y, old)
        return end, lax.dynamic_update_slice_in_dim(ys, new, pos, 0)

    ys0 = jnp.zeros((n + P, out_size), acc_dtype)
    refs = (Wl, hs, rs, cs, run_end, n_valid)
    _, ys = lax.while_loop(cond, body, carry((jnp.int32(0), ys0), *refs))
    out = jnp.zeros((batch * o_win, out_size), acc_dtype)
    out = out.at[pb * o_win + pj].add(ys[:n])
    return out.reshape(batch, o_win, out_size)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, rows_per_step=None):
    """The weight update, each run's ``X_run^T @ Y_run`` added to its block in place.

    For an ``o`` narrower than ``acc_dtype`` (``bfloat16``, ``float16``) a run
    longer than one step sums its steps in an ``acc_dtype`` block carried by the
    loop and adds the sum to ``o`` once, at the run's last step (one rounding per
    block); ``o`` is then carried as its bits (:func:`loop_operand`).
    ``rows_per_step`` overrides the lanes per step (``1``: one pair per step).
    """
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    n = batch * x_win * y_win
    P = group_rows(n, o.shape[0] * o.shape[1]) if rows_per_step is None else rows_per_step
    rows, cols = pair_blocks(x_idx, y_idx, False)
    valid = (valid_x[:, :, None] & valid_y[:, None, :]).reshape(-1)
    perm, rs, cs, run_end, n_valid = _runs(rows.reshape(-1), cols.reshape(-1), valid, o.shape[0])
    pb = perm // (x_win * y_win)
    pi = (perm // y_win) % x_win
    pj = perm % y_win
    xs = jnp.concatenate([x[pb, pi], jnp.zeros((P, x_size), x.dtype)])
    ys = jnp.concatenate([y[pb, pj], jnp.zeros((P, y_size), y.dtype)])
    lane = jnp.arange(P, dtype=jnp.int32)
    z = jnp.zeros((), jnp.int32)
    ol, o_dtype = loop_operand(o)
    low = is_low_precision(o_dtype, acc_dtype)

    def cond(state):
        return state[0] < n_valid

    def body(state):
        pos, ol, run_sum = state
        end = jnp.minimum(pos + P, run_end[pos])
        mine = (lane < end - pos)[:, None]  # lanes of this run; the rest belong to others
        xv = jnp.where(mine, lax.dynamic_slice_in_dim(xs, pos, P), jnp.zeros((), xs.dtype))
        yv = jnp.where(mine, lax.dynamic_slice_in_dim(ys, pos, P), jnp.zeros((), ys.dtype))
        upd = outer_product(xv, yv, acc_dtype=acc_dtype)
        start = (rs[pos], cs[pos], z, z)
        if not low:
            # Read and written at the same start, so XLA updates the block in place.
            blk = lax.dynamic_slice(ol, start, (1, 1, x_size, y_size))
            return end, lax.dynamic_update_slice(ol, blk + upd[None, None], start), run_sum
        blk = block(ol, rs[pos], cs[pos], o_dtype)
        # A run's first step starts a new sum; its last step adds the sum to the block.
        first = (pos == 0) | (rs[pos - 1] != rs[pos]) | (cs[pos - 1] != cs[pos])
        run_sum = jnp.where(first, upd, run_sum + upd)
        new = (blk.astype(acc_dtype) + run_sum).astype(o_dtype)
        new = jnp.where(end == run_end[pos], new, blk)
        new = lax.bitcast_convert_type(new, ol.dtype)[None, None]
        return end, lax.dynamic_update_slice(ol, new, start), run_sum

    run_sum = jnp.zeros((x_size, y_size) if low else (), acc_dtype)
    init = carry((jnp.int32(0), ol, run_sum), xs, ys, rs, cs, run_end, n_valid)
    ol = lax.while_loop(cond, body, init)[1]
    return lax.bitcast_convert_type(ol, o_dtype) if ol.dtype != o_dtype else ol
