"""The ``ragged`` strategy: a grouped matrix product (``jax.lax.ragged_dot``) over the touched blocks.

The ``(example, i, j)`` pairs are sorted by the block they use; the pairs of
one block form a group.  The distinct blocks (at most ``capacity =
min(pairs, i_blocks * o_blocks + 1)``, a static bound, the extra group holding
the pairs of masked slots against a block of zeros; unused groups are empty) are
gathered once into a ``(capacity, i_size, o_size)`` buffer and multiplied by
the activation rows of their group in one ``ragged_dot``; the weight update is
``ragged_dot``'s other mode (the pairs ragged along the contracted axis), one
``(i_size, o_size)`` sum per distinct block, accumulated in the accumulation
dtype and added to its block once, in ``o``'s dtype.

How ``ragged_dot`` runs depends on the backend: a grouped-matmul kernel on TPU;
on XLA:GPU (by default) one zero-padded product per group, ``capacity`` times
the flops of the useful work; on CPU a correct but slow expansion, whose
temporaries hold every row against every group.  ``auto`` picks this strategy
only where its cost model says so (see ``_cost``).

The groups are taken a chunk at a time when one ``ragged_dot`` over all of them
would hold more than the dispatcher's ``budget`` (on CPU a few MiB; on GPU and
TPU a share of the device's memory, so usually one chunk): each chunk is one
``ragged_dot`` over all the rows, the rows of the other groups in two groups of
their own against a block of zeros.  A low-precision weight is read (and the
weight update written) as its bits (:func:`~blocksparse_jax.blocksparse._pairs.loop_operand`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse import _gather
from blocksparse_jax.blocksparse._accumulate import add_to_bits
from blocksparse_jax.blocksparse._carry import carry
from blocksparse_jax.blocksparse._gather import GATHER_BUDGET_BYTES
from blocksparse_jax.blocksparse._pairs import loop_operand, pair_blocks


def _groups(rows, cols, valid, n_cols, capacity):
    """Sorts the pairs by block; the groups of equal blocks.

    Pairs with a masked slot (``valid`` ``False``) get a key past every block,
    so they sort last and form a group of their own that no block backs.
    Returns ``(perm, sizes, g_rows, g_cols, used)``: the sorting permutation of
    the pairs, the ``(capacity,)`` group sizes (zero for unused groups), each
    group's block (block ``(0, 0)`` for an unused group) and whether it holds
    real (unmasked) pairs.
    """
    n = rows.shape[0]
    masked_key = jnp.iinfo(jnp.int32).max
    key = jnp.where(valid, rows * n_cols + cols, masked_key)
    skey, perm = lax.sort((key, jnp.arange(n, dtype=jnp.int32)), num_keys=1)
    start = jnp.concatenate([jnp.ones((1,), jnp.bool_), skey[1:] != skey[:-1]])
    gid = jnp.cumsum(start.astype(jnp.int32)) - 1
    sizes = jnp.zeros((capacity,), jnp.int32).at[gid].add(1)
    real = skey != masked_key
    gkey = jnp.zeros((capacity,), jnp.int32).at[gid].max(jnp.where(real, skey, 0))
    used = jnp.zeros((capacity,), jnp.bool_).at[gid].max(real)
    return perm, sizes, gkey // n_cols, gkey % n_cols, used


def _pair_positions(perm, i_win, o_win):
    """``(b, i, j)`` of each sorted pair."""
    return perm // (i_win * o_win), (perm // o_win) % i_win, perm % o_win


class _Chunks(NamedTuple):
    """The groups padded (with empty groups) to ``n_chunks`` chunks of ``span`` groups."""

    n_chunks: int
    span: int
    sizes: jax.Array  # (n_chunks * span,) rows of each group
    starts: jax.Array  # (n_chunks * span,) the first sorted row of each group
    g_rows: jax.Array
    g_cols: jax.Array
    used: jax.Array

    def window(self, c):
        """Chunk ``c``'s ``(sizes, g_rows, g_cols, used)``, its sizes with the rows
        before and after it as a first and a last group: ``(span + 2,)``."""
        first = c * self.span
        sizes, g_rows, g_cols, used = (
            lax.dynamic_slice_in_dim(a, first, self.span)
            for a in (self.sizes, self.g_rows, self.g_cols, self.used)
        )
        n = jnp.sum(self.sizes, dtype=jnp.int32)
        before = self.starts[first]
        after = n - before - jnp.sum(sizes, dtype=jnp.int32)
        return jnp.concatenate([before[None], sizes, after[None]]), g_rows, g_cols, used


def _chunks(sizes, g_rows, g_cols, used, group_bytes: int, budget: int) -> _Chunks:
    """As many groups per chunk as fit ``budget`` at ``group_bytes`` each (at least one)."""
    capacity = sizes.shape[0]
    span = max(1, min(capacity, budget // max(1, group_bytes)))
    n_chunks = -(-capacity // span)
    pad = n_chunks * span - capacity
    sizes, g_rows, g_cols = (jnp.pad(a, (0, pad)) for a in (sizes, g_rows, g_cols))
    used = jnp.pad(used, (0, pad))
    starts = jnp.cumsum(sizes, dtype=jnp.int32) - sizes
    return _Chunks(n_chunks, span, sizes, starts, g_rows, g_cols, used)


def _blocks(bits, dtype, g_rows, g_cols, used, to_dtype):
    """The groups' blocks of ``W`` (held as ``bits``), zeros for the unused groups."""
    rhs = bits[g_rows, g_cols]
    rhs = lax.bitcast_convert_type(rhs, dtype) if rhs.dtype != dtype else rhs
    return jnp.where(used[:, None, None], rhs, jnp.zeros((), rhs.dtype)).astype(to_dtype)


