"""``rowwise_adagrad``: Adagrad with one accumulator per row (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from blocksparse_jax._sparse_sites import BlockLayout
from blocksparse_jax.optim._blocks import Applied, Slots, SparseBlockGrad, is_sparse


class RowwiseAdagradState(NamedTuple):
    """The state of :func:`rowwise_adagrad`.

    Attributes:
      count: ``()`` int32, the number of updates made (the step of a schedule).
      sum_of_squares: shaped like the parameters, each leaf cut to its rows
        (:func:`row_layout`): per row the sum over the steps of the mean of
        the row's squared gradient.
    """

    count: jax.Array
    sum_of_squares: optax.Params


def row_layout(shape) -> BlockLayout:
    """The rows of a parameter of this shape: what one accumulator of :func:`rowwise_adagrad` covers.

    A row is the trailing axis of a 2-D array (an embedding table
    ``(n_rows, dim)``: ``n_rows`` rows of ``dim``), the trailing two axes of a
    3-D or larger one (``W`` of :func:`~blocksparse_jax.sparse_block_gemv`,
    ``(i_blocks, o_blocks, i_size, o_size)``: one row per block; ``W2`` of the
    hierarchical softmax: one per class), and the whole of a vector or a scalar.
    These are the blocks of every op's sparse gradient, so a
    :class:`~blocksparse_jax.SparseBlockGrad` touches whole rows.
    """
    shape = tuple(int(d) for d in shape)
    block_ndim = min(len(shape), 1 if len(shape) <= 2 else 2)
    return BlockLayout.leading(shape, block_ndim)


def _rows_shape(layout: BlockLayout) -> tuple[int, ...]:
    return layout.view[layout.axis : layout.axis + layout.n_axes]


def _wider(*dtypes):
    """The floating dtype that holds each of ``dtypes`` (whatever the promotion mode)."""
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*dtypes)


def _acc_dtype(dtype):
    return _wider(dtype, jnp.float32)


def _zeros_of_rows(param, value: float):
    """``value`` for each row of ``param``: an array of the rows' shape, sharded like ``param``'s rows.

    Indexing the first element of every row keeps the rows' sharding (a table
    sharded by rows gets accumulators sharded the same way) without building
    anything of the parameter's size.
    """
    param = jnp.asarray(param)
    layout = row_layout(param.shape)
    first = param[(Ellipsis,) + (0,) * len(layout.block_shape)] if layout.block_shape else param
    return jnp.full_like(first, value, dtype=_acc_dtype(param.dtype))


def rowwise_adagrad(
    learning_rate: optax.ScalarOrSchedule,
    *,
    eps: float = 1e-8,
    initial_accumulator_value: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Adagrad with one accumulator per row, updating only the rows a sparse gradient touches.

    FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (TorchRec's default optimizer for
    embedding tables).  For each row ``r`` with gradient ``g_r`` (of ``dim``
    elements; a row's gradient is already the sum over the batch of the
    gradients of its lookups):

    ```
    acc_r   <- acc_r + mean(g_r ** 2)
    update_r = -learning_rate * g_r / (sqrt(acc_r) + eps)
    ```

    The state is one scalar per row (``1 / dim`` of the table, where Adam's
    is twice the table).  A :class:`~blocksparse_jax.SparseBlockGrad` leaf
    (from :func:`~blocksparse_jax.value_and_sparse_grad`) updates only its
    touched rows and their accumulators; untouched rows and accumulators do
    not change, so no work of the table's size is done.  Its update is a
    ``SparseBlockGrad`` of the same rows, which
    :func:`~blocksparse_jax.optim.apply_updates` adds in place when the step
    donates the parameters and the state.  Dense leaves get the same rule,
    per row (:func:`row_layout`: the trailing axis of a matrix, the trailing
    two of a block-sparse weight, the whole of a vector).

    Pass it the sparse gradients directly: it cannot be wrapped in
    :func:`~blocksparse_jax.optim.lazy`, whose state has the parameters' shapes.

    Args:
      learning_rate: a scalar or an optax schedule of the step count.
      eps: added to ``sqrt(acc_r)``.
      initial_accumulator_value: every accumulator's starting value.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``init(params) ->``
      :class:`RowwiseAdagradState`; ``update(grads, state, params=None)``
      (``params`` are not needed) returns the updates, with
      :class:`~blocksparse_jax.SparseBlockGrad` leaves where ``grads`` has them.

    Raises:
      ValueError: at update time, a gradient leaf whose rows are not those of
        the state (the optimizer wrapped in ``lazy``, or a sparse gradient in
        blocks other than the rows of :func:`row_layout`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import embedding_lookup, value_and_sparse_grad
      >>> from blocksparse_jax.optim import apply_updates, rowwise_adagrad
      >>> table = jnp.ones((6, 2))
      >>> loss_fn = lambda t: jnp.sum(embedding_lookup(t, jnp.array([1, 4, 1])))
      >>> tx = rowwise_adagrad(0.1)
      >>> state = tx.init(table)
      >>> state.sum_of_squares.shape                # one accumulator per row
      (6,)
      >>> @jax.jit
      ... def step(table, state):
      ...     loss, grads = value_and_sparse_grad(loss_fn)(table)
      ...     updates, state = tx.update(grads, state)
      ...     return apply_updates(table, updates), state
      >>> table, state = step(table, state)
      >>> table[:, 0]                               # rows 1 and 4 moved
      Array([1. , 0.9, 1. , 1. , 0.9, 1. ], dtype=float32)
      >>> state.sum_of_squares                      # row 1 read twice: gradient 2
      Array([0., 4., 0., 0., 1., 0.], dtype=float32)

    References:
      FBGEMM, ``split_table_batched_embeddings_ops_training`` with
      ``EmbOptimType.EXACT_ROWWISE_ADAGRAD``; Duchi, Hazan and Singer,
      "Adaptive subgradient methods" (2011).
    """

    def init(params):
        return RowwiseAdagradState(
            count=jnp.zeros((), jnp.int32),
            sum_of_squares=jax.tree.map(
                lambda p: _zeros_of_rows(p, initial_accumulator_value), params
            ),
        )

    def update(updates, state, params=None, **extra_args):
        del extra_args
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        g_leaves, treedef = jax.tree.flatten(updates, is_leaf=is_sparse)
        acc_leaves = treedef.flatten_up_to(state.sum_of_squares)
        p_leaves = [None] * len(g_leaves) if params is None else treedef.flatten_up_to(params)
        new_updates, new_acc = [], []
        for i, (g, acc, p) in enumerate(zip(g_leaves, acc_leaves, p_leaves, strict=True)):
            if is_sparse(g) and g.layout.n_axes:
                u, a = _update_rows(g, acc, lr, eps, i, _param_of(g, p))
            elif is_sparse(g):  # a single block: the whole leaf
                u, a = _update_dense(g.todense(), acc, lr, eps, i)
            else:
                u, a = _update_dense(jnp.asarray(g), acc, lr, eps, i)
            new_updates.append(u)
            new_acc.append(a)
        new_state = RowwiseAdagradState(
            count=optax.safe_int32_increment(state.count),
            sum_of_squares=treedef.unflatten(new_acc),
        )
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _param_of(g: SparseBlockGrad, p):
    """``p`` when the update can be applied to it here (an array of the gradient's shape)."""
    if p is None or isinstance(p, SparseBlockGrad) or np.shape(p) != g.shape:
        return None
    p = jnp.asarray(p)
    return p if jnp.issubdtype(p.dtype, jnp.floating) else None


def _mismatch(i: int, what: str, acc_shape, rows) -> ValueError:
    return ValueError(
        f"rowwise_adagrad: gradient leaf {i} ({what}) has rows of shape {tuple(rows)}, but the "
        f"state holds accumulators of shape {tuple(acc_shape)}. The state is one accumulator "
        "per row of each parameter (optim.row_layout); pass rowwise_adagrad the gradients of "
        "value_and_sparse_grad directly (not through optim.lazy) and init it with the "
        "parameters it updates."
    )


def _step(grad_rows, acc_rows, lr, eps, n_block_axes: int):
    """``(update rows, new accumulators)`` of rows ``(rows..., *block)`` with accumulators ``(rows...)``."""
    block_axes = tuple(range(acc_rows.ndim, acc_rows.ndim + n_block_axes))
    mean_sq = jnp.mean(jnp.square(grad_rows), axis=block_axes) if block_axes else grad_rows**2
    new_acc = acc_rows + mean_sq
    scale = jnp.asarray(lr, grad_rows.dtype) / (
        jnp.sqrt(new_acc) + jnp.asarray(eps, grad_rows.dtype)
    )
    update = -grad_rows * scale.reshape(scale.shape + (1,) * n_block_axes)
    return update, new_acc


def _update_dense(g, acc, lr, eps, i):
    layout = row_layout(g.shape)
    if np.shape(acc) != _rows_shape(layout):
        raise _mismatch(i, f"dense, shape {g.shape}", np.shape(acc), _rows_shape(layout))
    dtype = _wider(g.dtype, acc.dtype)
    update, new_acc = _step(g.astype(dtype), acc.astype(dtype), lr, eps, len(layout.block_shape))
    return update.astype(g.dtype), new_acc.astype(acc.dtype)


def _update_rows(g: SparseBlockGrad, acc, lr, eps, i, param=None):
    """The touched rows: their accumulators gathered, increased and written back in place.

    With ``param`` the new parameter is made here too, in place (the update's
    ``Applied`` shortcut, which :func:`~blocksparse_jax.optim.apply_updates`
    returns), and, when the gradient's values are still the sum of its pairs
    (an embedding's looked-up rows), straight from the pairs a chunk of rows at
    a time: neither the gradient's values nor the update are then built (XLA
    drops them when nothing else reads them).
    """
    layout = g.layout
    rows = _rows_shape(layout)
    if layout.axis != 0 or layout.view != layout.shape or np.shape(acc) != rows:
        raise _mismatch(i, f"sparse, blocks of shape {g.block_shape}", np.shape(acc), rows)
    dtype = _wider(g.dtype, acc.dtype)
    rule = _RowRule(layout, BlockLayout(rows, rows, 0, len(rows)), lr, eps, dtype)
    pairs = g.slots.pairs if g.slots.origin is g.values else None
    param_out = None
    if param is not None and pairs is not None and pairs.left is None:
        param_out, acc = _from_pairs(g, pairs, rule, jnp.asarray(param), acc)
    elif param is not None:
        param_out, acc = _from_values(g, rule, jnp.asarray(param), acc)
    else:
        acc = _from_values(g, rule, None, acc)[1]
    # The update itself, from the new accumulators (computed only if something reads it).
    new = rule.acc_layout.take(acc, g.indices).astype(dtype)
    update = _scaled(g.values.astype(dtype), new, rule)
    update = jnp.where(_valid(g), update, jnp.zeros((), dtype))  # padding: 0 (not 0 / 0)
    if param_out is None:
        return g.with_values(update), acc
    applied = Applied(param, update, param_out)
    return SparseBlockGrad(update, Slots(g.indices, g.layout, applied=applied)), acc


class _RowRule(NamedTuple):
    layout: BlockLayout  # the parameter's blocks (its rows)
    acc_layout: BlockLayout  # the accumulators: one scalar block per row
    lr: jax.Array | float
    eps: float
    dtype: jnp.dtype  # of the arithmetic


def _valid(g: SparseBlockGrad):
    return g.valid.reshape((-1,) + (1,) * len(g.block_shape))


