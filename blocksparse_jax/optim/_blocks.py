"""``SparseBlockGrad``: the touched blocks of a weight, their indices out of the way of tree maps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax._sparse_sites import BlockLayout, BlockPairs


class SlotPairs(NamedTuple):
    """A gradient's pairs with the slot of each pair's block (``capacity`` for a padding pair)."""

    slot: jax.Array  # (pairs,) int32
    left: jax.Array | None  # (pairs, block_shape[0])
    right: jax.Array  # (pairs, rest of the block)


class Applied(NamedTuple):
    """An update already added to a parameter: ``param_out`` is ``param_in`` plus ``values``."""

    param_in: jax.Array
    values: jax.Array
    param_out: jax.Array


class Slots:
    """The static part of a :class:`SparseBlockGrad`: which block each row of ``values`` is.

    It travels in the pytree's auxiliary data, where tree maps (optax's
    transformations, norms, ``jax.tree.map``) never see it.  Two ``Slots`` are
    equal when they hold the same index array (the same object) and layout, so
    that ``jax.tree.map(f, grads, updates)`` pairs a gradient with the update
    made from it.

    Besides the indices it may carry two shortcuts, each valid only while the
    arrays it refers to are the very ones a ``SparseBlockGrad`` holds:

    * ``pairs`` and ``origin``: the pairs that ``origin`` (the values) was
      summed from; :func:`~blocksparse_jax.optim.lazy` then forms each block's
      gradient inside its update loop and ``values`` is never built;
    * ``applied``: the parameter with the update already added in place,
      which :func:`~blocksparse_jax.optim.apply_updates` returns when it is
      given that parameter and that update.
    """

    __slots__ = ("applied", "indices", "layout", "origin", "pairs")

    def __init__(self, indices, layout: BlockLayout, *, pairs=None, origin=None, applied=None):
        self.indices = indices
        self.layout = layout
        self.pairs: SlotPairs | None = pairs
        self.origin = origin
        self.applied: Applied | None = applied

    def __eq__(self, other):
        return (
            isinstance(other, Slots)
            and self.indices is other.indices
            and self.layout == other.layout
        )

    def __hash__(self):
        return hash((id(self.indices), self.layout))

    def __repr__(self):
        return f"Slots(capacity={np.shape(self.indices)[-1]}, layout={self.layout})"


@jax.tree_util.register_pytree_node_class
class SparseBlockGrad:
    r"""The touched blocks of a weight: its gradient (or an update) where a step read only some blocks.

    The weight is seen as ``n_blocks`` blocks (``layout``: ``W`` of
    :func:`~blocksparse_jax.sparse_block_gemv` as ``i_blocks * o_blocks``
    blocks of ``(i_size, o_size)``, ``W2`` of the hierarchical softmax one
    ``(n_in, n_outputs_per_class)`` block per class, an embedding table one
    block per row):

    ```
    dense[indices[k]] = values[k]        for the touched slots k,  0 elsewhere
    ```

    ``values`` is the pytree's only leaf: optax transformations, norms
    (``optax.global_norm``), clipping and ``jax.tree.map`` act on the values
    alone and give what they give on the dense gradient.  The indices travel in
    the pytree's auxiliary data.  So a ``SparseBlockGrad`` lives inside the
    function that made it: apply the optimizer in the same ``jit`` (return
    :meth:`todense`, or ``indices`` and ``values`` as arrays, to take it out).

    Capacity is static: ``min(pairs, n_blocks)`` slots, the touched blocks in
    increasing order first, then padding slots (index ``n_blocks``, values 0).

    Attributes:
      values: ``(capacity, *block_shape)`` the gradient of each slot's block.
      indices: ``(capacity,)`` int32 the block of each slot (``n_blocks`` for padding).
      layout: the :class:`~blocksparse_jax._sparse_sites.BlockLayout`:
        ``shape`` (the weight's), ``n_blocks``, ``block_shape``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import SparseBlockGrad
      >>> g = SparseBlockGrad.from_pairs(jnp.array([3, 1, 3]), None,
      ...                                jnp.array([[1., 2.], [3., 4.], [5., 6.]]), shape=(5, 2))
      >>> g.indices, g.values
      (Array([1, 3, 5], dtype=int32), Array([[3., 4.],
             [6., 8.],
             [0., 0.]], dtype=float32))
      >>> g.todense()[3]
      Array([6., 8.], dtype=float32)
    """

    def __init__(self, values, slots: Slots):
        self.values = values
        self.slots = slots

    def tree_flatten(self):
        return (self.values,), self.slots

    @classmethod
    def tree_unflatten(cls, slots, children):
        values = children[0]
        if (
            isinstance(slots.indices, jax.core.Tracer)
            and isinstance(values, jax.Array)
            and not isinstance(values, jax.core.Tracer)
        ):
            raise TypeError(
                "a SparseBlockGrad was returned from the jax.jit (or vmap, scan, ...) that made "
                "it: its block indices are kept out of the pytree's leaves, so that optax sees "
                "the values only, and cannot leave the transformation that computed them. "
                "Apply the optimizer in the same jitted function, or return g.todense() or "
                "(g.indices, g.values)."
            )
        if (
            hasattr(values, "shape")
            and hasattr(values, "dtype")
            and (tuple(values.shape) != (slots.indices.shape[-1], *slots.layout.block_shape))
        ):
            # A tree map that summarises each leaf (a norm, a flag) gives the summary here.
            return values
        return cls(values, slots)

    def __repr__(self):
        return (
            f"SparseBlockGrad(shape={self.shape}, block_shape={self.block_shape}, "
            f"capacity={self.capacity}, dtype={self.dtype})"
        )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pairs(
        cls,
        pair_blocks: jax.Array,
        left: jax.Array | None,
        right: jax.Array,
        *,
        shape: Sequence[int] | None = None,
        layout: BlockLayout | None = None,
        dtype=None,
    ) -> SparseBlockGrad:
        """Sums pairs into the touched blocks.

        Args:
          pair_blocks: ``(pairs,)`` integer block of each pair; entries outside
            ``[0, n_blocks)`` are padding (they contribute nothing).
          left: ``(pairs, block_shape[0])`` or ``None``.
          right: ``(pairs, prod(block_shape[1:]))`` with ``left``, else
            ``(pairs, prod(block_shape))``.
          shape: the weight's shape, its leading axis the blocks (with ``left``
            its leading axes, the trailing two the block); or give ``layout``.
          layout: a :class:`~blocksparse_jax._sparse_sites.BlockLayout`.
          dtype: the values' dtype (default ``right``'s).

        Returns:
          A ``SparseBlockGrad`` of capacity ``min(pairs, n_blocks)`` (at least 1).
        """
        if layout is None:
            if shape is None:
                raise TypeError("from_pairs needs shape or layout")
            layout = BlockLayout.leading(shape, 1 if left is None else 2)
        pairs = BlockPairs(jnp.asarray(pair_blocks).reshape(-1), left, right)
        dtype = jnp.asarray(right).dtype if dtype is None else np.dtype(dtype)
        return build(pairs, layout, dtype)

    # -- geometry -----------------------------------------------------------------------
    @property
    def indices(self) -> jax.Array:
        return self.slots.indices

    @property
    def layout(self) -> BlockLayout:
        return self.slots.layout

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return self.slots.layout.shape

    @property
    def block_shape(self) -> tuple[int, ...]:
        return self.slots.layout.block_shape

    @property
    def n_blocks(self) -> int:
        return self.slots.layout.n_blocks

    @property
    def capacity(self) -> int:
        return self.slots.indices.shape[-1]

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def valid(self) -> jax.Array:
        """``(capacity,)`` bool: which slots hold a touched block."""
        return self.indices < self.n_blocks

    def n_touched(self) -> jax.Array:
        """The number of distinct blocks touched (an int32 scalar)."""
        return jnp.sum(self.valid, dtype=jnp.int32)

    def with_values(self, values) -> SparseBlockGrad:
        """The same blocks with other values (shortcuts dropped)."""
        return SparseBlockGrad(values, Slots(self.indices, self.layout))

    # -- values -------------------------------------------------------------------------
    def todense(self) -> jax.Array:
        """The dense array, shaped like the weight (what ``jax.grad`` returns for a gradient)."""
        dense = jnp.zeros(self.layout.view, self.dtype)
        return scatter_blocks(dense, self.layout, self.indices, self.values, add=True).reshape(
            self.shape
        )

    def add_to(self, param: jax.Array) -> jax.Array:
        """``param`` plus these blocks (in place when ``param`` is donated), in ``param``'s dtype."""
        param = jnp.asarray(param)
        if param.shape != self.shape:
            raise ValueError(
                f"a SparseBlockGrad of shape {self.shape} cannot be added to an array of shape "
                f"{param.shape}"
            )
        applied = self.slots.applied
        if applied is not None and applied.param_in is param and applied.values is self.values:
            return applied.param_out
        view = param.reshape(self.layout.view)
        blocks = take_blocks(view, self.layout, self.indices)
        new = (blocks.astype(_acc(param.dtype)) + self.values).astype(param.dtype)
        return scatter_blocks(view, self.layout, self.indices, new).reshape(self.shape)

    # -- arithmetic, for code that meets a SparseBlockGrad whole ------------------------
    def _scaled(self, factor):
        return self.with_values(self.values * factor)

    def __mul__(self, other):
        if _is_scalar(other):
            return self._scaled(other)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, other):
        if _is_scalar(other):
            return self._scaled(1 / other)
        return NotImplemented

    def __neg__(self):
        return self._scaled(-1)

    def __add__(self, other):
        if isinstance(other, SparseBlockGrad):
            if other.slots != self.slots:
                return self.todense() + other.todense()
            return self.with_values(self.values + other.values)
        if np.shape(other) == self.shape:
            return self.add_to(other)
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other


