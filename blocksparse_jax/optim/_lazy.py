"""``lazy(inner)`` and ``apply_updates``: any element-wise optax optimizer, on the touched blocks only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from blocksparse_jax._order import after
from blocksparse_jax.optim._sparse_grad import SparseBlockGrad, is_sparse

# A sparse leaf is updated by vectorised gathers / updates / scatters when the
# gathered blocks (gradient, parameter, state entries and their new values)
# take at most this many bytes and at most 1/16 of the leaf; otherwise one
# block at a time in a loop, in place.
_VECTOR_BYTES = 32 << 20
# Pairs summed per matrix product when a block's gradient is built in the loop.
_WINDOW = 8
# Past the vectorised path's budget, blocks of at most _CHUNK_BLOCK_BYTES are
# updated _MIN_CHUNK_BLOCKS or more at a time (the block-by-block loop would be
# mostly loop overhead); larger blocks (W2 of the hierarchical softmax) one at a
# time, their update dwarfing a loop iteration's cost.
_CHUNK_BLOCK_BYTES = 16 << 10
_MIN_CHUNK_BLOCKS = 16
# The vectorised update runs over the slots in up to this many chunks of at least
# _MIN_CHUNK slots, skipping the chunks that hold only padding.
_CHUNKS = 4
_MIN_CHUNK = 512


@jax.tree_util.register_pytree_node_class
class SparseBlockUpdate:
    """The result of a lazy update of a sparse leaf: the updated leaf and the blocks that changed.

    :func:`apply_updates` returns ``value`` for this leaf.  The update is kept
    as the updated leaf rather than as a difference because the difference of
    every touched block would be as large as the blocks themselves; built in
    place in the (donated) parameter buffer, the update needs no such temporary.

    Attributes:
      indices: ``(capacity,)`` int32 the touched blocks (padding ``n_blocks``),
        as in :class:`~blocksparse_jax.SparseBlockGrad`.
      value: the updated parameter, shaped and typed like it.
    """

    def __init__(self, indices, value):
        self.indices = indices
        self.value = value

    def tree_flatten(self):
        return (self.indices, self.value), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def __repr__(self):
        return f"SparseBlockUpdate(shape={self.value.shape}, capacity={self.indices.shape[-1]})"


def _is_update_leaf(x) -> bool:
    return isinstance(x, (SparseBlockGrad, SparseBlockUpdate))


def apply_updates(params, updates):
    """``optax.apply_updates`` that also applies the :class:`SparseBlockUpdate` leaves of :func:`lazy`.

    Dense leaves: ``params + updates`` in the parameter's dtype, as
    ``optax.apply_updates``.  Sparse leaves: the updated leaf that
    :func:`lazy` built (in place in ``params``' buffer when the step is jitted
    with ``params`` donated).

    Args:
      params: the parameters.
      updates: the updates of a ``lazy(...)`` transformation (or any optax updates).

    Returns:
      The new parameters.

    Raises:
      TypeError: a :class:`~blocksparse_jax.SparseBlockGrad` among ``updates``
        (a gradient passed without an optimizer: wrap it in :func:`lazy`, e.g.
        ``lazy(optax.sgd(lr))``).
    """

    def apply(p, u):
        if isinstance(u, SparseBlockUpdate):
            return u.value
        if isinstance(u, SparseBlockGrad):
            raise TypeError(
                "apply_updates got a SparseBlockGrad among the updates: transform the gradients "
                "with blocksparse_jax.optim.lazy(optimizer) first (e.g. lazy(optax.sgd(lr)))"
            )
        if u is None:
            return p
        return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

    return jax.tree.map(apply, params, updates, is_leaf=lambda x: x is None or _is_update_leaf(x))


# --------------------------------------------------------------------------------------
# Element-wise check
# --------------------------------------------------------------------------------------


def _check_elementwise(inner: optax.GradientTransformation, name: str) -> None:
    """Raises ``ValueError`` unless ``inner``'s update of one element depends on that element only.

    Runs ``inner`` for two steps on a small tree twice: once as is, once with
    the gradients and parameters of every other element changed.  The update
    (and the state) of the first element must come out the same.
    """
    p = {"a": jnp.array([0.5, -1.0, 2.0], jnp.float32), "b": jnp.array([1.5, 0.25], jnp.float32)}
    g = {"a": jnp.array([0.3, -0.7, 1.1], jnp.float32), "b": jnp.array([-2.0, 0.4], jnp.float32)}
    bump = {"a": jnp.array([0.0, 3.0, -5.0], jnp.float32), "b": jnp.array([7.0, -9.0], jnp.float32)}

    def run(pp, gg):
        state = inner.init(pp)
        seen = []
        for step in range(3):
            gs = jax.tree.map(lambda x, b, s=step: x * (1.0 + s) + s * b * b, gg, bump)
            u, state = inner.update(gs, state, pp)
            pp = optax.apply_updates(pp, u)
            seen.append(u["a"][0])
            optax.tree_utils.tree_map_params(
                inner, lambda s, k: seen.append(s[0]) if k == "a" else None, state,
                {"a": "a", "b": "b"},
            )  # fmt: skip
        return np.asarray(jnp.stack([jnp.asarray(v, jnp.float32) for v in seen]))

    try:
        with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic mixes int and float
            first = run(p, g)
            other = run(
                jax.tree.map(lambda a, b: a + 0.5 * b, p, bump),
                jax.tree.map(lambda a, b: a + b, g, bump),
            )
    except Exception as e:  # noqa: BLE001 - reported with the transformation's name
        raise ValueError(
            f"lazy({name}) could not check that the transformation is element-wise: running it "
            f"on a small tree raised {type(e).__name__}: {e}"
        ) from e
    if first.shape != other.shape or not np.allclose(first, other, rtol=1e-6, atol=0.0):
        raise ValueError(
            f"lazy() needs an element-wise transformation (the update of each element depends "
            f"only on that element's gradient, parameter and state, as sgd, momentum, adam, "
            f"adamw, adagrad, rmsprop, lion, clip): {name} is not (e.g. clip_by_global_norm, "
            f"normalisations, trust ratios). Apply it to the dense leaves only, e.g. with "
            f"optax.masked, or use a dense optimizer for this model."
        )


# --------------------------------------------------------------------------------------
# The lazy transformation
# --------------------------------------------------------------------------------------


def _block_view(a, g: SparseBlockGrad):
    return a.reshape(g.n_blocks, *g.block_shape)


def lazy(
    inner: optax.GradientTransformation, *, check: bool = True
) -> optax.GradientTransformation:
    r"""Runs an element-wise optax transformation on the touched blocks of the sparse gradients only.

    Dense gradient leaves get ``inner``'s update unchanged.  For a
    :class:`~blocksparse_jax.SparseBlockGrad` leaf, the parameter's and the
    optimizer state's entries of the touched blocks are gathered, ``inner``
    runs on them alone, and the results are written back; the other blocks and
    their state do not change (*lazy* semantics).  The step count (``count`` of
    adam, schedules) is global: it advances once per ``update`` call for every
    block, touched or not.  This is the semantics of PyTorch's
    ``torch.optim.SparseAdam`` and TensorFlow Addons' ``LazyAdam``: a block's
    moments decay only on the steps that touch it.  (With ``inner=optax.adam``
    the bias correction and ``eps`` follow optax: ``eps`` is added to the
    bias-corrected ``sqrt(nu_hat)``; PyTorch adds it to the uncorrected
    ``sqrt(nu)``, a difference of the order of ``eps``.)  When every block is
    touched on every step the result equals ``inner`` itself.

    Each sparse leaf's update is done in place, one block at a time for large
    blocks, so a step needs no temporary of the size of the weight.  The update
    of a sparse leaf is a :class:`SparseBlockUpdate` holding the updated
    parameter: apply the updates with :func:`apply_updates` (not
    ``optax.apply_updates``), and pass ``params`` to ``update``.

    Args:
      inner: an element-wise ``optax.GradientTransformation`` (sgd with or
        without momentum, adam, adamw, adagrad, rmsprop, lion, ... and chains
        of them); it must keep its per-parameter state in trees shaped like
        the parameters (as optax's optimizers do).
      check: run ``inner`` on a small example first and refuse a transformation
        that is not element-wise (such as ``clip_by_global_norm``).

    Returns:
      An ``optax.GradientTransformation``: ``init(params)`` is ``inner.init``;
      ``update(grads, state, params)`` accepts gradients with
      :class:`~blocksparse_jax.SparseBlockGrad` leaves.

    Raises:
      ValueError: ``inner`` is not element-wise (when ``check``); at update time,
        ``params`` missing while the gradients have sparse leaves.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from blocksparse_jax import embedding_lookup, value_and_sparse_grad
      >>> from blocksparse_jax.optim import lazy, apply_updates
      >>> table = jnp.ones((6, 2))
      >>> loss_fn = lambda t: jnp.sum(embedding_lookup(t, jnp.array([1, 4, 1])) ** 2)
      >>> tx = lazy(optax.adam(0.1))
      >>> state = tx.init(table)
      >>> loss, grads = value_and_sparse_grad(loss_fn)(table)
      >>> updates, state = tx.update(grads, state, table)
      >>> table = apply_updates(table, updates)
      >>> table[:, 0].round(4)                    # rows 1 and 4 moved, the others did not
      Array([1. , 0.9, 1. , 1. , 0.9, 1. ], dtype=float32)
      >>> state[0].mu[:, 0]                       # and so did their moments only
      Array([0. , 0.4, 0. , 0. , 0.2, 0. ], dtype=float32)
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation; got {type(inner).__name__}"
        )
    if check:
        _check_elementwise(inner, getattr(inner, "__name__", None) or _describe(inner))

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates, is_leaf=is_sparse)
        sparse = [i for i, g in enumerate(leaves) if is_sparse(g)]
        if not sparse:
            return inner.update(updates, state, params)
        if params is None:
            raise ValueError(
                "lazy(...).update needs params when the gradients hold SparseBlockGrad leaves "
                "(the touched blocks of the parameters are updated in place): call "
                "tx.update(grads, state, params)"
            )
        p_leaves = treedef.flatten_up_to(params)
        idx_tree = jax.tree.unflatten(treedef, list(range(len(leaves))))
        n = len(leaves)

        def empty(i):
            return jnp.zeros((0,), p_leaves[i].dtype)

        def state_with(replace):
            """``state`` with each param-shaped entry of leaf ``i`` replaced by ``replace(i, s)``."""
            return optax.tree_utils.tree_map_params(inner, replace, state, idx_tree)

        # Dense leaves (and the global count): one call of inner, sparse leaves empty.
        g0 = [empty(i) if i in sparse else leaves[i] for i in range(n)]
        p0 = [empty(i) if i in sparse else p_leaves[i] for i in range(n)]
        s0 = state_with(lambda s, i: empty(i) if i in sparse else s)
        u0, s1 = inner.update(jax.tree.unflatten(treedef, g0), s0, jax.tree.unflatten(treedef, p0))
        u0_leaves = treedef.flatten_up_to(u0)

        # The state entries of each sparse leaf, in tree_map_params' order.
        entries: dict[int, list] = {i: [] for i in sparse}
        state_with(lambda s, i: entries[i].append(s) if i in sparse else None)

        new_entries: dict[int, list] = {}
        out = list(u0_leaves)
        for i in sparse:
            value, new_entries[i] = _update_sparse(
                inner, state, idx_tree, treedef, i, leaves[i], p_leaves[i], entries[i],
                [q.dtype for q in p_leaves],
            )  # fmt: skip
            out[i] = SparseBlockUpdate(leaves[i].indices, value)

        taken = {i: iter(new_entries[i]) for i in sparse}
        s_final = optax.tree_utils.tree_map_params(
            inner, lambda s, i: next(taken[i]) if i in sparse else s, s1, idx_tree
        )
        return jax.tree.unflatten(treedef, out), s_final

    return optax.GradientTransformation(init, update)


