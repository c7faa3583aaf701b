"""The custom-VJP core: ``gemv`` and ``outer`` on validated, in-range ``int32`` indices.

The two operations are closed under differentiation:

* the VJP of ``gemv`` is an ``outer`` (the weight gradient) and a ``gemv`` over
  the transposed weights with the index arrays swapped (the input gradient);
* the VJP of ``outer`` is made of two ``gemv`` calls.

Their backward passes call each other, so ``jax.grad`` of ``jax.grad`` works to
any order.  The forward passes save only their inputs as residuals, never the
gathered ``(batch, i_win, o_win, i_size, o_size)`` weight blocks.

Every index array comes with a ``valid`` mask of the same shape (``False``: the
slot is absent, see ``_dispatch``).  The masks are not differentiated; a
masked slot gets a zero cotangent by selection, whatever values it holds.

The public ops convert their inputs to JAX arrays, but under ``jax.grad`` a
custom VJP's forward rule receives the primal values the user passed, NumPy
arrays included.  The forward rules convert them again, so that the strategies
and the residuals only ever hold JAX arrays (a NumPy ``W`` indexed by a batched
index under ``jax.vmap`` would fail).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blocksparse_jax import _checks
from blocksparse_jax.blocksparse._dispatch import gemv_contract, outer_contract


def _arrays(*xs) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(x) for x in xs)


def _where(valid, x):
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _gemv(o, W, h, input_idx, output_idx, valid_in, valid_out, transpose_w, strategy):
    """``o + sum_i h[b, i] @ blk(b, i, j)``; see ``gemv_contract`` for ``transpose_w``.

    A masked output slot keeps ``o``; a masked input slot adds nothing.

    ``strategy`` (a name from ``_dispatch.STRATEGIES``) is static configuration and
    is passed on to every gemv and outer of the backward pass.
    """
    acc = _checks.accumulation_dtype(o.dtype, W.dtype, h.dtype)
    y = gemv_contract(
        W,
        h,
        input_idx,
        output_idx,
        valid_in,
        valid_out,
        transpose_w=transpose_w,
        acc_dtype=acc,
        strategy=strategy,
    )
    # A masked output slot's y is exactly zero (selected), so out == o there.
    return (o.astype(acc) + y).astype(o.dtype)


def _gemv_fwd(o, W, h, input_idx, output_idx, valid_in, valid_out, transpose_w, strategy):
    o, W, h = _arrays(o, W, h)
    out = _gemv(o, W, h, input_idx, output_idx, valid_in, valid_out, transpose_w, strategy)
    return out, (W, h, input_idx, output_idx, valid_in, valid_out)


def _gemv_bwd(transpose_w, strategy, res, g):
    W, h, ii, oi, vi, vo = res
    one = jnp.ones((), _checks.accumulation_dtype(W.dtype, h.dtype, g.dtype))
    zW, zh = jnp.zeros_like(W), jnp.zeros_like(h)
    if transpose_w:
        # out[b, j] += h[b, i] @ W[oi, ii].T  =>  dW[oi, ii] += outer(g[b, j], h[b, i])
        dW = _outer(zW, g, h, oi, ii, vo, vi, one, strategy)
        dh = _gemv(zh, W, g, oi, ii, vo, vi, False, strategy)
    else:
        # out[b, j] += h[b, i] @ W[ii, oi]    =>  dW[ii, oi] += outer(h[b, i], g[b, j])
        dW = _outer(zW, h, g, ii, oi, vi, vo, one, strategy)
        dh = _gemv(zh, W, g, oi, ii, vo, vi, True, strategy)
    return g, dW, dh, None, None, None, None


_gemv.defvjp(_gemv_fwd, _gemv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _outer(o, x, y, x_idx, y_idx, valid_x, valid_y, alpha, strategy):
    """``o`` with ``alpha * outer(x[b, i], y[b, j])`` added at ``(x_idx[b, i], y_idx[b, j])``.

    A pair with a masked slot adds nothing.
    """
    acc = _checks.accumulation_dtype(o.dtype, x.dtype, y.dtype)
    out = outer_contract(
        o, x, y, x_idx, y_idx, valid_x, valid_y, alpha, acc_dtype=acc, strategy=strategy
    )
    return out.astype(o.dtype)


def _outer_fwd(o, x, y, x_idx, y_idx, valid_x, valid_y, alpha, strategy):
    o, x, y, alpha = _arrays(o, x, y, alpha)
    out = _outer(o, x, y, x_idx, y_idx, valid_x, valid_y, alpha, strategy)
    return out, (x, y, x_idx, y_idx, valid_x, valid_y, alpha)


def _outer_bwd(strategy, res, G):
    x, y, xi, yi, vx, vy, alpha = res
    acc = _checks.accumulation_dtype(x.dtype, y.dtype, G.dtype)
    # d/dy[b, j] = alpha * sum_i x[b, i] @ G[xi, yi];  d/dx[b, i] = alpha * sum_j G[xi, yi] @ y[b, j]
    # (zero, by selection, in a masked slot: gemv zeroes masked outputs, _where the products).
    gy = _gemv(jnp.zeros(y.shape, acc), G, x, xi, yi, vx, vy, False, strategy)
    gx = _gemv(jnp.zeros(x.shape, acc), G, y, yi, xi, vy, vx, True, strategy)
    a = alpha.astype(acc)
    dalpha = jnp.sum(_where(vy, gy * y.astype(acc))).astype(alpha.dtype)
    dx = _where(vx, a * gx).astype(x.dtype)
    dy = _where(vy, a * gy).astype(y.dtype)
    return G, dx, dy, None, None, None, None, dalpha


_outer.defvjp(_outer_fwd, _outer_bwd)
