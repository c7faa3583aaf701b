"""``SparseBlockGrad`` and ``value_and_sparse_grad``: gradients that hold only the touched blocks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax import _sparse_trace
from blocksparse_jax._order import after


@jax.tree_util.register_pytree_node_class
class SparseBlockGrad:
    r"""The gradient of a weight of which a step touched only some blocks.

    The weight (``shape``) is seen as ``(n_blocks, *block_shape)``: its leading
    axes index the blocks (``W`` of :func:`~blocksparse_jax.sparse_block_gemv`:
    ``i_blocks * o_blocks`` blocks of ``(i_size, o_size)``; ``W2`` of the
    hierarchical softmax: one ``(n_in, n_outputs_per_class)`` block per class;
    an embedding table: one block per row).  The gradient is a sum of
    contributions, one per *pair* (an example and a block it read)::

        grad[k] = sum over the pairs p with pair_blocks[p] == k of  left[p] (outer) right[p]

    (``right[p]`` alone when ``left`` is ``None``: a bias or an embedding row).
    The summed blocks are built on demand (:meth:`blocks`), so an optimizer can
    walk through the touched blocks one at a time without holding all of them.

    Capacity is static: ``indices`` has one slot per pair (at most ``n_blocks``);
    slots past the touched blocks, and pairs that touch nothing (a masked
    example, an out-of-range index), hold the padding index ``n_blocks`` and
    contribute nothing.

    Attributes:
      indices: ``(capacity,)`` int32, the touched blocks in increasing order,
        then ``n_blocks`` padding.
      pair_blocks: ``(pairs,)`` int32, the block of each pair, in the order the
        ops reported the pairs (padding pairs ``n_blocks``).
      pair_slots: ``(pairs,)`` int32, the slot of each pair's block in
        ``indices`` (``capacity`` for a padding pair), or ``None`` (then found
        by a binary search in ``indices`` when needed).
      left: ``(pairs, block_shape[0])`` or ``None``.
      right: ``(pairs, block_shape[-1])``.
      shape: the shape of the weight (static).
      block_ndim: how many trailing axes of ``shape`` make a block (static).
      dtype: the weight's dtype, the dtype of :meth:`blocks` and :meth:`todense`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import SparseBlockGrad
      >>> g = SparseBlockGrad.from_pairs(jnp.array([3, 1, 3]), None,
      ...                                jnp.array([[1., 2.], [3., 4.], [5., 6.]]), shape=(5, 2))
      >>> g.indices, g.blocks()
      (Array([1, 3, 5], dtype=int32), Array([[3., 4.],
             [6., 8.],
             [0., 0.]], dtype=float32))
      >>> g.todense()[3]
      Array([6., 8.], dtype=float32)
    """

    def __init__(
        self, indices, pair_blocks, left, right, pair_slots=None, *, shape, block_ndim, dtype
    ):
        self.indices = indices
        self.pair_blocks = pair_blocks
        self.left = left
        self.right = right
        self.pair_slots = pair_slots
        self.shape = tuple(int(d) for d in shape)
        self.block_ndim = int(block_ndim)
        self.dtype = np.dtype(dtype)

    # -- pytree -------------------------------------------------------------------------
    def tree_flatten(self):
        children = (self.indices, self.pair_blocks, self.left, self.right, self.pair_slots)
        return children, (self.shape, self.block_ndim, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, block_ndim, dtype = aux
        return cls(*children, shape=shape, block_ndim=block_ndim, dtype=dtype)

    def __repr__(self):
        return (
            f"SparseBlockGrad(shape={self.shape}, block_shape={self.block_shape}, "
            f"capacity={self.capacity}, pairs={self.n_pairs}, dtype={self.dtype})"
        )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pairs(
        cls,
        pair_blocks: jax.Array,
        left: jax.Array | None,
        right: jax.Array,
        *,
        shape: Sequence[int],
        dtype=None,
    ) -> SparseBlockGrad:
        """Builds the gradient from unsorted pairs.

        Args:
          pair_blocks: ``(pairs,)`` integer block index of each pair; entries
            outside ``[0, n_blocks)`` are padding (they contribute nothing).
          left: ``(pairs, block_shape[0])`` or ``None`` (then blocks are 1-D).
          right: ``(pairs, block_shape[-1])``.
          shape: the weight's shape; its trailing 2 (with ``left``) or 1 axes
            make a block.
          dtype: the weight's dtype (default ``right``'s).

        Returns:
          A :class:`SparseBlockGrad` of capacity ``min(pairs, n_blocks)``.
        """
        shape = tuple(int(d) for d in shape)
        block_ndim = 1 if left is None else 2
        n_blocks = math.prod(shape[:-block_ndim])
        pb = jnp.asarray(pair_blocks).reshape(-1)
        ok = (pb >= 0) & (pb < n_blocks)
        pb = jnp.where(ok, pb, n_blocks).astype(jnp.int32)
        right = jnp.where(ok[:, None], right, jnp.zeros((), right.dtype))
        if left is not None:
            left = jnp.where(ok[:, None], left, jnp.zeros((), left.dtype))
        n_pairs = pb.shape[0]
        capacity = max(1, min(n_pairs, n_blocks))
        # The distinct blocks, from one sort of the block indices alone (XLA sorts a
        # single integer array much faster than an array with a payload): the first
        # of each run of equal sorted blocks opens the next slot.
        s = lax.sort(pb, is_stable=False)
        first = jnp.concatenate([s[:1] < n_blocks, (s[1:] != s[:-1]) & (s[1:] < n_blocks)])
        slot = lax.associative_scan(jnp.add, first.astype(jnp.int32)) - 1  # fewer ops than cumsum
        to = jnp.where(first, slot, capacity + jnp.arange(n_pairs, dtype=jnp.int32))  # distinct
        indices = jnp.full((capacity,), n_blocks, jnp.int32)
        indices = indices.at[to].set(s, mode="drop", unique_indices=True)
        dtype = right.dtype if dtype is None else dtype
        g = cls(indices, pb, left, right, shape=shape, block_ndim=block_ndim, dtype=dtype)
        g.pair_slots = g._search_slots()
        return g

    # -- geometry -----------------------------------------------------------------------
    @property
    def block_shape(self) -> tuple[int, ...]:
        return self.shape[len(self.shape) - self.block_ndim :]

    @property
    def n_blocks(self) -> int:
        return math.prod(self.shape[: len(self.shape) - self.block_ndim])

    @property
    def capacity(self) -> int:
        return self.indices.shape[-1]

    @property
    def n_pairs(self) -> int:
        return self.pair_blocks.shape[-1]

    @property
    def valid(self) -> jax.Array:
        """``(capacity,)`` bool: which slots of ``indices`` hold a touched block."""
        return self.indices < self.n_blocks

    def n_touched(self) -> jax.Array:
        """The number of distinct blocks touched (an int32 scalar)."""
        return jnp.sum(self.valid, dtype=jnp.int32)

    # -- values -------------------------------------------------------------------------
    def contributions(self) -> jax.Array:
        """``(pairs, *block_shape)`` each pair's term (``left (outer) right``)."""
        if self.left is None:
            return self.right
        return self.left[:, :, None] * self.right[:, None, :]

    def slots(self) -> jax.Array:
        """``(pairs,)`` int32 the slot in ``indices`` of each pair's block (``capacity`` for padding)."""
        return self._search_slots() if self.pair_slots is None else self.pair_slots

    def _search_slots(self) -> jax.Array:
        pos = jnp.searchsorted(self.indices, self.pair_blocks).astype(jnp.int32)
        return jnp.where(self.pair_blocks < self.n_blocks, pos, self.capacity)

    def blocks(self) -> jax.Array:
        """``(capacity, *block_shape)`` the summed gradient of each slot of ``indices`` (zeros at padding)."""
        out = jnp.zeros((self.capacity, *self.block_shape), self._acc())
        return (
            out.at[self.slots()]
            .add(self.contributions().astype(self._acc()), mode="drop")
            .astype(self.dtype)
        )

    def todense(self) -> jax.Array:
        """The dense gradient, shaped and typed like the weight (what ``jax.grad`` returns)."""
        out = jnp.zeros((self.n_blocks, *self.block_shape), self._acc())
        out = out.at[self.pair_blocks].add(self.contributions().astype(self._acc()), mode="drop")
        return out.astype(self.dtype).reshape(self.shape)

    def _acc(self):
        return jnp.promote_types(self.right.dtype, jnp.float32)


