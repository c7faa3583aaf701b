"""The in-place update of a sparse leaf by an element-wise optimizer, a chunk of blocks at a time.

An element-wise optimizer gives each element an update that depends on that
element's gradient, parameter and state only, so the touched blocks can be
updated a few at a time, in place, with no temporary of the size of the leaf:

* *vectorised*: all slots gathered at once (in up to ``_CHUNKS`` chunks, those
  past the touched blocks skipped), when the gathered blocks are small;
* *chunks*: ``k`` blocks per loop iteration (small blocks, many of them);
* *blocks*: one block per loop iteration (large blocks: ``W2`` of the
  hierarchical softmax), a block touched by one pair getting its gradient,
  one outer product, inside the update's fused loops.

Each path writes the new parameter blocks, the new state blocks and the
update itself (``values``, which XLA drops when nothing reads it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from blocksparse_jax._order import after
from blocksparse_jax._sparse_sites import BlockLayout, _explicitly_sharded
from blocksparse_jax.optim._blocks import SlotPairs, SparseBlockGrad, _acc, take_blocks

# The vectorised path when the gathered blocks (gradient, parameter, state and
# their new values) take at most this many bytes and at most 1/16 of the leaf,
# or at most _VECTOR_FLOOR bytes (a small weight: a loop would cost more than it saves).
_VECTOR_BYTES = 32 << 20
_VECTOR_FLOOR = 2 << 20
# ... in up to this many chunks of at least _MIN_CHUNK slots.
_CHUNKS = 4
_MIN_CHUNK = 512
# Past that budget, blocks of at most _CHUNK_BLOCK_BYTES go _MIN_CHUNK_BLOCKS or
# more per loop iteration; larger blocks one at a time.
_CHUNK_BLOCK_BYTES = 16 << 10
_MIN_CHUNK_BLOCKS = 16
# Pairs summed per matrix product into a block touched by several pairs.
_WINDOW = 8


class LeafUpdate(NamedTuple):
    """What the update of one sparse leaf works on.

    Attributes:
      grad: the leaf's gradient.
      param: the parameter, reshaped to the layout's view.
      entries: the optimizer state's entries of the leaf, likewise.
      inner: ``(gradient blocks, parameter blocks, [entry blocks]) -> (update
        blocks, [new entry blocks])``: the optimizer on some blocks.
    """

    grad: SparseBlockGrad
    param: jax.Array
    entries: list
    inner: Callable


class Result(NamedTuple):
    param: jax.Array  # the parameter plus the update (the view, its block axes maybe merged)
    entries: list  # the new state entries (likewise)
    values: jax.Array  # (capacity, *block_shape) the update of each slot


def choose_path(g: SparseBlockGrad, param, n_entries: int) -> tuple[str, int]:
    """``("vectorised", 0)``, ``("chunks", blocks per iteration)`` or ``("blocks", 1)``.

    The gathered blocks (gradient, parameter, state entries and their new
    values) may take at most ``min(_VECTOR_BYTES, leaf bytes / 16)``, or
    ``_VECTOR_FLOOR``.
    """
    block_bytes = math.prod(g.block_shape) * max(4, param.dtype.itemsize)
    per_block = block_bytes * (3 + 2 * n_entries)
    budget = max(min(_VECTOR_BYTES, param.size * param.dtype.itemsize // 16), _VECTOR_FLOOR)
    if g.capacity * per_block <= budget:
        return "vectorised", 0
    k = min(g.capacity, budget // per_block)
    if block_bytes <= _CHUNK_BLOCK_BYTES and k >= _MIN_CHUNK_BLOCKS:
        return "chunks", k
    return "blocks", 1


def update(leaf: LeafUpdate, path: tuple[str, int] | None = None) -> Result:
    """Runs the update of ``leaf`` by ``path`` (default: the one its sizes call for)."""
    path, k = path or choose_path(leaf.grad, leaf.param, len(leaf.entries))
    if path == "vectorised":
        return _vectorised(leaf)
    if path == "chunks":
        return _in_chunks(leaf, k)
    return _by_block(leaf)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _add(p, u):
    return (p.astype(_acc(p.dtype)) + u).astype(p.dtype)


def _pairs(g: SparseBlockGrad) -> SlotPairs | None:
    """The pairs the gradient's values were summed from, if the values are still those."""
    slots = g.slots
    return slots.pairs if slots.pairs is not None and slots.origin is g.values else None


