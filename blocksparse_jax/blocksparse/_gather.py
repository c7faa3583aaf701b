"""The ``gather`` strategy: gather the selected blocks and contract with one einsum.

The selected blocks are gathered into a ``(chunk, i_win, o_win, i_size,
o_size)`` buffer, over chunks of the batch so that the buffer stays under a
byte budget (a chunk holds at least one example): :data:`GATHER_BUDGET_BYTES`
on CPU, where a small chunk stays in cache; on GPU and TPU the dispatcher
passes a budget tied to the device's memory, so that the whole batch is
usually one chunk (no loop).  The weight update scatter-adds each chunk's
outer products.  The blocks of masked pairs are selected away (``jnp.where``)
in the gathered buffer, and their updates in the update buffer.  This is the
reference strategy: the others give its values, NaN and inf included.

A low-precision ``W`` is gathered as its bits and only the gathered blocks are
widened; a low-precision weight update sums each distinct block in the
accumulation dtype first (:func:`~blocksparse_jax.blocksparse._accumulate.outer_by_block`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse._accumulate import is_low_precision, outer_by_block
from blocksparse_jax.blocksparse._pairs import loop_operand

GATHER_BUDGET_BYTES = 2 * 2**20
"""Largest gathered-block buffer of the ``gather`` strategy (one chunk of the batch)."""


def chunk_size(batch: int, per_example_bytes: int, budget: int = GATHER_BUDGET_BYTES) -> int:
    """Examples per chunk: as many as fit ``budget`` bytes, at least one."""
    return max(1, min(batch, budget // max(per_example_bytes, 1)))


def _split(x, chunk, n):
    """Pads axis 0 of ``x`` to ``n * chunk`` (zeros) and reshapes to ``(n, chunk, ...)``."""
    pad = n * chunk - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    return x.reshape(n, chunk, *x.shape[1:])


def _gemv_all(W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype):
    bits, dtype = loop_operand(W)
    if transpose_w:
        blocks = bits[output_idx[:, None, :], input_idx[:, :, None]]  # (b, i, j, t, s)
        spec = "bis,bijts->bjt"
    else:
        blocks = bits[input_idx[:, :, None], output_idx[:, None, :]]  # (b, i, j, s, t)
        spec = "bis,bijst->bjt"
    blocks = lax.bitcast_convert_type(blocks, dtype) if blocks.dtype != dtype else blocks
    blocks = jnp.where(valid_in[:, :, None, None, None], blocks, jnp.zeros((), blocks.dtype))
    blocks = blocks.astype(h.dtype)
    return jnp.einsum(spec, h, blocks, preferred_element_type=acc_dtype)


def gemv(
    W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, budget=GATHER_BUDGET_BYTES
):
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    per_example = i_win * o_win * W.shape[2] * W.shape[3] * max(W.dtype.itemsize, h.dtype.itemsize)
    chunk = chunk_size(batch, per_example, budget)
    f = lambda a: _gemv_all(W, *a, transpose_w=transpose_w, acc_dtype=acc_dtype)
    args = (h, input_idx, output_idx, valid_in)
    if chunk >= batch:
        return f(args)
    n = -(-batch // chunk)
    out = lax.map(f, tuple(_split(a, chunk, n) for a in args))
    return out.reshape(n * chunk, *out.shape[2:])[:batch]


def _outer_all(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype):
    upd = jnp.einsum("bis,bjt->bijst", x, y, preferred_element_type=acc_dtype)
    pair = valid_x[:, :, None] & valid_y[:, None, :]
    upd = jnp.where(pair[..., None, None], upd, jnp.zeros((), upd.dtype))
    return o.at[x_idx[:, :, None], y_idx[:, None, :]].add(upd)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget=GATHER_BUDGET_BYTES):
    if is_low_precision(o.dtype, acc_dtype):  # a float32 sum per distinct block, added once
        args = (o, x, y, x_idx, y_idx, valid_x, valid_y)
        return outer_by_block(outer, *args, acc_dtype=acc_dtype, budget=budget)
    batch, x_win, _ = x.shape
    y_win = y.shape[1]
    per_example = x_win * y_win * o.shape[2] * o.shape[3] * o.dtype.itemsize
    chunk = chunk_size(batch, per_example, budget)
    args = (x, y, x_idx, y_idx, valid_x, valid_y)
    if chunk >= batch:
        return _outer_all(o, *args, acc_dtype=acc_dtype)
    n = -(-batch // chunk)
    xs = tuple(_split(a, chunk, n) for a in args)

    def step(o, a):
        return _outer_all(o, *a, acc_dtype=acc_dtype), None

    return lax.scan(step, o, xs)[0]