def is_sparse(x) -> bool:
    return isinstance(x, SparseBlockGrad)


# --------------------------------------------------------------------------------------
# The recorder the ops report to (see blocksparse_jax._sparse_trace).
# --------------------------------------------------------------------------------------


class _Use:
    """One op's report about one tracked leaf: how to build its pairs from the probe's cotangent."""

    def __init__(self, leaf, probe, arrays, build, shape, dtype):
        self.leaf, self.probe, self.arrays, self.build = leaf, probe, arrays, build
        self.shape, self.dtype = shape, dtype


class Recorder:
    """Collects the sparse uses of the tracked leaves during one trace of the user's function.

    ``probes`` is ``None`` while discovering (each op makes its own zero probe and
    the shapes are noted), or the list of probe arrays of the differentiated run.
    """

    def __init__(self, tracked: Sequence[Any], positions: Sequence[int], probes=None):
        self._ids = {id(a): p for a, p in zip(tracked, positions, strict=True)}
        self._keep = list(tracked)  # keeps the ids alive
        self.probes = probes
        self.probe_specs: list[tuple[tuple[int, ...], np.dtype, frozenset]] = []
        self.uses: list[_Use] = []
        self.busy = False

    def tracks(self, a) -> bool:
        return id(a) in self._ids

    def position(self, a) -> int:
        return self._ids[id(a)]

    def held(self, a):
        """``a`` held constant if tracked (its gradient is built from the probe instead)."""
        return jax.lax.stop_gradient(a) if self.tracks(a) else a

    def probe(self, shape, dtype, leaves) -> tuple[int, jax.Array]:
        """A zero array to add to an op's output; its cotangent is the output's."""
        k = len(self.probe_specs)
        owners = frozenset(self.position(a) for a in leaves if self.tracks(a))
        self.probe_specs.append((tuple(shape), np.dtype(dtype), owners))
        if self.probes is None:
            return k, jnp.zeros(shape, dtype)
        return k, self.probes[k]

    def record(self, leaf, probe: int, arrays: dict, build: Callable) -> None:
        """Notes a use of ``leaf``: ``build(cotangent, arrays) -> (pair_blocks, left, right)``."""
        if self.tracks(leaf):
            self.uses.append(
                _Use(self.position(leaf), probe, arrays, build, leaf.shape, leaf.dtype)
            )

    def handle(self, kind: str, *args, **kwargs):
        from blocksparse_jax.optim import _uses

        self.busy = True
        try:
            return _uses.HANDLERS[kind](self, *args, **kwargs)
        finally:
            self.busy = False


def _is_zero_output(jaxpr, outvar) -> bool:
    """Is ``outvar`` of ``jaxpr`` a literal zero or a broadcast of one (a symbolic-zero gradient)?"""
    if type(outvar).__name__ == "Literal":
        return bool(np.all(np.asarray(outvar.val) == 0))
    for eqn in jaxpr.eqns:
        if outvar in eqn.outvars:
            if eqn.primitive.name in ("broadcast_in_dim", "convert_element_type") and (
                type(eqn.invars[0]).__name__ == "Literal"
            ):
                return bool(np.all(np.asarray(eqn.invars[0].val) == 0))
            return False
    return False


def value_and_sparse_grad(
    fun: Callable, argnums: int | Sequence[int] = 0, *, has_aux: bool = False
) -> Callable:
    r"""Like ``jax.value_and_grad``, with the weights of the block-sparse ops as :class:`SparseBlockGrad`.

    Every array among the differentiated arguments that ``fun`` passes
    directly as the weight of a block-sparse op comes back as a
    :class:`SparseBlockGrad` holding only the blocks the call touched:

    * ``W`` of :func:`~blocksparse_jax.sparse_block_gemv` and
      :func:`~blocksparse_jax.sparse_block_dot`, and ``b`` of the latter;
    * ``params.W2`` and ``params.b2`` of :func:`~blocksparse_jax.h_softmax_loss`;
    * ``table`` of :func:`~blocksparse_jax.embedding_lookup`.

    Every other leaf comes back dense, exactly as from ``jax.value_and_grad``.
    No ``W``-sized gradient is built for a sparse leaf (no zero fill, no
    scatter): the ops hold the weight constant, a zero *probe* is added to their
    output, and the probe's cotangent together with the op's inputs gives the
    per-pair factors of :class:`SparseBlockGrad`.

    A leaf that ``fun`` also uses in any other way (tied weights: an embedding
    table also used as the output layer, ``W`` passed through ``W * 1``, ...)
    gets its full gradient, dense, from every use.  A weight used by several
    sparse ops gets one :class:`SparseBlockGrad` summing all of them.

    ``fun`` is traced twice per call (once to find the sparse uses and the tied
    leaves, once to differentiate), so call the result under ``jax.jit``.  It
    works under ``jax.jit``, ``jax.vmap`` and with donated buffers.  The weight
    must reach the op as the same array object it was passed in as (read from
    the arguments' pytree, not through a copy or a cast).

    Args:
      fun: function to differentiate; returns a real scalar (or
        ``(scalar, aux)`` with ``has_aux=True``).
      argnums: which positional arguments to differentiate (an int or a tuple of ints).
      has_aux: as in ``jax.value_and_grad``.

    Returns:
      A function with ``fun``'s signature returning ``(value, grads)`` (or
      ``((value, aux), grads)``); ``grads`` has the structure of the
      differentiated arguments, with :class:`SparseBlockGrad` at the sparse leaves.

    Raises:
      TypeError: a differentiated leaf that is not a float array, or a ``fun``
        whose value is not a real scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import value_and_sparse_grad, h_softmax_init, h_softmax_loss
      >>> params = h_softmax_init(jax.random.key(0), 8, 100)          # 10 classes of 10
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, 45])
      >>> loss_fn = lambda p: h_softmax_loss(x, p, target, n_outputs=100)
      >>> loss, grads = jax.jit(value_and_sparse_grad(loss_fn))(params)
      >>> grads.W2.indices                     # classes 0, 4 and 9; one padding slot
      Array([ 0,  4,  9, 10], dtype=int32)
      >>> dense = jax.grad(loss_fn)(params)
      >>> bool(jnp.allclose(grads.W2.todense(), dense.W2, atol=1e-6)), bool(jnp.allclose(grads.W1, dense.W1))
      (True, True)
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)
    if not nums or not all(isinstance(n, int) for n in nums):
        raise TypeError(f"argnums must be an int or a tuple of ints; got {argnums!r}")

    def wrapped(*args, **kwargs):
        leaves, treedef = _differentiated_leaves(args, nums)
        call = _Call(fun, args, kwargs, nums, treedef, has_aux)
        sparse, probe_specs, readers = _sparse_leaves(call, leaves)
        if not sparse:
            return jax.value_and_grad(fun, nums[0] if single else nums, has_aux=has_aux)(
                *args, **kwargs
            )
        value, aux, out_leaves = _sparse_value_and_grad(call, leaves, sparse, probe_specs, readers)
        grads = jax.tree.unflatten(treedef, out_leaves)
        grads = grads[0] if single else grads
        return ((value, aux) if has_aux else value), grads

    return wrapped


def _differentiated_leaves(args, nums):
    """The leaves of the differentiated arguments (arrays) and their treedef; checks them."""
    for n in nums:
        if not -len(args) <= n < len(args):
            raise ValueError(
                f"argnums {n} is out of range for a call with {len(args)} positional arguments"
            )
    leaves, treedef = jax.tree.flatten(tuple(args[n] for n in nums))
    leaves = [jnp.asarray(a) if not isinstance(a, jax.Array) else a for a in leaves]
    for i, a in enumerate(leaves):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(
                f"value_and_sparse_grad differentiates float arrays only; leaf {i} of the "
                f"differentiated arguments has dtype {a.dtype}"
            )
    return leaves, treedef


class _Call:
    """The user's function called with the differentiated leaves replaced, under a recorder."""

    def __init__(self, fun, args, kwargs, nums, treedef, has_aux):
        self.fun, self.args, self.kwargs = fun, args, kwargs
        self.nums, self.treedef, self.has_aux = nums, treedef, has_aux
        self.recorder: Recorder | None = None  # the recorder of the latest call

    def __call__(self, leaf_list, rec: Recorder):
        """``fun``'s output with ``leaf_list`` as the differentiated leaves; ``rec`` records."""
        self.recorder = rec
        full = list(self.args)
        for n, v in zip(self.nums, jax.tree.unflatten(self.treedef, leaf_list), strict=True):
            full[n] = v
        with _sparse_trace.active(rec):
            out = self.fun(*full, **self.kwargs)
        value = jnp.asarray(out[0] if self.has_aux else out)
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                "value_and_sparse_grad needs fun to return a real scalar"
                f"{' (as the first element of its output)' if self.has_aux else ''}; got shape "
                f"{value.shape} and dtype {value.dtype}"
            )
        return out

    def value(self, out):
        return out[0] if self.has_aux else out


