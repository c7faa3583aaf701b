"""The custom-VJP core: ``gemv`` and ``outer`` on validated, in-range ``int32`` indices.

The two operations are closed under differentiation:

* the VJP of ``gemv`` is an ``outer`` (the weight gradient) and a ``gemv`` over
  the transposed weights with the index arrays swapped (the input gradient);
* the VJP of ``outer`` is made of two ``gemv`` calls.

Their backward passes call each other, so ``jax.grad`` of ``jax.grad`` works to
any order.  The forward passes save only their inputs as residuals, never the
gathered ``(batch, i_win, o_win, i_size, o_size)`` weight blocks.  Masking of
out-of-range indices happens in the public ops, outside this module.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blocksparse_jax import _checks
from blocksparse_jax.blocksparse._dispatch import gemv_contract, outer_contract


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gemv(o, W, h, input_idx, output_idx, transpose_w, strategy):
    """``o + sum_i h[b, i] @ blk(b, i, j)``; see ``gemv_contract`` for ``transpose_w``.

    ``strategy`` (a name from ``_dispatch.STRATEGIES``) is static configuration and
    is passed on to every gemv and outer of the backward pass.
    """
    acc = _checks.accumulation_dtype(o.dtype, W.dtype, h.dtype)
    y = gemv_contract(
        W, h, input_idx, output_idx, transpose_w=transpose_w, acc_dtype=acc, strategy=strategy
    )
    return (o.astype(acc) + y).astype(o.dtype)


def _gemv_fwd(o, W, h, input_idx, output_idx, transpose_w, strategy):
    out = _gemv(o, W, h, input_idx, output_idx, transpose_w, strategy)
    return out, (W, h, input_idx, output_idx)


def _gemv_bwd(transpose_w, strategy, res, g):
    W, h, input_idx, output_idx = res
    one = jnp.ones((), _checks.accumulation_dtype(W.dtype, h.dtype, g.dtype))
    if transpose_w:
        # out[b, j] += h[b, i] @ W[oi, ii].T  =>  dW[oi, ii] += outer(g[b, j], h[b, i])
        dW = _outer(jnp.zeros_like(W), g, h, output_idx, input_idx, one, strategy)
        dh = _gemv(jnp.zeros_like(h), W, g, output_idx, input_idx, False, strategy)
    else:
        # out[b, j] += h[b, i] @ W[ii, oi]    =>  dW[ii, oi] += outer(h[b, i], g[b, j])
        dW = _outer(jnp.zeros_like(W), h, g, input_idx, output_idx, one, strategy)
        dh = _gemv(jnp.zeros_like(h), W, g, output_idx, input_idx, True, strategy)
    return g, dW, dh, None, None


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _outer(o, x, y, x_idx, y_idx, alpha, strategy):
    """``o`` with ``alpha * outer(x[b, i], y[b, j])`` added at ``(x_idx[b, i], y_idx[b, j])``."""
    acc = _checks.accumulation_dtype(o.dtype, x.dtype, y.dtype)
    out = outer_contract(o, x, y, x_idx, y_idx, alpha, acc_dtype=acc, strategy=strategy)
    return out.astype(o.dtype)


def _outer_fwd(o, x, y, x_idx, y_idx, alpha, strategy):
    return _outer(o, x, y, x_idx, y_idx, alpha, strategy), (x, y, x_idx, y_idx, alpha)


def _outer_bwd(strategy, res, G):
    x, y, x_idx, y_idx, alpha = res
    alpha = jnp.asarray(alpha)  # a Python-float alpha may arrive as a JAX scalar wrapper
    acc = _checks.accumulation_dtype(x.dtype, y.dtype, G.dtype)
    # d/dy[b, j] = alpha * sum_i x[b, i] @ G[xi, yi];  d/dx[b, i] = alpha * sum_j G[xi, yi] @ y[b, j]
    gy = _gemv(jnp.zeros(y.shape, acc), G, x, x_idx, y_idx, False, strategy)
    gx = _gemv(jnp.zeros(x.shape, acc), G, y, y_idx, x_idx, True, strategy)
    a = alpha.astype(acc)
    dalpha = jnp.sum(gy * y.astype(acc)).astype(alpha.dtype)
    return G, (a * gx).astype(x.dtype), (a * gy).astype(y.dtype), None, None, dalpha


_outer.defvjp(_outer_fwd, _outer_bwd)
