"""The execution seam: how a validated block-sparse problem is actually computed.

Everything above this module (validation, index normalisation, masking of
out-of-range entries, the custom VJPs) is shared; everything here only sees
in-range ``int32`` indices and returns results in the accumulation dtype.
Faster strategies plug in here without touching the public ops.

Shape letters (the one vocabulary of the package): ``b`` batch, ``i`` i_win,
``j`` o_win, ``s`` i_size, ``t`` o_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax._checks import common_float_dtype


def gemv_contract(
    W: jax.Array,
    h: jax.Array,
    input_idx: jax.Array,
    output_idx: jax.Array,
    *,
    transpose_w: bool,
    acc_dtype: np.dtype,
) -> jax.Array:
    """``sum_i h[b, i] @ blk(b, i, j)`` as ``(batch, o_win, out_size)`` in ``acc_dtype``.

    ``blk(b, i, j)`` is ``W[input_idx[b, i], output_idx[b, j]]`` or, with
    ``transpose_w``, ``W[output_idx[b, j], input_idx[b, i]].T`` - the block of
    ``W.transpose(1, 0, 3, 2)`` without materialising that transpose.
    """
    dt = common_float_dtype(W.dtype, h.dtype)
    W, h = W.astype(dt), h.astype(dt)
    if transpose_w:
        blocks = W[output_idx[:, None, :], input_idx[:, :, None]]  # (b, i, j, t, s)
        spec = "bis,bijts->bjt"
    else:
        blocks = W[input_idx[:, :, None], output_idx[:, None, :]]  # (b, i, j, s, t)
        spec = "bis,bijst->bjt"
    return jnp.einsum(spec, h, blocks, preferred_element_type=acc_dtype)


def outer_contract(
    o: jax.Array,
    x: jax.Array,
    y: jax.Array,
    x_idx: jax.Array,
    y_idx: jax.Array,
    alpha: jax.Array,
    *,
    acc_dtype: np.dtype,
) -> jax.Array:
    """``o`` with ``alpha * outer(x[b, i], y[b, j])`` added to block ``(x_idx[b, i], y_idx[b, j])``.

    Returns ``o``'s shape in ``acc_dtype``; repeated blocks accumulate.
    """
    dt = common_float_dtype(x.dtype, y.dtype)
    upd = jnp.einsum("bis,bjt->bijst", x.astype(dt), y.astype(dt), preferred_element_type=acc_dtype)
    upd = upd * alpha.astype(acc_dtype)
    return o.astype(acc_dtype).at[x_idx[:, :, None], y_idx[:, None, :]].add(upd)