def _sparse_leaves(call: _Call, leaves) -> tuple[list[int], list, dict[int, list[int]]]:
    """The leaves the ops claim and that ``call`` uses in no other way, the ops' probes, the readers.

    Traces the gradient of ``call`` once with every leaf tracked: a claimed leaf
    whose gradient there is not a symbolic zero is also used densely (tied).
    Returns the sorted positions of the sparse leaves, the recorder's
    ``probe_specs`` (shape, dtype, owning leaves) of that trace, and for each
    sparse leaf the other leaves whose gradient is computed from its value (a
    backward pass through the weight).
    """

    def discover(leaf_list):
        return call.value(call(leaf_list, Recorder(leaf_list, range(len(leaf_list)))))

    jaxpr = jax.make_jaxpr(jax.grad(discover))(leaves)
    claimed = sorted({u.leaf for u in call.recorder.uses})
    sparse = [i for i in claimed if _is_zero_output(jaxpr.jaxpr, jaxpr.jaxpr.outvars[i])]
    readers = {}
    for i in sparse:
        reached = _reaches(jaxpr.jaxpr, i)
        readers[i] = [j for j in range(len(leaves)) if j not in sparse and reached[j]]
    return sparse, call.recorder.probe_specs, readers


def _reaches(jaxpr, source: int) -> list[bool]:
    """For each output of ``jaxpr``: is it computed from input ``source``?"""
    return _flow(jaxpr, [i == source for i in range(len(jaxpr.invars))])


