"""Weight updates of low-precision weights: a float32 sum per touched block, added once.

With ``bfloat16`` or ``float16`` weights, accumulating the outer products
into a float32 copy of ``W`` would cost twice ``W``'s own memory; adding each
product to ``W``'s dtype directly would round once per pair.  Instead the
``(example, i, j)`` pairs are numbered by the distinct block they touch (at
most ``capacity = min(pairs, i_blocks * o_blocks)``, a static bound), each
strategy sums the products of a block's pairs into a ``(capacity, i_size,
o_size)`` buffer in the accumulation dtype, and each sum is added to its block
once, with one rounding (:func:`add_blocks`).

The strategies need no change for this: :func:`outer_by_block` hands them the
pairs as a problem of its own, one pair per example, whose "weight" is the
buffer of distinct blocks (``gather``, and so ``pallas``, runs this way).  ``loop``
and ``grouped`` instead walk the pairs sorted by block and carry one block's
sum; ``ragged`` sums its groups and ``dense`` its GEMM in float32 themselves.

The float32 sums of all distinct blocks would grow with the pairs, up to twice
the bytes of a ``bfloat16`` weight; they are made a chunk of
:func:`slots_per_chunk` distinct blocks at a time (one chunk while they fit the
strategy's budget or a quarter of ``o``'s bytes; on GPU and TPU the budget is
device-sized), each chunk added to ``o`` before the next.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse._carry import carry
from blocksparse_jax.blocksparse._pairs import loop_operand, pair_blocks


def is_low_precision(dtype, acc_dtype) -> bool:
    """Whether a weight of ``dtype`` is narrower than the accumulation dtype."""
    return jnp.dtype(dtype).itemsize < jnp.dtype(acc_dtype).itemsize


def distinct_blocks(rows, cols, valid, n_cols: int, capacity: int):
    """Numbers the pairs by the distinct block they touch.

    Args:
      rows, cols: ``(pairs,)`` block coordinates of each pair.
      valid: ``(pairs,)`` whether the pair is present.
      n_cols: the number of block columns.
      capacity: a static bound on the number of distinct blocks of the present pairs.

    Returns:
      ``(slot, g_rows, g_cols, used)``: each pair's slot in ``[0, capacity)``
      (``capacity`` for an absent pair), each slot's block (``(0, 0)`` for an
      unused slot) and whether the slot holds a block.
    """
    n = rows.shape[0]
    masked = jnp.iinfo(jnp.int32).max
    key = jnp.where(valid, rows * n_cols + cols, masked)
    skey, perm = lax.sort((key, jnp.arange(n, dtype=jnp.int32)), num_keys=1)
    start = jnp.concatenate([jnp.ones((1,), jnp.bool_), skey[1:] != skey[:-1]])
    real = skey != masked
    gid = jnp.where(real, jnp.cumsum(start.astype(jnp.int32)) - 1, capacity)
    slot = jnp.zeros((n,), jnp.int32).at[perm].set(gid)
    gkey = jnp.full((capacity,), -1, jnp.int32).at[gid].max(skey, mode="drop")
    used = gkey >= 0
    gkey = jnp.where(used, gkey, 0)
    return slot, gkey // n_cols, gkey % n_cols, used


def slots_per_chunk(capacity: int, slot_bytes: int, o_bytes: int, budget: int) -> int:
    """Distinct blocks summed at once: all ``capacity`` while their sums fit ``budget``
    bytes or a quarter of ``o``'s.

    ``slot_bytes`` is one block's sum (in the accumulation dtype); a chunk holds
    at least one block.
    """
    return max(1, min(capacity, max(budget, o_bytes // 4) // max(1, slot_bytes)))


def add_to_bits(bits, dtype, sums, g_rows, g_cols, used):
    """:func:`add_blocks` on ``o`` held as its bits (:func:`loop_operand`); returns the bits."""
    old = lax.bitcast_convert_type(bits[g_rows, g_cols], dtype)
    new = (old.astype(sums.dtype) + sums).astype(dtype)
    if new.dtype != bits.dtype:
        new = lax.bitcast_convert_type(new, bits.dtype)
    rows = jnp.where(used, g_rows, bits.shape[0])  # an unused slot writes nothing
    return bits.at[rows, g_cols].set(new, mode="drop")


def add_blocks(o, sums, g_rows, g_cols, used):
    """``o`` with ``sums[k]`` added to block ``(g_rows[k], g_cols[k])`` of each used slot ``k``.

    The addition runs in ``sums``' dtype and rounds to ``o``'s dtype once.
    The blocks are read and written as their bits (:func:`loop_operand`):
    XLA:CPU would otherwise run a low-precision scatter on a float32 copy of ``o``.
    """
    bits, dtype = loop_operand(o)
    bits = add_to_bits(bits, dtype, sums, g_rows, g_cols, used)
    return lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits


def outer_by_block(outer, o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget):
    """A strategy's ``outer`` summed per distinct block in ``acc_dtype``, added to ``o`` once.

    ``outer`` is a strategy's ``outer`` function (the interface of ``_dispatch``,
    ``budget`` its keyword); it runs on a problem with one pair per example: the
    pair's rows of ``x`` and ``y``, and its slot among the distinct blocks as the
    block index, so that it sums, in ``acc_dtype``, the products of each distinct
    block's pairs.
    With more distinct blocks than :func:`slots_per_chunk` allows, a loop runs
    that problem once per chunk of slots (the pairs of other chunks masked)
    and adds each chunk's sums to ``o``, carried as its bits.
    """
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    n = batch * x_win * y_win
    capacity = min(n, o.shape[0] * o.shape[1])
    rows, cols = pair_blocks(x_idx, y_idx, False)
    valid = (valid_x[:, :, None] & valid_y[:, None, :]).reshape(-1)
    slot, g_rows, g_cols, used = distinct_blocks(
        rows.reshape(-1), cols.reshape(-1), valid, o.shape[1], capacity
    )
    p = jnp.arange(n, dtype=jnp.int32)
    pb, pi, pj = p // (x_win * y_win), (p // y_win) % x_win, p % y_win
    xs, ys = x[pb, pi][:, None], y[pb, pj][:, None]  # (pairs, 1, size)
    slot_bytes = x_size * y_size * jnp.dtype(acc_dtype).itemsize
    span = slots_per_chunk(capacity, slot_bytes, o.size * o.dtype.itemsize, budget)
    n_chunks = -(-capacity // span)
    pad = n_chunks * span - capacity
    g_rows, g_cols = (jnp.pad(a, (0, pad)) for a in (g_rows, g_cols))
    used = jnp.pad(used, (0, pad))

    def chunk_sums(first):
        """The ``(span, x_size, y_size)`` sums of slots ``first .. first + span - 1``."""
        mine = valid & (slot >= first) & (slot < first + span)
        # A pair of another chunk (or an absent one) is masked: never multiplied.
        slots = jnp.where(mine, slot - first, 0)[:, None]
        (zeros,) = carry((jnp.zeros((span, 1, x_size, y_size), acc_dtype),), o, x, y)
        sums = outer(
            zeros,
            xs,
            ys,
            slots,
            jnp.zeros((n, 1), jnp.int32),
            mine[:, None],
            jnp.ones((n, 1), jnp.bool_),
            acc_dtype=acc_dtype,
            budget=budget,
        )
        return sums[:, 0]

    if n_chunks == 1:
        return add_blocks(o, chunk_sums(0), g_rows, g_cols, used)
    bits, dtype = loop_operand(o)

    def body(c, bits):
        first = c * span
        window = [lax.dynamic_slice_in_dim(a, first, span) for a in (g_rows, g_cols, used)]
        return add_to_bits(bits, dtype, chunk_sums(first), *window)

    (bits,) = carry((bits,), xs, ys, slot)
    bits = lax.fori_loop(jnp.int32(0), jnp.int32(n_chunks), body, bits)
    return lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits
