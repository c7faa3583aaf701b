"""Sparse-use markers: how an op tells :func:`~blocksparse_jax.value_and_sparse_grad` which blocks it reads.

An op that reads only some blocks of a weight (``sparse_block_gemv`` reads
the blocks its indices select, an embedding lookup the rows of its ids) marks
that use with two identity primitives:

* ``w = mark_weight(W)`` on the way in: the op reads ``W`` only through ``w``;
* ``out = mark_use(out, w, inputs, rule)`` on the way out: ``out`` is what the
  op computed from ``w`` and ``inputs``, and ``rule`` (a :class:`SparseRule`,
  defined beside the op) says how the gradient of ``W`` follows from the
  cotangent of ``out`` and ``inputs``: a list of *pairs*, each a block of
  ``W`` and that pair's contribution to it (an outer product of two factors).

Both markers are identities for every JAX transformation (``jit``, ``grad``,
``vmap``, ``scan``, ``cond``, ``checkpoint``, export to any platform) and
compile to nothing.  ``value_and_sparse_grad`` finds them in the jaxpr of the
function it differentiates (:mod:`blocksparse_jax.optim._trace`) and builds the
weight's gradient from the rule instead of from a dense cotangent.  Nothing
else reads them: an op calls forward only, into this module.

This module imports nothing from the package, so that every op can import it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad, batching, mlir


class BlockLayout(NamedTuple):
    """How a weight splits into blocks: ``weight.reshape(view)``, blocks indexed by ``n_axes`` axes.

    ``view`` has the weight's size; the axes ``axis .. axis + n_axes - 1`` of
    ``view`` index the blocks (block ``k`` is the ``k``-th in row-major order
    over them), the others make a block.  ``W (i_blocks, o_blocks, i_size,
    o_size)`` of the block-sparse ops: ``view = W.shape``, ``n_axes = 2``
    (``k = i * o_blocks + o``); an embedding table ``(n_rows, dim)``: one
    block per row.  The block axes are indexed as they are (no reshape merges
    them), so a weight sharded along one of them stays sharded.
    """

    shape: tuple[int, ...]  # the weight's shape
    view: tuple[int, ...]
    axis: int = 0
    n_axes: int = 1

    @property
    def n_blocks(self) -> int:
        return math.prod(self.view[self.axis : self.axis + self.n_axes])

    @property
    def block_shape(self) -> tuple[int, ...]:
        return self.view[: self.axis] + self.view[self.axis + self.n_axes :]

    @classmethod
    def leading(cls, shape, block_ndim: int) -> BlockLayout:
        """Blocks indexed by the leading axes, each the trailing ``block_ndim`` axes."""
        shape = tuple(int(d) for d in shape)
        return cls(shape, shape, 0, len(shape) - block_ndim)

    def _where(self, idx):
        """The index of ``view`` that selects blocks ``idx`` (one past the end: none)."""
        if self.n_axes == 1:
            parts = (idx,)
        else:
            dims = self.view[self.axis : self.axis + self.n_axes]
            parts, rest = [], idx
            for d in reversed(dims[1:]):
                parts.append(rest % d)
                rest = rest // d
            parts = (rest, *reversed(parts))  # rest >= dims[0] for an index past the end
        return (slice(None),) * self.axis + tuple(parts)

    def take(self, view, idx) -> jax.Array:
        """``(len(idx), *block_shape)``: blocks ``idx`` of ``view`` (zeros for one out of range).

        From a weight sharded over an ``Explicit`` mesh the blocks come back
        replicated (each device gathers those it holds; XLA sums them).
        """
        kw = {"out_sharding": _replicated(view)} if _explicitly_sharded(view) else {}
        blocks = view.at[self._where(idx)].get(mode="fill", fill_value=0, **kw)
        return jnp.moveaxis(blocks, self.axis, 0)

    def merged(self) -> BlockLayout:
        """The same blocks with the block axes of the view merged into one (``n_axes=1``)."""
        view = self.view[: self.axis] + (self.n_blocks,) + self.view[self.axis + self.n_axes :]
        return BlockLayout(self.shape, view, self.axis, 1)

    def block_start(self, k) -> tuple:
        """The start of the dynamic slice that is block ``k`` (a scalar) of a view.

        Compute it once for a slice and an update of the same block: XLA fuses
        the two into one in-place loop when they start at the same indices,
        which it sees best with one block axis (:meth:`merged`).
        """
        zero = jnp.zeros((), jnp.asarray(k).dtype)
        parts = tuple(p.astype(zero.dtype) for p in self._where(k)[self.axis :])
        rest = len(self.view) - self.axis - self.n_axes
        return (zero,) * self.axis + parts + (zero,) * rest

    def _size(self) -> tuple[int, ...]:
        return self.view[: self.axis] + (1,) * self.n_axes + self.view[self.axis + self.n_axes :]

    def slice_block(self, view, k, start=None) -> jax.Array:
        """``(1, *block_shape)``: block ``k`` (a scalar, in range) of ``view``, by a dynamic slice.

        ``start``: :meth:`block_start` of ``k``, when an update of the block
        follows.  On an explicitly sharded ``view`` this is :meth:`take`.
        """
        if _explicitly_sharded(view):
            return self.take(view, jnp.reshape(k, (1,)))
        start = self.block_start(k) if start is None else start
        return lax.dynamic_slice(view, start, self._size()).reshape((1, *self.block_shape))

    def update_block(self, view, k, block, start=None) -> jax.Array:
        """``view`` with block ``k`` (a scalar, in range) set to ``block (1, *block_shape)``."""
        if _explicitly_sharded(view):
            return self.put(view, jnp.reshape(k, (1,)), block)
        start = self.block_start(k) if start is None else start
        block = block.astype(view.dtype).reshape(self._size())
        return lax.dynamic_update_slice(view, block, start)

    def first(self, view, idx) -> jax.Array:
        """``(len(idx),)``: the first element of each block ``idx`` (zero for one out of range).

        A read of a block that costs one element: what an update reads to
        order later writes after that block's (:func:`~blocksparse_jax._order.after`).
        """
        kw = {"out_sharding": _replicated(view)} if _explicitly_sharded(view) else {}
        parts = self._where(idx)[self.axis :]
        rest = (0,) * (len(self.view) - self.axis - self.n_axes)
        return view.at[(0,) * self.axis + parts + rest].get(mode="fill", fill_value=0, **kw)

    def put(self, view, idx, blocks, *, add: bool = False, **kwargs) -> jax.Array:
        """``view`` with blocks ``idx`` set to (``add``: increased by) ``blocks``; out of range dropped.

        A sharded weight stays sharded: each device writes the blocks it holds.
        """
        if _explicitly_sharded(view):
            kwargs["out_sharding"] = jax.typeof(view).sharding
        blocks = jnp.moveaxis(blocks.astype(view.dtype), 0, self.axis)
        ref = view.at[self._where(idx)]
        return (
            ref.add(blocks, mode="drop", **kwargs)
            if add
            else ref.set(blocks, mode="drop", **kwargs)
        )


def _explicitly_sharded(x) -> bool:
    """Is ``x``'s type sharded over some axis of an ``Explicit`` mesh?"""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
    return any(s is not None for s in spec)