def _is_scalar(x) -> bool:
    return np.ndim(x) == 0 and not isinstance(x, SparseBlockGrad)


def is_sparse(x) -> bool:
    return isinstance(x, SparseBlockGrad)


def _acc(dtype):
    """The dtype sums of ``dtype`` run in: float32, or ``dtype`` when wider."""
    dtype = jnp.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


# --------------------------------------------------------------------------------------
# Blocks of a weight, by the layout.
# --------------------------------------------------------------------------------------


def take_blocks(view, layout: BlockLayout, idx) -> jax.Array:
    """``(len(idx), *block_shape)``: the blocks ``idx`` of ``view`` (zeros for an index out of range)."""
    return layout.take(view, idx)


def scatter_blocks(view, layout: BlockLayout, idx, blocks, *, add=False, **kwargs) -> jax.Array:
    """``view`` with the blocks ``idx`` set to (``add``: increased by) ``blocks``; out of range dropped."""
    return layout.put(view, idx, blocks, add=add, **kwargs)


# --------------------------------------------------------------------------------------
# From pairs to blocks.
# --------------------------------------------------------------------------------------


def touched_slots(blocks: jax.Array, n_blocks: int) -> tuple[jax.Array, jax.Array]:
    """``(indices, slot of each pair)``: the distinct blocks in increasing order, then padding.

    One sort of the block indices alone (XLA sorts a lone integer array much
    faster than one with a payload); the first of each run of equal sorted
    blocks opens the next slot; each pair then finds its slot by a binary search.
    """
    blocks = blocks.astype(jnp.int32)
    n_pairs = blocks.shape[0]
    capacity = max(1, min(n_pairs, n_blocks))
    s = lax.sort(blocks, is_stable=False)
    first = jnp.concatenate([s[:1] < n_blocks, (s[1:] != s[:-1]) & (s[1:] < n_blocks)])
    slot = lax.associative_scan(jnp.add, first.astype(jnp.int32)) - 1
    to = jnp.where(first, slot, capacity + jnp.arange(n_pairs, dtype=jnp.int32))  # distinct
    indices = jnp.full((capacity,), n_blocks, jnp.int32)
    indices = indices.at[to].set(s, mode="drop", unique_indices=True)
    pos = jnp.searchsorted(indices, blocks).astype(jnp.int32)
    return indices, jnp.where(blocks < n_blocks, pos, capacity)


