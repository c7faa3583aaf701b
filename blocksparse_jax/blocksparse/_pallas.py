"""The experimental ``pallas`` strategy: a Pallas kernel that gathers the blocks as it multiplies.

``out[b, j] = sum_i h[b, i] @ W[input_idx[b, i], output_idx[b, j]]`` with no
gathered copy of the blocks: each grid step reads its block of ``W`` straight
from device memory and accumulates in the accumulation dtype.

* TPU (Mosaic): grid ``(batch, o_win, i_win)``; the index arrays are scalar
  prefetch operands and the ``W`` block spec's index map reads them, so the
  pipeline copies exactly the selected ``(i_size, o_size)`` block per step; the
  output block stays resident over ``i`` (the innermost, ``"arbitrary"`` axis).
* GPU (Triton): grid ``(batch, o_win)``; each program loads its ``i_win``
  blocks with dynamic indices and reduces ``h[b, i, :, None] * block`` over
  ``i_size`` (Triton needs power-of-two ``i_size`` and ``o_size``).
* CPU: the TPU kernel in interpret mode (for value tests; slow).

The weight gradient (an ``outer``) is the ``gather`` strategy's.  Never chosen
by ``auto``: it has not been measured on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from blocksparse_jax.blocksparse import _gather

BACKENDS = {"cpu": "interpret", "tpu": "mosaic", "cuda": "triton", "rocm": "triton"}
"""The kernel each platform runs."""


def _product(hv, blk, *, transpose_w, acc_dtype):
    """``hv @ blk`` (``hv @ blk.T`` with ``transpose_w``) for ``hv`` of shape ``(1, size)``."""
    dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
    return lax.dot_general(hv, blk.astype(hv.dtype), dims, preferred_element_type=acc_dtype)


def _grid_kernel(ii_ref, oi_ref, vi_ref, h_ref, w_ref, o_ref, *, transpose_w, acc_dtype):
    b, i = pl.program_id(0), pl.program_id(2)

    @pl.when(i == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    @pl.when(vi_ref[b, i] != 0)  # a masked input slot is skipped, never multiplied by zero
    def _():
        o_ref[0] += _product(h_ref[0], w_ref[0, 0], transpose_w=transpose_w, acc_dtype=acc_dtype)


def _gemv_grid(W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu

    batch, i_win, in_size = h.shape
    o_win = output_idx.shape[1]
    s, t = W.shape[2:]
    out_size = s if transpose_w else t
    hf = h.reshape(batch * i_win, 1, in_size)

    def w_index(b, j, i, ii, oi, vi):
        return (oi[b, j], ii[b, i], 0, 0) if transpose_w else (ii[b, i], oi[b, j], 0, 0)

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, o_win, i_win),
        in_specs=[
            pl.BlockSpec((1, 1, in_size), lambda b, j, i, ii, oi, vi: (b * i_win + i, 0, 0)),
            pl.BlockSpec((1, 1, s, t), w_index),
        ],
        out_specs=pl.BlockSpec((1, 1, out_size), lambda b, j, i, ii, oi, vi: (b * o_win + j, 0, 0)),
    )
    kernel = functools.partial(_grid_kernel, transpose_w=transpose_w, acc_dtype=acc_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch * o_win, 1, out_size), acc_dtype),
        grid_spec=spec,
        interpret=interpret,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
    )(input_idx, output_idx, valid_in.astype(jnp.int32), hf, W)
    return out.reshape(batch, o_win, out_size)


def _triton_kernel(ii_ref, oi_ref, vi_ref, h_ref, w_ref, o_ref, *, i_win, transpose_w, acc_dtype):
    b, j = pl.program_id(0), pl.program_id(1)
    out_size = o_ref.shape[-1]
    acc = jnp.zeros((out_size,), acc_dtype)
    for i in range(i_win):
        if transpose_w:
            blk = w_ref[oi_ref[b, j], ii_ref[b, i]].astype(acc_dtype)  # (out_size, in_size)
            part = jnp.sum(blk * h_ref[b, i].astype(acc_dtype)[None, :], axis=1)
        else:
            blk = w_ref[ii_ref[b, i], oi_ref[b, j]].astype(acc_dtype)  # (in_size, out_size)
            part = jnp.sum(h_ref[b, i].astype(acc_dtype)[:, None] * blk, axis=0)
        # A masked input slot is selected away, never multiplied by zero.
        acc += jnp.where(vi_ref[b, i] != 0, part, jnp.zeros((), acc_dtype))
    o_ref[0, 0] = acc


def _gemv_triton(W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype):
    from jax.experimental.pallas import triton as pltriton

    s, t = W.shape[2:]
    if any(n & (n - 1) for n in (s, t)):
        raise ValueError(
            "strategy='pallas' on GPU needs power-of-two block sizes (Triton); "
            f"got W of shape {W.shape}"
        )
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    out_size = s if transpose_w else t
    kernel = functools.partial(
        _triton_kernel, i_win=i_win, transpose_w=transpose_w, acc_dtype=acc_dtype
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, o_win, out_size), acc_dtype),
        grid=(batch, o_win),
        out_specs=pl.BlockSpec((1, 1, out_size), lambda b, j: (b, j, 0)),
        compiler_params=pltriton.CompilerParams(num_warps=4),
    )(input_idx, output_idx, valid_in.astype(jnp.int32), h, W)


def gemv(W, h, input_idx, output_idx, valid_in, *, transpose_w, acc_dtype, backend="interpret"):
    if backend == "triton":
        return _gemv_triton(
            W, h, input_idx, output_idx, valid_in, transpose_w=transpose_w, acc_dtype=acc_dtype
        )
    return _gemv_grid(
        W,
        h,
        input_idx,
        output_idx,
        valid_in,
        transpose_w=transpose_w,
        acc_dtype=acc_dtype,
        interpret=backend == "interpret",
    )


def outer(
    o, x, y, x_idx, y_idx, valid_x, valid_y, *, acc_dtype, budget=_gather.GATHER_BUDGET_BYTES
):
    return _gather.outer(
        o, x, y, x_idx, y_idx, valid_x, valid_y, acc_dtype=acc_dtype, budget=budget
    )
