"""The execution seam: which strategy computes a validated block-sparse problem.

Everything above this module (validation, index normalisation, the custom
VJPs) is shared; everything below it (one module per strategy: ``_gather``,
``_loop``, ``_dense``, ``_grouped``, ``_ragged``, ``_pallas``) only sees
in-range ``int32`` indices with a ``valid`` mask per slot.  Every strategy
computes the same sums (repeated indices accumulate); they differ in how they
move memory.

Masked slots
------------
A slot whose ``valid`` entry is ``False`` (an out-of-range index under ``jit``,
or in ``parallel`` a block another shard owns) is *absent*: its pairs are
never multiplied, so no value in it, and no value in the block its parked
index ``0`` points at, can reach a result, not even as ``0 * inf``.  This
module zeroes (by selection, ``jnp.where``) the activation rows of masked
slots and the outputs of masked output slots; each strategy skips or
selects away the pairs of masked slots (it never relies on multiplying by
zero).  Selected NaN and inf propagate exactly as in ``gather``'s products.

Each call is planned per backend, from the static shapes:

* CPU: ``auto`` is the cheapest by the CPU cost model
  (:func:`~blocksparse_jax.blocksparse._cost.choose_strategy`); ``gather``
  chunks the batch under a cache-sized budget.
* GPU (``cuda``, ``rocm``) and TPU: ``auto`` is the cheapest by the accelerator
  cost model among ``gather``, ``ragged`` and ``dense``
  (:func:`~blocksparse_jax.blocksparse._cost.choose_accelerator_strategy`),
  never a sequential loop; ``gather`` takes the device budget
  (:func:`~blocksparse_jax.blocksparse._cost.accelerator_budget`), so it runs
  in one shot when the gathered blocks fit and in few large chunks otherwise.

When the plans differ the call is a ``jax.lax.platform_dependent``, so one
jitted or exported function runs each backend's plan (``jit`` on one backend
lowers only that backend's branch).  Any other platform runs the GPU plan.

Shape letters (the one vocabulary of the package): ``b`` batch, ``i`` i_win,
``j`` o_win, ``s`` i_size, ``t`` o_size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax._checks import common_float_dtype
from blocksparse_jax.blocksparse import _cost, _dense, _gather, _grouped, _loop, _pallas, _ragged

STRATEGIES = ("auto", "gather", "loop", "dense", "grouped", "ragged")
"""Valid values of the ``strategy=`` keyword of the public ops."""

EXPERIMENTAL_STRATEGIES = ("pallas",)
"""Also accepted by ``strategy=``, never chosen by ``auto``: not yet measured on hardware."""

_IMPLEMENTATIONS = {
    "gather": _gather,
    "loop": _loop,
    "dense": _dense,
    "grouped": _grouped,
    "ragged": _ragged,
    "pallas": _pallas,
}
_ACCELERATORS = ("cuda", "rocm", "tpu")


def check_strategy(strategy) -> str:
    """Returns ``strategy`` if it names a strategy; raises ``ValueError`` listing the valid ones."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES + EXPERIMENTAL_STRATEGIES:
        names = ", ".join(repr(s) for s in STRATEGIES)
        experimental = ", ".join(repr(s) for s in EXPERIMENTAL_STRATEGIES)
        raise ValueError(
            f"strategy must be one of {names} (or the experimental {experimental}); "
            f"got {strategy!r}"
        )
    return strategy


def plan(strategy: str, **dims) -> dict[str, tuple]:
    """``{platform: (strategy, gather budget, kernel)}`` for ``cpu``, ``cuda``, ``rocm``, ``tpu``.

    ``dims`` are the static shapes of :func:`~blocksparse_jax.blocksparse._cost.estimate_costs`.
    The budget (bytes of one gathered chunk) is ``None`` for strategies that
    gather nothing; the kernel is the Pallas backend of ``"pallas"`` (else ``None``).
    """
    plans = {}
    for platform in ("cpu", *_ACCELERATORS):
        if platform == "cpu":
            name = _cost.choose_strategy(**dims) if strategy == "auto" else strategy
            budget = _gather.GATHER_BUDGET_BYTES
        else:
            name = (
                _cost.choose_accelerator_strategy(platform=platform, **dims)
                if strategy == "auto"
                else strategy
            )
            budget = _cost.accelerator_budget(platform)
        kernel = _pallas.BACKENDS[platform] if name == "pallas" else None
        plans[platform] = (
            name,
            budget if name in ("gather", "pallas", "ragged", "dense") else None,
            kernel,
        )
    return plans


def _by_platform(plans, impl, *args):
    """``impl(plan, *args)`` with each platform's plan (one branch when they agree)."""
    if len(set(plans.values())) == 1:
        return impl(plans["cpu"], *args)
    branches = {p: (lambda *a, q=q: impl(q, *a)) for p, q in plans.items()}
    return lax.platform_dependent(*args, default=branches["cuda"], **branches)