def _flow(jaxpr, tainted: list[bool]) -> list[bool]:
    """Which outputs of ``jaxpr`` are computed from the ``tainted`` inputs.

    A data-flow pass that follows nested calls (``jit``, custom rules) inside;
    every output of any other equation with a tainted input (loops,
    conditionals) is tainted: an over-approximation, never an under-approximation.
    """
    seen = {v for v, t in zip(jaxpr.invars, tainted, strict=True) if t}
    is_var = lambda v: type(v).__name__ != "Literal"
    for eqn in jaxpr.eqns:
        ins = [is_var(v) and v in seen for v in eqn.invars]
        if not any(ins):
            continue
        sub = _sub_jaxpr(eqn)
        outs = _flow(sub, ins) if sub is not None else [True] * len(eqn.outvars)
        seen.update(v for v, t in zip(eqn.outvars, outs, strict=True) if t)
    return [is_var(v) and v in seen for v in jaxpr.outvars]


# Primitives that call a sub-jaxpr once, on their own inputs and outputs in order.
_CALLS = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
     "custom_vjp_call", "custom_vjp_call_jaxpr"}
)  # fmt: skip


def _sub_jaxpr(eqn):
    """The jaxpr a call equation runs once on its own inputs and outputs, else ``None``."""
    if eqn.primitive.name not in _CALLS:
        return None
    for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's jaxpr
        if (
            type(inner).__name__ == "Jaxpr"
            and len(inner.invars) == len(eqn.invars)
            and len(inner.outvars) == len(eqn.outvars)
            and not inner.constvars
        ):
            return inner
    return None


