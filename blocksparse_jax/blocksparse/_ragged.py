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
the flops of the useful work; on CPU a correct but slow expansion.  ``auto``
picks this strategy only where its cost model says so (see ``_cost``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse import _gather
from blocksparse_jax.blocksparse._accumulate import add_blocks
from blocksparse_jax.blocksparse._gather import GATHER_BUDGET_BYTES
from blocksparse_jax.blocksparse._pairs import pair_blocks


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


def _all_finite(*xs):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def gemv(
    W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, budget=GATHER_BUDGET_BYTES
):
    batch, i_win, _ = h.shape
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
    rhs = W[g_rows, g_cols]  # (capacity, i_size, o_size), each touched block once
    # The masked pairs' group (and the unused ones) multiply a block of zeros.
    rhs = jnp.where(used[:, None, None], rhs, jnp.zeros((), rhs.dtype)).astype(lhs.dtype)
    contract = 2 if transpose_w else 1  # the transposed block is contracted on its o_size
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (contract,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0],
    )

    def grouped(lhs, rhs):
        y = lax.ragged_dot_general(lhs, rhs, sizes, dims, preferred_element_type=acc_dtype)
        out = jnp.zeros((batch * o_win, out_size), acc_dtype).at[pb * o_win + pj].add(y)
        return out.reshape(batch, o_win, out_size)

    def exact(lhs, rhs):
        return _gather.gemv(
            W, h, input_idx, output_idx, valid_in,
            transpose_w=transpose_w, acc_dtype=acc_dtype, budget=budget,
        )  # fmt: skip

    # ragged_dot's expansions (CPU, XLA:GPU) multiply every row by every group's
    # block, masked by zeros: a NaN or inf would reach other groups' rows as
    # 0 * inf.  Non-finite operands take gather's exact path instead.
    return lax.cond(_all_finite(lhs, rhs), grouped, exact, lhs, rhs)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget=GATHER_BUDGET_BYTES):
    """``o`` (in its own dtype) plus each distinct block's summed update, added once."""
    batch, x_win, _ = x.shape
    y_win = y.shape[1]
    n = batch * x_win * y_win
    capacity = min(n, o.shape[0] * o.shape[1] + 1)  # + the group of masked pairs
    rows, cols = pair_blocks(x_idx, y_idx, False)
    valid = (valid_x[:, :, None] & valid_y[:, None, :]).reshape(-1)
    perm, sizes, g_rows, g_cols, used = _groups(
        rows.reshape(-1), cols.reshape(-1), valid, o.shape[1], capacity
    )
    pb, pi, pj = _pair_positions(perm, x_win, y_win)
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())),
        lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[],
    )
    xs, ys = x[pb, pi], y[pb, pj]

    def grouped(xs, ys):
        return lax.ragged_dot_general(xs, ys, sizes, dims, preferred_element_type=acc_dtype)

    def exact(xs, ys):
        # Each pair's own product, summed within its group only.
        gid = jnp.repeat(jnp.arange(capacity, dtype=jnp.int32), sizes, total_repeat_length=n)
        per_pair = jnp.einsum("ns,nt->nst", xs, ys, preferred_element_type=acc_dtype)
        return jax.ops.segment_sum(per_pair, gid, num_segments=capacity)

    # As in gemv: with non-finite activations each group sums its own pairs' products.
    upd = lax.cond(_all_finite(xs, ys), grouped, exact, xs, ys)  # (capacity, s, t)
    return add_blocks(o, upd, g_rows, g_cols, used)