def _rows(valid, x):
    """``x`` with the rows of masked slots set to zero (selection, not multiplication)."""
    return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def gemv_contract(
    W: jax.Array,
    h: jax.Array,
    input_idx: jax.Array,
    output_idx: jax.Array,
    valid_in: jax.Array,
    valid_out: jax.Array,
    *,
    transpose_w: bool,
    acc_dtype: np.dtype,
    strategy: str = "gather",
) -> jax.Array:
    """``sum_i h[b, i] @ blk(b, i, j)`` as ``(batch, o_win, out_size)`` in ``acc_dtype``.

    ``blk(b, i, j)`` is ``W[input_idx[b, i], output_idx[b, j]]`` or, with
    ``transpose_w``, ``W[output_idx[b, j], input_idx[b, i]].T`` - the block of
    ``W.transpose(1, 0, 3, 2)`` without materialising that transpose.  Masked
    slots (``valid_in`` ``(batch, i_win)``, ``valid_out`` ``(batch, o_win)``)
    are absent: a masked output slot is exactly zero.
    """
    # The products run in the common dtype; W keeps its own (each strategy widens
    # the blocks it reads, never the whole of W: no float32 copy of a bfloat16 W).
    h = jnp.asarray(h, common_float_dtype(W.dtype, h.dtype))
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    rows_blocks, cols_blocks, s, t = W.shape
    if transpose_w:
        i_blocks, o_blocks, i_size, o_size = cols_blocks, rows_blocks, t, s
    else:
        i_blocks, o_blocks, i_size, o_size = rows_blocks, cols_blocks, s, t
    plans = plan(
        strategy,
        batch=batch,
        i_blocks=i_blocks,
        o_blocks=o_blocks,
        i_win=i_win,
        o_win=o_win,
        i_size=i_size,
        o_size=o_size,
        itemsize=h.dtype.itemsize,
    )
    if 0 in (batch, i_win, o_win, i_blocks, o_blocks):
        # Nothing to multiply (with no blocks every index is masked).
        return jnp.zeros((batch, o_win, o_size), acc_dtype)
    h = _rows(valid_in, h)

    def impl(p, W, h, input_idx, output_idx, valid_in):
        name, budget, kernel = p
        kw = {} if name not in ("gather", "ragged", "dense") else {"budget": budget}
        kw = kw if kernel is None else {"backend": kernel}
        return _IMPLEMENTATIONS[name].gemv(
            W,
            h,
            input_idx,
            output_idx,
            valid_in,
            transpose_w=transpose_w,
            acc_dtype=acc_dtype,
            **kw,
        )

    out = _by_platform(plans, impl, W, h, input_idx, output_idx, valid_in)
    return _rows(valid_out, out)


def outer_contract(
    o: jax.Array,
    x: jax.Array,
    y: jax.Array,
    x_idx: jax.Array,
    y_idx: jax.Array,
    valid_x: jax.Array,
    valid_y: jax.Array,
    alpha: jax.Array,
    *,
    acc_dtype: np.dtype,
    strategy: str = "gather",
) -> jax.Array:
    """``o`` with ``outer(alpha * x[b, i], y[b, j])`` added to block ``(x_idx[b, i], y_idx[b, j])``.

    Returns ``o``'s shape and dtype; repeated blocks accumulate in ``acc_dtype``.
    For an ``o`` narrower than ``acc_dtype`` (``bfloat16``, ``float16``) no
    ``acc_dtype`` copy of ``o`` is made: each distinct block's updates are
    summed in ``acc_dtype`` and added to it once
    (:mod:`~blocksparse_jax.blocksparse._accumulate`).  A pair with a masked slot (``valid_x`` ``(batch, x_win)``,
    ``valid_y`` ``(batch, y_win)``) adds nothing.  ``alpha`` scales ``x`` (in
    ``acc_dtype``) before the products, so every strategy scales each pair's
    product the same way.
    """
    o = jnp.asarray(o)
    alpha = jnp.asarray(alpha, acc_dtype)
    x = alpha * jnp.asarray(x, acc_dtype)
    dt = common_float_dtype(x.dtype, y.dtype)
    x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    plans = plan(
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
    if 0 in (batch, x_win, y_win, *o.shape[:2]):
        return o
    x, y = _rows(valid_x, x), _rows(valid_y, y)

    def impl(p, o, x, y, x_idx, y_idx, valid_x, valid_y):
        name, budget, _ = p
        args = (x, y, x_idx, y_idx, valid_x, valid_y)
        kw = {} if budget is None else {"budget": budget}
        return _IMPLEMENTATIONS[name].outer(o, *args, acc_dtype=acc_dtype, **kw).astype(o.dtype)

    return _by_platform(plans, impl, o, x, y, x_idx, y_idx, valid_x, valid_y)