def _all_finite(*xs):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def gemv(
    W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, budget=GATHER_BUDGET_BYTES
):
    batch, i_win, in_size = h.shape
    o_win = output_idx.shape[1]
    out_size = W.shape[2] if transpose_w else W.shape[3]
    n = batch * i_win * o_win
    capacity = min(n, W.shape[0] * W.shape[1] + 1)  # + the group of masked pairs
    rows, cols = pair_blocks(input_idx, output_idx, transpose_w)
    valid = jnp.broadcast_to(valid_in[:, :, None], rows.shape).reshape(-1)
    perm, sizes, g_rows, g_cols, used = _groups(
        rows.reshape(-1), cols.reshape(-1), valid, W.shape[1], capacity
    )
    pb, pi, pj = _pair_positions(perm, i_win, o_win)
    lhs = h[pb, pi]  # (n, in_size), the activation rows in block order
    acc_bytes = jnp.dtype(acc_dtype).itemsize
    # Per group: its block in lhs's dtype, and (CPU) every row's product with it.
    group_bytes = in_size * out_size * lhs.dtype.itemsize + n * out_size * acc_bytes
    chunks = _chunks(sizes, g_rows, g_cols, used, group_bytes, budget)
    contract = 2 if transpose_w else 1  # the transposed block is contracted on its o_size
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (contract,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )

    def product(lhs, rhs, sizes):
        return lax.ragged_dot_general(lhs, rhs, sizes, dims, preferred_element_type=acc_dtype)

    def scatter(y):
        out = jnp.zeros((batch * o_win, out_size), acc_dtype).at[pb * o_win + pj].add(y)
        return out.reshape(batch, o_win, out_size)

    def grouped(lhs, W):
        if chunks.n_chunks == 1:
            # The masked pairs' group (and the unused ones) multiply a block of zeros.
            rhs = _blocks(W, W.dtype, g_rows, g_cols, used, lhs.dtype)
            return scatter(product(lhs, rhs, sizes))
        bits, w_dtype = loop_operand(W)
        zero = jnp.zeros((1, *W.shape[2:]), lhs.dtype)

        def body(c, y):
            sizes_c, rows_c, cols_c, used_c = chunks.window(c)
            rhs = _blocks(bits, w_dtype, rows_c, cols_c, used_c, lhs.dtype)
            return y + product(lhs, jnp.concatenate([zero, rhs, zero]), sizes_c)

        (y,) = carry((jnp.zeros((n, out_size), acc_dtype),), lhs, bits)
        return scatter(lax.fori_loop(jnp.int32(0), jnp.int32(chunks.n_chunks), body, y))

    def exact(lhs, W):
        args = (W, h, input_idx, output_idx, valid_in)
        return _gather.gemv(*args, transpose_w=transpose_w, acc_dtype=acc_dtype, budget=budget)

    # ragged_dot's expansions (CPU, XLA:GPU) multiply every row by every group's
    # block, masked by zeros: a NaN or inf would reach other groups' rows as
    # 0 * inf.  Non-finite operands take gather's exact path instead.
    touched = _blocks(W, W.dtype, g_rows, g_cols, used, W.dtype)
    return lax.cond(_all_finite(lhs, touched), grouped, exact, lhs, W)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget=GATHER_BUDGET_BYTES):
    """``o`` (in its own dtype) plus each distinct block's summed update, added once.

    With non-finite activations the update is ``gather``'s, whose pairs are
    each multiplied once (``ragged_dot``'s expansion would spread a NaN to the
    other groups).
    """
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    n = batch * x_win * y_win
    capacity = min(n, o.shape[0] * o.shape[1] + 1)  # + the group of masked pairs
    rows, cols = pair_blocks(x_idx, y_idx, False)
    valid = (valid_x[:, :, None] & valid_y[:, None, :]).reshape(-1)
    perm, sizes, g_rows, g_cols, used = _groups(
        rows.reshape(-1), cols.reshape(-1), valid, o.shape[1], capacity
    )
    pb, pi, pj = _pair_positions(perm, x_win, y_win)
    xs, ys = x[pb, pi], y[pb, pj]
    acc_bytes = jnp.dtype(acc_dtype).itemsize
    # Per group: its (x_size, y_size) sum and (CPU) every row of x masked for it.
    group_bytes = (x_size * y_size + n * x_size) * acc_bytes
    chunks = _chunks(sizes, g_rows, g_cols, used, group_bytes, budget)
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    bits, dtype = loop_operand(o)

    def grouped(bits, xs, ys):
        def body(c, bits):
            sizes_c, rows_c, cols_c, used_c = chunks.window(c)
            upd = lax.ragged_dot_general(xs, ys, sizes_c, dims, preferred_element_type=acc_dtype)
            return add_to_bits(bits, dtype, upd[1:-1], rows_c, cols_c, used_c)

        if chunks.n_chunks == 1:
            return body(jnp.int32(0), bits)
        (bits,) = carry((bits,), xs, ys)
        return lax.fori_loop(jnp.int32(0), jnp.int32(chunks.n_chunks), body, bits)

    def exact(bits, xs, ys):
        o = lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits
        args = (x, y, x_idx, y_idx, valid_x, valid_y)
        out = _gather.outer(o, *args, acc_dtype=acc_dtype, budget=budget).astype(dtype)
        return lax.bitcast_convert_type(out, bits.dtype) if bits.dtype != dtype else out

    bits = lax.cond(_all_finite(xs, ys), grouped, exact, bits, xs, ys)
    return lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits
