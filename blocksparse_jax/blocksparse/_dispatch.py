"""The execution seam: which strategy computes a validated block-sparse problem.

Everything above this module (validation, index normalisation, masking of
out-of-range entries, the custom VJPs) is shared; everything below it (one
module per strategy: ``_gather``, ``_loop``, ``_dense``, ``_grouped``) only sees
in-range ``int32`` indices and returns results in the accumulation dtype.
Every strategy computes the same sums (repeated indices accumulate); they
differ in how they move memory.

``auto`` (the default of the public ops) picks one with
:func:`~blocksparse_jax.blocksparse._cost.choose_strategy`, a cost model over
the static shapes, and by backend: the choice is wrapped in
``jax.lax.platform_dependent`` so one jitted or exported function runs the CPU
choice on CPU and ``gather`` on GPU and TPU (where a sequential loop is slow).

Shape letters (the one vocabulary of the package): ``b`` batch, ``i`` i_win,
``j`` o_win, ``s`` i_size, ``t`` o_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax._checks import common_float_dtype
from blocksparse_jax.blocksparse import _cost, _dense, _gather, _grouped, _loop

STRATEGIES = ("auto", "gather", "loop", "dense", "grouped")
"""Valid values of the ``strategy=`` keyword of the public ops."""

_IMPLEMENTATIONS = {"gather": _gather, "loop": _loop, "dense": _dense, "grouped": _grouped}


def check_strategy(strategy) -> str:
    """Returns ``strategy`` if it names a strategy; raises ``ValueError`` listing the valid ones."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES)}; got {strategy!r}"
        )
    return strategy


def _resolve(strategy: str, **dims) -> str:
    """``strategy`` itself, or for ``"auto"`` the CPU choice for these static shapes."""
    return _cost.choose_strategy(**dims) if strategy == "auto" else strategy


def _by_platform(cpu_choice: str, impl, *args):
    """``impl(cpu_choice, *args)`` on CPU and ``impl("gather", *args)`` elsewhere."""
    if cpu_choice == "gather":
        return impl("gather", *args)
    return lax.platform_dependent(
        *args,
        cpu=lambda *a: impl(cpu_choice, *a),
        default=lambda *a: impl("gather", *a),
    )


def gemv_contract(
    W: jax.Array,
    h: jax.Array,
    input_idx: jax.Array,
    output_idx: jax.Array,
    *,
    transpose_w: bool,
    acc_dtype: np.dtype,
    strategy: str = "gather",
) -> jax.Array:
    """``sum_i h[b, i] @ blk(b, i, j)`` as ``(batch, o_win, out_size)`` in ``acc_dtype``.

    ``blk(b, i, j)`` is ``W[input_idx[b, i], output_idx[b, j]]`` or, with
    ``transpose_w``, ``W[output_idx[b, j], input_idx[b, i]].T`` - the block of
    ``W.transpose(1, 0, 3, 2)`` without materialising that transpose.
    """
    dt = common_float_dtype(W.dtype, h.dtype)
    W, h = jnp.asarray(W, dt), jnp.asarray(h, dt)
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    rows_blocks, cols_blocks, s, t = W.shape
    if transpose_w:
        i_blocks, o_blocks, i_size, o_size = cols_blocks, rows_blocks, t, s
    else:
        i_blocks, o_blocks, i_size, o_size = rows_blocks, cols_blocks, s, t
    choice = _resolve(
        strategy,
        batch=batch,
        i_blocks=i_blocks,
        o_blocks=o_blocks,
        i_win=i_win,
        o_win=o_win,
        i_size=i_size,
        o_size=o_size,
        itemsize=np.dtype(dt).itemsize,
    )
    if batch == 0 or i_win == 0 or o_win == 0:
        return jnp.zeros((batch, o_win, o_size), acc_dtype)

    def impl(name, W, h, input_idx, output_idx):
        return _IMPLEMENTATIONS[name].gemv(
            W, h, input_idx, output_idx, transpose_w=transpose_w, acc_dtype=acc_dtype
        )

    if strategy == "auto":
        return _by_platform(choice, impl, W, h, input_idx, output_idx)
    return impl(choice, W, h, input_idx, output_idx)


def outer_contract(
    o: jax.Array,
    x: jax.Array,
    y: jax.Array,
    x_idx: jax.Array,
    y_idx: jax.Array,
    alpha: jax.Array,
    *,
    acc_dtype: np.dtype,
    strategy: str = "gather",
) -> jax.Array:
    """``o`` with ``alpha * outer(x[b, i], y[b, j])`` added to block ``(x_idx[b, i], y_idx[b, j])``.

    Returns ``o``'s shape in ``acc_dtype``; repeated blocks accumulate.
    """
    dt = common_float_dtype(x.dtype, y.dtype)
    x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
    o = jnp.asarray(o, acc_dtype)
    alpha = jnp.asarray(alpha, acc_dtype)
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    choice = _resolve(
        strategy,
        batch=batch,
        i_blocks=o.shape[0],
        o_blocks=o.shape[1],
        i_win=x_win,
        o_win=y_win,
        i_size=x_size,
        o_size=y_size,
        itemsize=np.dtype(acc_dtype).itemsize,
    )
    if batch == 0 or x_win == 0 or y_win == 0:
        return o

    def impl(name, o, x, y, x_idx, y_idx, alpha):
        return _IMPLEMENTATIONS[name].outer(o, x, y, x_idx, y_idx, alpha, acc_dtype=acc_dtype)

    if strategy == "auto":
        return _by_platform(choice, impl, o, x, y, x_idx, y_idx, alpha)
    return impl(choice, o, x, y, x_idx, y_idx, alpha)
