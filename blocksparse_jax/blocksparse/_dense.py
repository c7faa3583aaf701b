"""The ``dense`` strategy: scatter the activations into the full block space, one GEMM.

``(batch, i_blocks*i_size) @ (i_blocks*i_size, o_blocks*o_size)``, then the
selected outputs are picked; the weight update is ``X_dense^T @ Y_dense``.
Reads ``W`` once, at the price of the dense flops: best when the selected pairs
cover most of the block grid and the blocks are small.  The activations are
scattered in the accumulation dtype (repeated blocks of one example add up in
float32 for float16/bfloat16).  Low-precision weights stay low in memory: the
products have ``W``'s dtype as output, or run over row blocks of ``W`` where a
float32 product would exceed the budget (:func:`_gemv_dense`,
:func:`_outer_dense_low`).

The dense products also multiply the blocks no example selects, by zero.  That
is exact only while the factors are finite (``0 * inf`` is NaN), so each call
checks, at run time, the operand the dense product multiplies by zero: ``W``
for the gemv, the activations for the weight update.  If one holds a NaN or an
inf, the call computes with :mod:`~blocksparse_jax.blocksparse._gather` instead
(``lax.cond``), which gives the reference values, NaN and inf where the selected
products put them and nowhere else.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from blocksparse_jax.blocksparse import _gather
from blocksparse_jax.blocksparse._accumulate import is_low_precision
from blocksparse_jax.blocksparse._carry import carry
from blocksparse_jax.blocksparse._gather import GATHER_BUDGET_BYTES
from blocksparse_jax.blocksparse._pairs import loop_operand


def _all_finite(*xs):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def _dense_activations(W, h, input_idx, *, transpose_w, acc_dtype):
    """``h`` scattered into the full block space, summed in ``acc_dtype``.

    Returns ``(hd, fits)``: ``fits`` is ``False`` where a sum does not fit
    ``h``'s dtype (float16 overflow), in which case the caller takes the exact
    path (the single product of :func:`_gemv_dense` runs in ``h``'s dtype).
    """
    batch = h.shape[0]
    nr, nc, s, t = W.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    shape = (batch, nc, t) if transpose_w else (batch, nr, s)
    hd = jnp.zeros(shape, acc_dtype).at[b, input_idx].add(h.astype(acc_dtype))
    return hd, jnp.all(jnp.isfinite(hd.astype(h.dtype)) | ~jnp.isfinite(hd))


def _gemv_dense(W, hd, output_idx, *, transpose_w, acc_dtype, budget, dtype):
    """The dense product and the selected outputs; ``hd`` is in ``acc_dtype``.

    A low-precision ``W`` whose float32 copy would exceed ``budget`` is
    multiplied in row blocks of at most ``budget`` bytes, each widened to
    ``acc_dtype``, in a loop that carries ``W`` as its bits: XLA:CPU computes
    float16 products in float32 and would otherwise convert the whole of
    ``W``.  Otherwise (on GPU and TPU, a device-sized budget) it is one product
    in ``dtype``, the activations' (``W``'s dtype for activations of that
    dtype: their sums are rounded to it once).
    """
    nr = W.shape[0]
    rows = nr
    if is_low_precision(W.dtype, acc_dtype):
        row_bytes = math.prod(W.shape[1:]) * jnp.dtype(acc_dtype).itemsize
        rows = _largest_divisor(nr, budget // row_bytes)
    # With transpose_w, hd lives in the column space (nc, t) and the outputs in the row
    # space (nr, s); otherwise the reverse.
    spec = "blt,klst->bks" if transpose_w else "bks,klst->blt"
    if rows == nr:
        hd = hd.astype(dtype)
        y = jnp.einsum(spec, hd, W.astype(dtype), preferred_element_type=acc_dtype)
    else:
        Wl, w_dtype = loop_operand(W)

        def body(c, y):
            k = c * rows
            blk = lax.bitcast_convert_type(lax.dynamic_slice_in_dim(Wl, k, rows), w_dtype)
            blk = blk.astype(acc_dtype)
            if transpose_w:
                part = jnp.einsum(spec, hd, blk, preferred_element_type=acc_dtype)
                return lax.dynamic_update_slice_in_dim(y, part, k, axis=1)
            part = lax.dynamic_slice_in_dim(hd, k, rows, axis=1)
            return y + jnp.einsum(spec, part, blk, preferred_element_type=acc_dtype)

        batch = hd.shape[0]
        out_shape = (batch, nr, W.shape[2]) if transpose_w else (batch, *W.shape[1:4:2])
        (y,) = carry((jnp.zeros(out_shape, acc_dtype),), Wl, hd)
        y = lax.fori_loop(jnp.int32(0), jnp.int32(nr // rows), body, y)
    return jnp.take_along_axis(y, output_idx[:, :, None], axis=1, mode="clip")


def gemv(
    W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, budget=GATHER_BUDGET_BYTES
):
    kw = dict(transpose_w=transpose_w, acc_dtype=acc_dtype)
    hd, fits = _dense_activations(W, h, input_idx, **kw)
    return lax.cond(
        _all_finite(W) & fits,
        lambda W, hd, h, ii, oi, vi: _gemv_dense(W, hd, oi, **kw, budget=budget, dtype=h.dtype),
        lambda W, hd, h, ii, oi, vi: _gather.gemv(W, h, ii, oi, vi, **kw, budget=budget),
        W,
        hd,
        h,
        input_idx,
        output_idx,
        valid_in,
    )


def _outer_dense(o, x, y, x_idx, y_idx, *, acc_dtype, budget):
    batch = x.shape[0]
    nx, ny, sx, sy = o.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    # Masked rows are zero and every factor is finite here: their pairs add exactly 0.
    xd = jnp.zeros((batch, nx, sx), acc_dtype).at[b, x_idx].add(x.astype(acc_dtype))
    yd = jnp.zeros((batch, ny, sy), acc_dtype).at[b, y_idx].add(y.astype(acc_dtype))
    if not is_low_precision(o.dtype, acc_dtype):
        return o + jnp.einsum("bks,blt->klst", xd, yd, preferred_element_type=acc_dtype)
    return _outer_dense_low(o, xd, yd, acc_dtype=acc_dtype, budget=budget)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _outer_dense_low(o, xd, yd, *, acc_dtype, budget):
    """``o + xd^T @ yd`` for a low-precision ``o``, with no product of ``o``'s size in ``acc_dtype``.

    When the float32 product fits ``budget`` (on GPU and TPU a share of the
    device's memory), one GEMM whose output is ``o``'s dtype: the device
    accumulates each element in float32 and rounds once.  Otherwise (XLA:CPU
    computes low-precision products in float32) a loop over row blocks of
    ``o``, each product summed in ``acc_dtype``, added to its rows and rounded once.
    """
    nx, ny, sx, sy = o.shape
    row_bytes = ny * sx * sy * jnp.dtype(acc_dtype).itemsize
    rows = _largest_divisor(nx, budget // row_bytes)
    if rows == nx:
        prod = jnp.einsum(
            "bks,blt->klst", xd.astype(o.dtype), yd.astype(o.dtype), preferred_element_type=o.dtype
        )
        return o + prod
    ol, dtype = loop_operand(o)
    z = jnp.zeros((), jnp.int32)

    def body(c, ol):
        k = c * rows
        part = lax.dynamic_slice_in_dim(xd, k, rows, axis=1)
        prod = jnp.einsum("bks,blt->klst", part, yd, preferred_element_type=acc_dtype)
        cur = lax.dynamic_slice(ol, (k, z, z, z), (rows, ny, sx, sy))
        cur = lax.bitcast_convert_type(cur, dtype).astype(acc_dtype)
        new = lax.bitcast_convert_type((cur + prod).astype(dtype), ol.dtype)
        return lax.dynamic_update_slice(ol, new, (k, z, z, z))

    (ol,) = carry((ol,), xd, yd)
    ol = lax.fori_loop(jnp.int32(0), jnp.int32(nx // rows), body, ol)
    return lax.bitcast_convert_type(ol, dtype)


def outer(o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget=GATHER_BUDGET_BYTES):
    """The weight update; for a low-precision ``o`` see :func:`_outer_dense_low`.

    The exact path (non-finite activations) is ``gather``'s.
    """

    def dense(o, x, y, x_idx, y_idx, valid_x, valid_y):
        return _outer_dense(o, x, y, x_idx, y_idx, acc_dtype=acc_dtype, budget=budget)

    return lax.cond(
        _all_finite(x, y),
        dense,
        lambda *a: _gather.outer(*a, acc_dtype=acc_dtype, budget=budget),
        o,
        x,
        y,
        x_idx,
        y_idx,
        valid_x,
        valid_y,
    )
