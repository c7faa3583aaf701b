"""The execution seam: which strategy computes a validated block-sparse problem.

Everything above this module (validation, index normalisation, masking of
out-of-range entries, the custom VJPs) is shared; everything below it (one
module per strategy: ``_gather``, ``_loop``, ``_dense``, ``_grouped``,
``_ragged``) only sees in-range ``int32`` indices.  Every strategy computes the
same sums (repeated indices accumulate); they differ in how they move memory.

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
        raise ValueError(
            f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES)}; got {strategy!r}"
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
        plans[platform] = (name, budget if name in ("gather", "pallas") else None, kernel)
    return plans


def _by_platform(plans, impl, *args):
    """``impl(plan, *args)`` with each platform's plan (one branch when they agree)."""
    if len(set(plans.values())) == 1:
        return impl(plans["cpu"], *args)
    branches = {p: (lambda *a, q=q: impl(q, *a)) for p, q in plans.items()}
    return lax.platform_dependent(*args, default=branches["cuda"], **branches)


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
    plans = plan(
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

    def impl(p, W, h, input_idx, output_idx):
        name, budget, kernel = p
        kw = {} if name != "gather" else {"budget": budget}
        kw = kw if kernel is None else {"backend": kernel}
        return _IMPLEMENTATIONS[name].gemv(
            W, h, input_idx, output_idx, transpose_w=transpose_w, acc_dtype=acc_dtype, **kw
        )

    return _by_platform(plans, impl, W, h, input_idx, output_idx)


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

    Returns ``o``'s shape and dtype; repeated blocks accumulate in ``acc_dtype``
    (``ragged`` sums each distinct block's updates in ``acc_dtype`` and adds
    them to ``o`` once; the other strategies accumulate into an ``acc_dtype``
    copy of ``o``).
    """
    dt = common_float_dtype(x.dtype, y.dtype)
    x, y, o = jnp.asarray(x, dt), jnp.asarray(y, dt), jnp.asarray(o)
    alpha = jnp.asarray(alpha, acc_dtype)
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
    if batch == 0 or x_win == 0 or y_win == 0:
        return o

    def impl(p, o, x, y, x_idx, y_idx, alpha):
        name, budget, _ = p
        if name == "ragged":
            return _ragged.outer(o, x, y, x_idx, y_idx, alpha, acc_dtype=acc_dtype)
        kw = {} if budget is None else {"budget": budget}
        out = _IMPLEMENTATIONS[name].outer(
            o.astype(acc_dtype), x, y, x_idx, y_idx, alpha, acc_dtype=acc_dtype, **kw
        )
        return out.astype(o.dtype)

    return _by_platform(plans, impl, o, x, y, x_idx, y_idx, alpha)
