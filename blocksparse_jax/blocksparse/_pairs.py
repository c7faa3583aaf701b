"""Addressing the blocks of ``W`` that a batch of ``(example, i, j)`` pairs selects."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def pair_blocks(input_idx, output_idx, transpose_w):
    """``(row, col)`` block indices of ``W`` for every pair, each ``(batch, i_win, o_win)``."""
    b, i = input_idx.shape
    j = output_idx.shape[1]
    ii = jnp.broadcast_to(input_idx[:, :, None], (b, i, j))
    oi = jnp.broadcast_to(output_idx[:, None, :], (b, i, j))
    return (oi, ii) if transpose_w else (ii, oi)


def loop_operand(W):
    """``W`` as the strategies' loops carry it and gather from it: low-precision floats as bits.

    XLA:CPU has no low-precision products and converts a low-precision
    ``W`` that a loop reads to float32 as a whole (a float32 copy of ``W``);
    held as unsigned integers of the same width, each block (or gathered
    chunk) is converted back (:func:`block`) and widened on its own.
    """
    if W.dtype.itemsize < 4:
        return lax.bitcast_convert_type(W, jnp.dtype(f"uint{8 * W.dtype.itemsize}")), W.dtype
    return W, W.dtype


def block(W, r, c, dtype=None):
    """``W[r, c]`` as ``(s, t)`` through a dynamic slice (no gather).

    ``W`` may be the bits of :func:`loop_operand`; ``dtype`` is then its float dtype.
    """
    z = jnp.zeros((), r.dtype)
    blk = lax.dynamic_slice(W, (r, c, z, z), (1, 1, W.shape[2], W.shape[3]))[0, 0]
    if dtype is not None and blk.dtype != dtype:
        blk = lax.bitcast_convert_type(blk, dtype)
    return blk


def block_product(x, blk, *, transpose_w, acc_dtype):
    """``x @ blk`` (or ``x @ blk.T`` with ``transpose_w``) for ``x`` of shape ``(rows, size)``.

    ``blk`` is widened to ``x``'s dtype if it is narrower (one block, not ``W``).
    """
    blk = blk.astype(x.dtype)
    if transpose_w:
        return lax.dot_general(x, blk, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)
    return jnp.dot(x, blk, preferred_element_type=acc_dtype)


def outer_product(x, y, *, acc_dtype):
    """``x.T @ y`` for ``x (rows, x_size)`` and ``y (rows, y_size)``: the summed outer products."""
    return lax.dot_general(x, y, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