def _describe(inner) -> str:
    name = getattr(getattr(inner, "update", None), "__qualname__", "") or type(inner).__name__
    return name.split(".<locals>")[0]


def _run_inner(inner, state, idx_tree, treedef, i, n, g_blk, p_blk, e_blks, p_dtype_of):
    """``inner.update`` on a tree whose leaf ``i`` holds the given blocks and the others are empty.

    Returns ``(update of leaf i, new state entries of leaf i)``; the state's
    non-parameter entries (the count) are those of the step, unchanged.
    """
    g = [g_blk if j == i else jnp.zeros((0,), p_dtype_of(j)) for j in range(n)]
    p = [p_blk if j == i else jnp.zeros((0,), p_dtype_of(j)) for j in range(n)]
    it = iter(e_blks)
    s = optax.tree_utils.tree_map_params(
        inner, lambda s, j: next(it) if j == i else jnp.zeros((0,), s.dtype), state, idx_tree
    )
    u, s_new = inner.update(jax.tree.unflatten(treedef, g), s, jax.tree.unflatten(treedef, p))
    got = []
    optax.tree_utils.tree_map_params(
        inner, lambda s, j: got.append(s) if j == i else None, s_new, idx_tree
    )
    return treedef.flatten_up_to(u)[i], got


def _update_sparse(inner, state, idx_tree, treedef, i, g: SparseBlockGrad, p, entries, dtypes):
    """The updated leaf ``i`` and its state entries, for the touched blocks of ``g``."""

    def dtype_of(j):
        return dtypes[j]

    pv = _block_view(p, g)
    ev = [_block_view(e, g) for e in entries]
    block_bytes = math.prod(g.block_shape) * max(4, p.dtype.itemsize)
    gathered = g.capacity * block_bytes * (3 + 2 * len(entries))  # grads, params, state, results
    if gathered <= min(_VECTOR_BYTES, p.size * p.dtype.itemsize // 16):
        gb = g.blocks()
        to, put = _scatter_indices(g)
        get = dict(mode="clip", indices_are_sorted=True)
        n = len(dtypes)

        def new_blocks(lo, hi, pv, ev):
            """Slots ``lo:hi``: the gathered blocks' new values (parameter, state entries)."""
            idx = g.indices[lo:hi]
            pb = pv.at[idx].get(**get)
            eb = [e.at[idx].get(**get) for e in ev]
            u, eb_new = _run_inner(
                inner, state, idx_tree, treedef, i, n, gb[lo:hi], pb, eb, dtype_of
            )
            return _add(pb, u), [b.astype(e.dtype) for e, b in zip(ev, eb_new, strict=True)]

        def padding(lo, hi, pv, ev):  # written nowhere (every index is dropped)
            return gb[lo:hi].astype(pv.dtype), [gb[lo:hi].astype(e.dtype) for e in ev]

        # The touched blocks fill the first slots: a chunk of slots past them holds only
        # padding, and its gathers and update are skipped.  Only the small new blocks
        # pass through lax.cond (under vmap it computes both branches and selects), the
        # writes stay in place.
        n_touched = g.n_touched()
        for k, (lo, hi) in enumerate(_chunks(g.capacity)):
            if k == 0:
                pb, eb = new_blocks(lo, hi, pv, ev)
            else:
                pb, eb = lax.cond(
                    n_touched > lo,
                    lambda pv, ev, lo=lo, hi=hi: new_blocks(lo, hi, pv, ev),
                    lambda pv, ev, lo=lo, hi=hi: padding(lo, hi, pv, ev),
                    pv,
                    ev,
                )
            pv = pv.at[to[lo:hi]].set(pb, **put)
            ev = [e.at[to[lo:hi]].set(b, **put) for e, b in zip(ev, eb, strict=True)]
        return pv.reshape(p.shape), [e.reshape(x.shape) for e, x in zip(ev, entries, strict=True)]
    k = _chunk_blocks(g, p, len(entries))
    if k > 1:
        return _update_sparse_chunks(
            inner, state, idx_tree, treedef, i, g, pv, ev, entries, p, dtype_of, k
        )
    return _update_sparse_loop(inner, state, idx_tree, treedef, i, g, pv, ev, entries, p, dtype_of)


def _chunks(capacity: int) -> list[tuple[int, int]]:
    """The vectorised update's chunks of slots: up to ``_CHUNKS`` of at least ``_MIN_CHUNK``."""
    k = max(1, min(_CHUNKS, capacity // _MIN_CHUNK))
    edges = [capacity * j // k for j in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _scatter_indices(g: SparseBlockGrad):
    """Where to write the slots back: ``indices``, each padding slot a distinct dropped index.

    Distinct, increasing indices let XLA write the blocks without ordering the
    writes (``unique_indices``, ``indices_are_sorted``).
    """
    if g.n_blocks + g.capacity >= 2**31:  # no room above n_blocks in int32
        return g.indices, dict(mode="drop")
    spare = g.n_blocks + jnp.arange(g.capacity, dtype=jnp.int32)
    to = jnp.where(g.valid, g.indices, spare)
    return to, dict(mode="drop", unique_indices=True, indices_are_sorted=True)


def _add(p, u):
    return (p.astype(jnp.promote_types(p.dtype, jnp.float32)) + u).astype(p.dtype)


def _pairs_by_slot(g: SparseBlockGrad, acc, pad_rows: int):
    """``(slots, left, right)``: the pairs grouped by slot, their factors in ``acc``.

    Stable: each block's pairs keep their order.  ``left`` (``None`` without a
    left factor) and ``right`` get ``pad_rows`` zero rows at the end, so that a
    window of pairs can be sliced at any pair.
    """
    order = jnp.argsort(g.slots(), stable=True)
    pad = lambda a: jnp.concatenate([a[order], jnp.zeros((pad_rows, *a.shape[1:]), a.dtype)])
    left = None if g.left is None else pad(g.left.astype(acc))
    return g.slots()[order], left, pad(g.right.astype(acc))


def _update_sparse_loop(inner, state, idx_tree, treedef, i, g, pv, ev, entries, p, dtype_of):
    """One touched block per iteration: its gradient from its pairs, then the update, in place.

    Two loops: first the blocks that one pair touches, whose gradient (that
    pair's term, an outer product) XLA computes inside the update's fused
    loops, then the others, whose gradient is summed a window of pairs at a
    time into a block first.
    """
    n = len(treedef.flatten_up_to(idx_tree))
    acc = jnp.promote_types(g.right.dtype, jnp.float32)
    slots, left, right = _pairs_by_slot(g, acc, _WINDOW)
    every = jnp.arange(g.capacity, dtype=jnp.int32)
    starts = jnp.searchsorted(slots, every, side="left").astype(jnp.int32)
    ends = jnp.searchsorted(slots, every, side="right").astype(jnp.int32)
    # The touched slots, those of one pair first.
    single = (ends - starts == 1) & g.valid
    by_kind = jnp.argsort(~single, stable=True).astype(jnp.int32)
    n_single = jnp.sum(single, dtype=jnp.int32)
    zeros_idx = (jnp.zeros((), jnp.int32),) * len(g.block_shape)

    def block_grad(s, e):
        def body(c):
            k, total = c
            ok = (k + jnp.arange(_WINDOW, dtype=jnp.int32)) < e
            r = lax.dynamic_slice_in_dim(right, k, _WINDOW)
            r = jnp.where(ok[:, None], r, jnp.zeros((), acc))
            if left is None:
                return k + _WINDOW, total + jnp.sum(r, axis=0)
            lft = lax.dynamic_slice_in_dim(left, k, _WINDOW)
            return k + _WINDOW, total + jnp.dot(lft.T, r, preferred_element_type=acc)

        init = (s, jnp.zeros(g.block_shape, acc))
        return lax.while_loop(lambda c: c[0] < e, body, init)[1]

    def pair_grad(s):
        """The term of pair ``s`` alone, element-wise (fused into the update)."""
        r = lax.dynamic_index_in_dim(right, s, keepdims=False)
        if left is None:
            return r
        lft = lax.dynamic_index_in_dim(left, s, keepdims=False)
        return lft[:, None] * r[None, :]

    def update_block(u, gb, carry):
        pv, ev = carry
        k = g.indices[u].astype(jnp.int32)
        gb = gb.astype(g.dtype)[None]
        start = (k, *zeros_idx)
        size = (1, *g.block_shape)
        pb = lax.dynamic_slice(pv, start, size)
        eb = [lax.dynamic_slice(e, start, size) for e in ev]
        upd, eb_new = _run_inner(inner, state, idx_tree, treedef, i, n, gb, pb, eb, dtype_of)
        pv = lax.dynamic_update_slice(pv, _add(pb, upd), start)
        # The new parameter block reads the old state blocks: the state is written after it
        # (else XLA copies each state array to keep the old blocks readable).
        k2 = after(k, lax.dynamic_slice(pv, start, (1,) * pv.ndim))
        start2 = (k2, *zeros_idx)
        ev = [
            lax.dynamic_update_slice(e, b.astype(e.dtype), start2)
            for e, b in zip(ev, eb_new, strict=True)
        ]
        return pv, ev

    def one_pair(q, carry):
        u = by_kind[q]
        return update_block(u, pair_grad(starts[u]), carry)

    def several_pairs(q, carry):
        u = by_kind[q]
        return update_block(u, block_grad(starts[u], ends[u]), carry)

    carry = lax.fori_loop(0, n_single, one_pair, (pv, ev))
    pv, ev = lax.fori_loop(n_single, g.n_touched(), several_pairs, carry)
    return pv.reshape(p.shape), [e.reshape(x.shape) for e, x in zip(ev, entries, strict=True)]


def _chunk_blocks(g: SparseBlockGrad, p, n_entries: int) -> int:
    """Blocks per iteration of :func:`_update_sparse_chunks`, within the vectorised path's budget.

    A chunk's gathered blocks (gradient, parameter, state entries and their
    new values) take at most ``min(_VECTOR_BYTES, leaf bytes / 16)``.  0 (a
    block larger than ``_CHUNK_BLOCK_BYTES``, or fewer than
    ``_MIN_CHUNK_BLOCKS`` fit) means one block at a time
    (:func:`_update_sparse_loop`).
    """
    block_bytes = math.prod(g.block_shape) * max(4, p.dtype.itemsize)
    if block_bytes > _CHUNK_BLOCK_BYTES:
        return 0
    budget = min(_VECTOR_BYTES, p.size * p.dtype.itemsize // 16)
    k = min(g.capacity, budget // (block_bytes * (3 + 2 * n_entries)))
    return k if k >= _MIN_CHUNK_BLOCKS else 0


def _update_sparse_chunks(inner, state, idx_tree, treedef, i, g, pv, ev, entries, p, dtype_of, k):
    """``k`` touched blocks per loop iteration: their gradients, the update, a scatter back in place.

    Chunk ``c`` holds the slots ``c * k .. c * k + k - 1`` of ``g.indices`` (padded
    with ``n_blocks`` to whole chunks, so no block is in two chunks).  Its pairs,
    grouped by slot first, are contiguous; they are summed
    into the chunk's ``(k, *block_shape)`` gradient ``k`` pairs at a time by a
    scatter-add.  Then, as in the vectorised path, the parameter's and the
    state's blocks are gathered, ``inner`` runs on them, and they are written
    back (padding slots are dropped).
    """
    n = len(treedef.flatten_up_to(idx_tree))
    acc = jnp.promote_types(g.right.dtype, jnp.float32)
    n_chunks = -(-g.capacity // k)
    indices = jnp.concatenate(
        [g.indices, jnp.full((n_chunks * k - g.capacity,), g.n_blocks, jnp.int32)]
    )
    # The pairs grouped by slot (the padding pairs' slot is past every touched block),
    # so that each chunk's pairs are contiguous; and each chunk's first pair.
    slot, left, right = _pairs_by_slot(g, acc, k)
    bounds = jnp.searchsorted(slot, jnp.arange(n_chunks + 1, dtype=jnp.int32) * k).astype(jnp.int32)
    slot = jnp.concatenate([slot, jnp.zeros((k,), slot.dtype)])
    n_used = -(-g.n_touched() // k)

    def chunk_grad(c):
        first, end = bounds[c], bounds[c + 1]

        def body(carry):
            q, total = carry
            r = lax.dynamic_slice_in_dim(right, q, k)
            local = lax.dynamic_slice_in_dim(slot, q, k) - c * k
            local = jnp.where(q + jnp.arange(k, dtype=jnp.int32) < end, local, k)  # k: dropped
            if left is None:
                terms = r
            else:
                lft = lax.dynamic_slice_in_dim(left, q, k)
                terms = lft[:, :, None] * r[:, None, :]
            return q + k, total.at[local].add(terms, mode="drop")

        init = (first, jnp.zeros((k, *g.block_shape), acc))
        return lax.while_loop(lambda carry: carry[0] < end, body, init)[1]

    def body(c, carry):
        pv, ev = carry
        idx = lax.dynamic_slice_in_dim(indices, c * k, k)
        gb = chunk_grad(c).astype(g.dtype)
        pb = pv.at[idx].get(mode="clip")
        eb = [e.at[idx].get(mode="clip") for e in ev]
        u, eb_new = _run_inner(inner, state, idx_tree, treedef, i, n, gb, pb, eb, dtype_of)
        pv = pv.at[idx].set(_add(pb, u), mode="drop")
        ev = [
            e.at[idx].set(b.astype(e.dtype), mode="drop") for e, b in zip(ev, eb_new, strict=True)
        ]
        return pv, ev

    pv, ev = lax.fori_loop(0, n_used, body, (pv, ev))
    return pv.reshape(p.shape), [e.reshape(x.shape) for e, x in zip(ev, entries, strict=True)]