def pair_terms(pairs: SlotPairs | BlockPairs, block_shape, acc) -> jax.Array:
    """``(pairs, *block_shape)``: each pair's term ``left (outer) right`` in ``acc``."""
    right = pairs.right.astype(acc)
    if pairs.left is None:
        return right.reshape(right.shape[0], *block_shape)
    terms = pairs.left.astype(acc)[:, :, None] * right[:, None, :]
    return terms.reshape(terms.shape[0], *block_shape)


# Pairs summed per scatter-add when their terms are large (XLA builds a scatter's
# terms whole): the terms of a chunk take at most this many elements.
_TERMS_PER_CHUNK = 1 << 20


def sum_pairs(pairs: SlotPairs, capacity: int, block_shape, dtype) -> jax.Array:
    """``(capacity, *block_shape)``: the pairs summed into their slots (in float32 or wider)."""
    acc = _acc(dtype)
    out = jnp.zeros((capacity, *block_shape), acc)
    n_pairs = pairs.slot.shape[0]
    k = max(1, _TERMS_PER_CHUNK // max(1, math.prod(block_shape)))
    if pairs.left is None or n_pairs <= k:
        out = out.at[pairs.slot].add(pair_terms(pairs, block_shape, acc), mode="drop")
        return out.astype(dtype)
    # In chunks of k pairs, so that only a chunk's outer products exist at a time.
    n_chunks = -(-n_pairs // k)
    pad = n_chunks * k - n_pairs
    padded = SlotPairs(
        jnp.concatenate([pairs.slot, jnp.full((pad,), capacity, pairs.slot.dtype)]),
        jnp.concatenate([pairs.left, jnp.zeros((pad, pairs.left.shape[1]), pairs.left.dtype)]),
        jnp.concatenate([pairs.right, jnp.zeros((pad, pairs.right.shape[1]), pairs.right.dtype)]),
    )

    def body(c, out):
        chunk = SlotPairs(*(lax.dynamic_slice_in_dim(a, c * k, k) for a in padded))
        return out.at[chunk.slot].add(pair_terms(chunk, block_shape, acc), mode="drop")

    return lax.fori_loop(0, n_chunks, body, out).astype(dtype)


def _replicated(x):
    """``x`` replicated if its type is sharded over the axes of an ``Explicit`` mesh.

    The pairs of a batch split over a data axis: a gradient's few touched
    blocks are small, every device holds them all.
    """
    if x is None:
        return x
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", ())
    if any(s is not None for s in spec):
        return jax.sharding.reshard(
            x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        )
    return x


def build(pairs: BlockPairs, layout: BlockLayout, dtype) -> SparseBlockGrad:
    """The :class:`SparseBlockGrad` of ``pairs``, which keeps them as its shortcut."""
    pairs = BlockPairs(*(_replicated(a) for a in pairs))
    n_blocks = layout.n_blocks
    blocks = pairs.blocks.reshape(-1)
    ok = (blocks >= 0) & (blocks < n_blocks)
    blocks = jnp.where(ok, blocks, n_blocks).astype(jnp.int32)
    indices, slot = touched_slots(blocks, n_blocks)
    slot_pairs = SlotPairs(slot, pairs.left, pairs.right)
    values = sum_pairs(slot_pairs, indices.shape[0], layout.block_shape, dtype)
    return SparseBlockGrad(values, Slots(indices, layout, pairs=slot_pairs, origin=values))