def _replicated(x):
    return jax.sharding.NamedSharding(jax.typeof(x).sharding.mesh, jax.sharding.PartitionSpec())


class BlockPairs(NamedTuple):
    """The terms of a weight's gradient, one per *pair* (an example and a block it read).

    ``grad[blocks[p]] += left[p] (outer) right[p]`` (``right[p]`` alone when
    ``left`` is ``None``), reshaped to the block shape.  A pair whose block is
    outside ``[0, n_blocks)`` contributes nothing (padding, a masked example).

    Attributes:
      blocks: ``(pairs,)`` integer block index of each pair.
      left: ``(pairs, block_shape[0])`` or ``None``.
      right: ``(pairs, prod(block_shape[1:]))`` with ``left``, else
        ``(pairs, prod(block_shape))``.
    """

    blocks: jax.Array
    left: jax.Array | None
    right: jax.Array


@dataclasses.dataclass(frozen=True)
class SparseRule:
    """How an op's use of a weight turns its output's cotangent into the weight's gradient.

    Subclasses are frozen dataclasses (a rule is a static parameter of the
    :func:`mark_use` equation: hashable, compared by value), defined beside
    the op they belong to.
    """

    def layout(self, weight_shape: tuple[int, ...]) -> BlockLayout:
        """The blocks of a weight of this shape."""
        raise NotImplementedError

    def pairs(self, cotangent: jax.Array, *inputs: jax.Array) -> BlockPairs:
        """The gradient's pairs for one call: ``cotangent`` is that of the output."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# mark_weight: W -> W
# --------------------------------------------------------------------------------------

weight_p = jex.Primitive("sparse_weight")
weight_p.def_impl(lambda w, **_: w)
weight_p.def_abstract_eval(lambda w, **_: w)
mlir.register_lowering(weight_p, lambda ctx, w, **_: [w])


def _weight_jvp(primals, tangents, **params):
    return weight_p.bind(*primals, **params), tangents[0]


def _weight_batch(args, dims, *, batched):
    # A weight batched by vmap (one per example) is no longer one weight: the
    # equation records it, and value_and_sparse_grad gives that leaf a dense gradient.
    return weight_p.bind(args[0], batched=True), dims[0]


ad.primitive_jvps[weight_p] = _weight_jvp
batching.primitive_batchers[weight_p] = _weight_batch


def mark_weight(w: jax.Array) -> jax.Array:
    """``w`` itself, marked as a weight that the calling op reads only in part."""
    return weight_p.bind(w, batched=False)


# --------------------------------------------------------------------------------------
# mark_use: (out, w, *inputs) -> out
# --------------------------------------------------------------------------------------

use_p = jex.Primitive("sparse_use")
use_p.def_impl(lambda out, *_, **__: out)
use_p.def_abstract_eval(lambda out, *_, **__: out)
mlir.register_lowering(use_p, lambda ctx, out, *_, **__: [out])


def _use_jvp(primals, tangents, **params):
    t = tangents[0]
    if type(t) is ad.Zero:
        t = ad.instantiate_zeros(t)
    return use_p.bind(*primals, **params), t


def _use_batch(args, dims, *, rule, instance_dims):
    """Under ``vmap``: the mapped axis becomes a leading *instance* axis of every operand.

    An instance is one call of the op; the rule runs once per instance.  A
    weight that is itself mapped is no longer one weight: the marker is dropped.
    """
    out, w, *inputs = args
    if dims[1] is not None:
        return out, dims[0]
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)

    def to_front(a, d):
        if d is None:
            return jnp.broadcast_to(a, (size, *a.shape))
        return jnp.moveaxis(a, d, 0)

    moved = [to_front(a, d) for a, d in zip([out, *inputs], [dims[0], *dims[2:]], strict=True)]
    out = use_p.bind(moved[0], w, *moved[1:], rule=rule, instance_dims=instance_dims + 1)
    return out, 0


ad.primitive_jvps[use_p] = _use_jvp
batching.primitive_batchers[use_p] = _use_batch


def mark_use(out: jax.Array, w: jax.Array, inputs, rule: SparseRule) -> jax.Array:
    """``out`` itself, marked as computed from the marked weight ``w`` and ``inputs``.

    Args:
      out: the op's output (or the intermediate whose cotangent the rule takes).
      w: the result of :func:`mark_weight` that the op read.
      inputs: the arrays ``rule.pairs`` needs besides the cotangent.
      rule: a :class:`SparseRule`.
    """
    return use_p.bind(out, w, *inputs, rule=rule, instance_dims=0)