def _sparse_value_and_grad(call: _Call, leaves, sparse: list[int], probe_specs, readers):
    """``(value, aux, gradient leaves)``: dense leaves by ``jax.vjp``, sparse ones from the probes.

    The sparse leaves are held constant; each op adds a zero probe to its output,
    and the probe's cotangent with the op's inputs gives the leaf's pairs.
    """
    specs = [(s, d) for s, d, owners in probe_specs if owners & set(sparse)]
    dense_pos = [i for i in range(len(leaves)) if i not in sparse]

    def run(dense_leaves, probes):
        leaf_list = list(leaves)
        for i, v in zip(dense_pos, dense_leaves, strict=True):
            leaf_list[i] = v
        rec = Recorder([leaves[i] for i in sparse], sparse, probes=probes)
        out = call(leaf_list, rec)
        value, aux = (out[0], out[1]) if call.has_aux else (out, None)
        return value, (aux, [u.arrays for u in rec.uses])

    probes0 = [jnp.zeros(s, d) for s, d in specs]
    value, vjp, (aux, use_arrays) = jax.vjp(
        run, [leaves[i] for i in dense_pos], probes0, has_aux=True
    )
    g_dense, g_probes = vjp(jnp.ones((), value.dtype))
    uses = call.recorder.uses

    out_leaves = [None] * len(leaves)
    for i, g in zip(dense_pos, g_dense, strict=True):
        out_leaves[i] = g
    pairs = {}
    for i in sparse:
        parts = [
            u.build(g_probes[u.probe], arrays)
            for u, arrays in zip(uses, use_arrays, strict=True)
            if u.leaf == i
        ]
        pb = jnp.concatenate([p[0].reshape(-1) for p in parts])
        left = None if parts[0][1] is None else jnp.concatenate([p[1] for p in parts])
        pairs[i] = (pb, left, jnp.concatenate([p[2] for p in parts]))

    # Order each sparse gradient (and so any in-place update built from it) after the
    # backward passes through the weight, so that XLA updates the weight in place
    # instead of copying it: after the dense gradients computed from its value, and
    # after the other sparse leaves' pairs (a sparse layer below, whose cotangent came
    # through this weight). The other dense gradients (a layer the weight does not
    # feed) may run alongside the update.
    dense_of = dict(zip(dense_pos, g_dense, strict=True))
    for i in sparse:
        pb, left, right = pairs[i]
        deps = [dense_of[j] for j in readers[i]] + [pairs[j][2] for j in sparse if j != i]
        deps = [jnp.sum(d.astype(jnp.float32)) for d in deps if d.size]
        out_leaves[i] = SparseBlockGrad.from_pairs(
            after(pb, *deps), left, right, shape=leaves[i].shape, dtype=leaves[i].dtype
        )
    return value, aux, out_leaves