def _scaled(grad_rows, new_acc, rule: _RowRule):
    """``-lr * g / (sqrt(acc) + eps)``, rows ``(k, *block)``, accumulators ``(k,)``."""
    scale = jnp.asarray(rule.lr, rule.dtype) / (
        jnp.sqrt(new_acc) + jnp.asarray(rule.eps, rule.dtype)
    )
    return -grad_rows * scale.reshape(scale.shape + (1,) * (grad_rows.ndim - 1))


def _rows_step(grad_rows, idx, to, opts, rule: _RowRule, param, acc):
    """Rows ``idx`` (written to ``to``) with gradient ``grad_rows``: accumulators, then the rows."""
    old = rule.acc_layout.take(acc, idx).astype(rule.dtype)
    new = old + jnp.mean(jnp.square(grad_rows), axis=tuple(range(1, grad_rows.ndim)))
    acc = rule.acc_layout.put(acc, to, new.astype(acc.dtype), **opts)
    if param is not None:
        update = _scaled(grad_rows, new, rule)
        if param.dtype == rule.dtype:  # one scatter-add, no gather of the rows
            param = rule.layout.put(param, to, update, add=True, **opts)
        else:  # the sum in float32 or wider, rounded once to the parameter's dtype
            rows = rule.layout.take(param, idx).astype(rule.dtype)
            param = rule.layout.put(param, to, (rows + update).astype(param.dtype), **opts)
    return param, acc


def _from_values(g: SparseBlockGrad, rule: _RowRule, param, acc):
    """All slots at once from the gradient's values."""
    to, opts = _write_indices(g.indices, g.n_blocks)
    values = jnp.where(_valid(g), g.values.astype(rule.dtype), jnp.zeros((), rule.dtype))
    return _rows_step(values, g.indices, to, opts, rule, param, acc)


def _from_pairs(g: SparseBlockGrad, pairs, rule: _RowRule, param, acc):
    """A chunk of slots per loop iteration, each row's gradient summed from the pairs there.

    A chunk's gradient is a scatter-add of the pairs whose slot falls in the
    chunk (the others are dropped): a ``(chunk, *block)`` buffer, however many
    pairs the step has.  The loop stops after the last touched slot.
    """
    block = g.block_shape
    k = max(1, min(g.capacity, _CHUNK_BYTES // (math.prod(block) * rule.dtype.itemsize)))
    n_chunks = -(-g.capacity // k)
    pad = jnp.full((n_chunks * k - g.capacity,), g.n_blocks, jnp.int32)
    indices = jnp.concatenate([g.indices, pad])
    to, opts = _write_indices(indices, g.n_blocks)
    slot = jnp.where(pairs.slot < g.capacity, pairs.slot, -1)  # -1: a padding pair
    right = pairs.right.reshape(pairs.right.shape[0], *block)

    def chunk(c, carry):
        param, acc = carry
        local = slot - c * k
        local = jnp.where((local >= 0) & (local < k), local, k)  # k: dropped
        grad_rows = (
            jnp.zeros((k, *block), rule.dtype).at[local].add(right.astype(rule.dtype), mode="drop")
        )
        idx = lax.dynamic_slice_in_dim(indices, c * k, k)
        where = lax.dynamic_slice_in_dim(to, c * k, k)
        return _rows_step(grad_rows, idx, where, opts, rule, param, acc)

    n_used = -(-g.n_touched() // k)
    return lax.fori_loop(0, n_used, chunk, (param, acc))


# A chunk of rows from the pairs: its gradient buffer holds at most this many bytes.
_CHUNK_BYTES = 1 << 20


def _write_indices(indices, n_blocks: int):
    """Where to write the slots: the rows, then each padding slot a distinct index past the end.

    Distinct increasing indices let XLA write the rows without ordering the writes.
    """
    n = indices.shape[0]
    if n_blocks + n >= 2**31:  # no room above n_blocks in int32
        return indices, {}
    spare = n_blocks + jnp.arange(n, dtype=jnp.int32)
    return jnp.where(indices < n_blocks, indices, spare), dict(
        unique_indices=True, indices_are_sorted=True
    )