def _write_indices(g: SparseBlockGrad, indices):
    """Where to write slots back: the blocks, each padding slot a distinct dropped index.

    Distinct increasing indices let XLA write the blocks without ordering the writes.
    """
    n = g.n_blocks
    if n + indices.shape[0] >= 2**31:  # no room above n_blocks in int32
        return indices, {}
    spare = n + jnp.arange(indices.shape[0], dtype=jnp.int32)
    return jnp.where(indices < n, indices, spare), dict(
        unique_indices=True, indices_are_sorted=True
    )


def _scatter(view, layout: BlockLayout, idx, blocks, opts):
    return layout.put(view, idx, blocks, **opts)


def _by_slot(pairs: SlotPairs, acc, pad_rows: int):
    """``(slots, left, right)``: the pairs grouped by slot (stable), ``pad_rows`` zero rows appended."""
    order = jnp.argsort(pairs.slot, stable=True)
    pad = lambda a: jnp.concatenate([a[order], jnp.zeros((pad_rows, *a.shape[1:]), a.dtype)])
    left = None if pairs.left is None else pad(pairs.left.astype(acc))
    return pairs.slot[order], left, pad(pairs.right.astype(acc))


def _terms(left, right, block_shape):
    if left is None:
        return right.reshape(right.shape[0], *block_shape)
    t = left[:, :, None] * right[:, None, :]
    return t.reshape(t.shape[0], *block_shape)


# --------------------------------------------------------------------------------------
# Gathered chunks of slots
# --------------------------------------------------------------------------------------


def _chunk_step(leaf: LeafUpdate, idx, to, opts, grad_blocks, carry):
    """Slots ``idx`` (written to ``to``): gather, update, write back; ``carry`` = (param, entries)."""
    g = leaf.grad
    layout = g.layout
    p, es = carry
    pb = take_blocks(p, layout, idx)
    eb = [take_blocks(e, layout, idx) for e in es]
    ub, eb_new = leaf.inner(grad_blocks.astype(g.dtype), pb, eb)
    valid = (idx < g.n_blocks).reshape((-1,) + (1,) * len(g.block_shape))
    ub = jnp.where(valid, ub, jnp.zeros((), ub.dtype))
    p = _scatter(p, layout, to, _add(pb, ub), opts)
    es = [_scatter(e, layout, to, b, opts) for e, b in zip(es, eb_new, strict=True)]
    return (p, es), ub


def _vectorised(leaf: LeafUpdate) -> Result:
    """All slots gathered, in up to ``_CHUNKS`` chunks; a chunk past the touched blocks is skipped.

    Only the chunk's small new blocks pass through ``lax.cond`` (under ``vmap``
    it computes both branches and selects), the writes stay in place.
    """
    g = leaf.grad
    values = g.values
    to, opts = _write_indices(g, g.indices)
    n_touched = g.n_touched()
    k = max(1, min(_CHUNKS, g.capacity // _MIN_CHUNK))
    edges = [g.capacity * j // k for j in range(k + 1)]
    carry = (leaf.param, list(leaf.entries))
    parts = []
    for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        idx = g.indices[lo:hi]

        def new_blocks(carry, lo=lo, hi=hi, idx=idx):
            p, es = carry
            pb = take_blocks(p, g.layout, idx)
            eb = [take_blocks(e, g.layout, idx) for e in es]
            ub, eb_new = leaf.inner(values[lo:hi], pb, eb)
            valid = (idx < g.n_blocks).reshape((-1,) + (1,) * len(g.block_shape))
            ub = jnp.where(valid, ub, jnp.zeros((), ub.dtype))
            return _add(pb, ub), [b.astype(e.dtype) for e, b in zip(es, eb_new, strict=True)], ub

        def skipped(carry, lo=lo, hi=hi):  # written nowhere: every index of the chunk is padding
            p, es = carry
            z = jnp.zeros((hi - lo, *g.block_shape), p.dtype)
            return (
                z,
                [z.astype(e.dtype) for e in es],
                jnp.zeros((hi - lo, *g.block_shape), _acc(p.dtype)),
            )

        if j == 0:
            pb, eb, ub = new_blocks(carry)
        else:
            pb, eb, ub = lax.cond(n_touched > lo, new_blocks, skipped, carry)
        p, es = carry
        p = _scatter(p, g.layout, to[lo:hi], pb, opts)
        es = [_scatter(e, g.layout, to[lo:hi], b, opts) for e, b in zip(es, eb, strict=True)]
        carry = (p, es)
        parts.append(ub.astype(_acc(p.dtype)))
    p, es = carry
    return Result(p, es, jnp.concatenate(parts))


def _in_chunks(leaf: LeafUpdate, k: int) -> Result:
    """``k`` slots per loop iteration: their gradient, the update, a scatter back in place.

    The slots are padded with ``n_blocks`` to whole chunks.  A chunk's gradient
    is its rows of ``values``, or, when the values are still the sum of the
    gradient's pairs, those pairs summed into ``(k, *block_shape)`` by a
    scatter-add (the pairs grouped by slot first, so each chunk's are contiguous).
    """
    g = leaf.grad
    acc = _acc(g.dtype)
    n_chunks = -(-g.capacity // k)
    pad = n_chunks * k - g.capacity
    indices = jnp.concatenate([g.indices, jnp.full((pad,), g.n_blocks, jnp.int32)])
    to, opts = _write_indices(g, indices)
    pairs = _pairs(g)
    if pairs is None:
        values = jnp.concatenate([g.values, jnp.zeros((pad, *g.block_shape), g.dtype)])

        def chunk_grad(c):
            return lax.dynamic_slice_in_dim(values, c * k, k)

    else:
        slot, left, right = _by_slot(pairs, acc, k)
        bounds = jnp.searchsorted(slot, jnp.arange(n_chunks + 1, dtype=jnp.int32) * k)
        bounds = bounds.astype(jnp.int32)
        slot = jnp.concatenate([slot, jnp.zeros((k,), slot.dtype)])

        def chunk_grad(c):
            first, end = bounds[c], bounds[c + 1]

            def body(state):
                q, total = state
                local = lax.dynamic_slice_in_dim(slot, q, k) - c * k
                local = jnp.where(q + jnp.arange(k, dtype=jnp.int32) < end, local, k)  # k: dropped
                lft = None if left is None else lax.dynamic_slice_in_dim(left, q, k)
                terms = _terms(lft, lax.dynamic_slice_in_dim(right, q, k), g.block_shape)
                return q + k, total.at[local].add(terms, mode="drop")

            init = (first, jnp.zeros((k, *g.block_shape), acc))
            return lax.while_loop(lambda s: s[0] < end, body, init)[1]

    def body(c, state):
        carry, u_buf = state
        idx = lax.dynamic_slice_in_dim(indices, c * k, k)
        where = lax.dynamic_slice_in_dim(to, c * k, k)
        carry, ub = _chunk_step(leaf, idx, where, opts, chunk_grad(c), carry)
        return carry, lax.dynamic_update_slice_in_dim(u_buf, ub.astype(acc), c * k, 0)

    u_buf = jnp.zeros((n_chunks * k, *g.block_shape), acc)
    n_used = -(-g.n_touched() // k)
    (p, es), u_buf = lax.fori_loop(0, n_used, body, ((leaf.param, list(leaf.entries)), u_buf))
    return Result(p, es, u_buf[: g.capacity])


# --------------------------------------------------------------------------------------
# One block at a time
# --------------------------------------------------------------------------------------


def _by_block(leaf: LeafUpdate) -> Result:
    """One touched block per loop iteration: its gradient, then the update, in place.

    From the gradient's pairs (when ``values`` is still their sum) in two loops:
    first the blocks one pair touches, whose gradient (that pair's term, an
    outer product) XLA computes inside the update's fused loops, then the
    others, summed a window of pairs at a time into a block first.  Otherwise
    each block's gradient is its row of ``values``.
    """
    g = leaf.grad
    layout = g.layout
    param, entries = leaf.param, list(leaf.entries)
    if not _explicitly_sharded(param):  # one block axis: slices XLA fuses with the updates
        layout = layout.merged()
        param = param.reshape(layout.view)
        entries = [e.reshape(layout.view) for e in entries]
    acc = _acc(g.dtype)
    pairs = _pairs(g)

    def update_block(s, gb, state):
        (p, es), u_buf = state
        # A slice and an update of one block (in range: s < n_touched), which XLA
        # fuses into one in-place loop (a gather and a scatter on a sharded weight,
        # which a mesh partitions without gathering it).
        k = g.indices[s]
        at = layout.block_start(k)
        pb = layout.slice_block(p, k, at)
        eb = [layout.slice_block(e, k, at) for e in es]
        ub, eb_new = leaf.inner(gb.astype(g.dtype)[None], pb, eb)
        p = layout.update_block(p, k, _add(pb, ub), at)
        # The new parameter block reads the old state blocks: the state is written
        # after it (else XLA copies each state array to keep the old blocks readable).
        # The new state blocks are computed again from the state read at the index
        # they are written to, so that XLA updates each in place without a copy.
        k2 = after(k[None], layout.first(p, k[None]))[0]
        at2 = layout.block_start(k2)
        eb2 = [layout.slice_block(e, k2, at2) for e in es]
        _, eb_new = leaf.inner(gb.astype(g.dtype)[None], pb, eb2)
        es = [layout.update_block(e, k2, b, at2) for e, b in zip(es, eb_new, strict=True)]
        u_buf = lax.dynamic_update_slice_in_dim(u_buf, ub.astype(acc), s, 0)
        return (p, es), u_buf

    state = ((param, entries), jnp.zeros((g.capacity, *g.block_shape), acc))
    if pairs is None:
        state = lax.fori_loop(
            0, g.n_touched(), lambda s, st: update_block(s, g.values[s], st), state
        )
    else:
        state = _by_block_from_pairs(g, pairs, acc, update_block, state)
    (p, es), u_buf = state
    return Result(p, es, u_buf)


def _by_block_from_pairs(g: SparseBlockGrad, pairs: SlotPairs, acc, update_block, state):
    slots, left, right = _by_slot(pairs, acc, _WINDOW)
    every = jnp.arange(g.capacity, dtype=jnp.int32)
    starts = jnp.searchsorted(slots, every, side="left").astype(jnp.int32)
    ends = jnp.searchsorted(slots, every, side="right").astype(jnp.int32)
    single = (ends - starts == 1) & g.valid
    by_kind = jnp.argsort(~single, stable=True).astype(jnp.int32)  # the single-pair slots first
    n_single = jnp.sum(single, dtype=jnp.int32)

    def pair_grad(q):
        r = lax.dynamic_index_in_dim(right, q, keepdims=False)
        if left is None:
            return r.reshape(g.block_shape)
        lft = lax.dynamic_index_in_dim(left, q, keepdims=False)
        return (lft[:, None] * r[None, :]).reshape(g.block_shape)

    def block_grad(s, e):
        def body(c):
            q, total = c
            ok = (q + jnp.arange(_WINDOW, dtype=jnp.int32)) < e
            r = jnp.where(ok[:, None], lax.dynamic_slice_in_dim(right, q, _WINDOW), 0)
            if left is None:
                return q + _WINDOW, total + jnp.sum(r, axis=0).reshape(g.block_shape)
            lft = lax.dynamic_slice_in_dim(left, q, _WINDOW)
            prod = jnp.dot(lft.T, r, preferred_element_type=acc)
            return q + _WINDOW, total + prod.reshape(g.block_shape)

        init = (s, jnp.zeros(g.block_shape, acc))
        return lax.while_loop(lambda c: c[0] < e, body, init)[1]

    def one_pair(q, st):
        s = by_kind[q]
        return update_block(s, pair_grad(starts[s]), st)

    def several_pairs(q, st):
        s = by_kind[q]
        return update_block(s, block_grad(starts[s], ends[s]), st)

    state = lax.fori_loop(0, n_single, one_pair, state)
    return lax.fori_loop(n_single, g.n_touched(), several_pairs, state)
