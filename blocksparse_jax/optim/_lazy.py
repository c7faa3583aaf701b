"""``lazy(inner)`` and ``apply_updates``: any optax optimizer, on the touched blocks only."""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blocksparse_jax.optim import _inplace
from blocksparse_jax.optim._blocks import Applied, Slots, SparseBlockGrad, is_sparse, take_blocks
from blocksparse_jax.optim._state import StateMap

# --------------------------------------------------------------------------------------
# What kind of transformation
# --------------------------------------------------------------------------------------


def _refuse_multi_steps(state, name: str) -> None:
    found = []
    jax.tree.map(
        lambda n: found.append(n) if isinstance(n, optax.MultiStepsState) else None,
        state,
        is_leaf=lambda n: isinstance(n, optax.MultiStepsState),
    )
    if found:
        raise ValueError(
            f"lazy({name}): optax.MultiSteps cannot run lazily: the gradients it accumulates "
            "over steps must reach every block they touched, not only the blocks of the step "
            "that applies them. Accumulate inside the step instead (the loss of the "
            "micro-batches summed in a lax.scan: value_and_sparse_grad is sparse through "
            "scan), or use MultiSteps with a dense optimizer."
        )


def _tiny(leaves, p_leaves, sparse):
    """A small stand-in for a call: the same tree, sparse leaves of 4 blocks, others small.

    Returns ``(params, grads(step))`` for 2 steps; the gradients differ wildly
    between elements on the second step (one huge, one NaN), so that a
    transformation looking across elements shows it.
    """
    tiny_p, tiny_g = [], []
    for i, p in enumerate(p_leaves):
        if i in sparse:
            shape = (4,) + (1,) * len(leaves[i].block_shape)
        else:
            shape = tuple(min(d, 2) for d in np.shape(p))
        n = math.prod(shape)
        base = jnp.linspace(-1.0, 1.5, max(n, 1))[:n].reshape(shape)
        tiny_p.append(base.astype(jnp.asarray(p).dtype))
        tiny_g.append((0.3 - base).astype(leaves[i].dtype if i in sparse else jnp.asarray(p).dtype))

    def grads(step):
        out = []
        for i, g in enumerate(tiny_g):
            if step == 1 and i in sparse[:1]:  # a chunk of the first sparse leaf goes wild
                g = g.at[1:2].multiply(jnp.asarray(1e5, g.dtype)).at[2:3].set(jnp.nan)
            elif step == 1:
                g = (g * jnp.asarray(1e5 if i % 2 else jnp.nan, g.dtype)).astype(g.dtype)
            out.append(g)
        return out

    return tiny_p, grads


def _is_elementwise(inner, treedef, leaves, p_leaves, sparse, extra_args) -> bool:
    """Is ``inner`` the same run a chunk of blocks at a time as on all of them?

    What :func:`_update_elementwise` does, on a small stand-in of the call
    (:func:`_tiny`): one call for the dense leaves with the sparse ones empty,
    one per chunk of one sparse leaf with the others empty, against one call on
    the whole tree, for two steps.  An element-wise transformation gives the
    same updates and state; one that scales by a global norm, skips non-finite
    steps, draws random numbers per leaf or looks at whole leaves does not, and
    runs on all touched blocks at once instead.
    """
    n = len(p_leaves)

    def empty_like(a):
        return jnp.zeros((0, *np.shape(a)[1:]), a.dtype)

    def call(g, state, params):
        # Extra arguments (a loss value) as ones of their shapes: concrete, the same each run.
        extra = jax.tree.map(
            lambda a: (
                jnp.ones(np.shape(a), jnp.asarray(a).dtype)
                if isinstance(a, (jax.Array, np.ndarray, np.generic, int, float))
                else a
            ),
            extra_args,
        )
        return inner.update(treedef.unflatten(g), state, treedef.unflatten(params), **extra)

    def whole(params, grads):
        state, seen = inner.init(treedef.unflatten(params)), []
        for step in range(2):
            u, state = call(grads(step), state, params)
            u = treedef.flatten_up_to(u)
            params = [p + d for p, d in zip(params, u, strict=True)]
            seen += [*params, *jax.tree.leaves(state)]
        return seen

    def chunked(params, grads):
        state, seen = inner.init(treedef.unflatten(params)), []
        for step in range(2):
            g = grads(step)
            smap = StateMap(state, treedef.unflatten(params))
            cut = lambda xs, keep: [x if j in keep else empty_like(x) for j, x in enumerate(xs)]
            dense = [j for j in range(n) if j not in sparse]
            u0, s1 = call(
                cut(g, dense),
                smap.map(lambda j, e, dense=dense: e if j in dense else empty_like(e)),
                cut(params, dense),
            )
            u = treedef.flatten_up_to(u0)
            new_entries = {}
            for i in sparse:
                parts_u, parts_e = [], []
                for lo, hi in ((0, 1), (1, 4)):
                    sl = lambda xs, lo=lo, hi=hi, i=i: [
                        x[lo:hi] if j == i else empty_like(x) for j, x in enumerate(xs)
                    ]
                    s = smap.map(
                        lambda j, e, lo=lo, hi=hi, i=i: e[lo:hi] if j == i else empty_like(e)
                    )
                    ui, si = call(sl(g), s, sl(params))
                    parts_u.append(treedef.flatten_up_to(ui)[i])
                    parts_e.append(StateMap(si, treedef.unflatten(sl(params))).entries(i))
                u[i] = jnp.concatenate(parts_u)
                new_entries[i] = iter([jnp.concatenate(e) for e in zip(*parts_e, strict=True)])
            state = StateMap(s1, treedef.unflatten(cut(params, dense))).map(
                lambda j, e, taken=new_entries: next(taken[j]) if j in sparse else e
            )
            params = [p + d for p, d in zip(params, u, strict=True)]
            seen += [*params, *jax.tree.leaves(state)]
        return seen

    # Evaluated now (one small compiled program), even when called while tracing a step.
    with jax.ensure_compile_time_eval(), jax.numpy_dtype_promotion("standard"):
        params, grads = _tiny(leaves, p_leaves, sparse)
        try:
            want, got = jax.jit(lambda: (whole(params, grads), chunked(params, grads)))()
        except Exception:  # noqa: BLE001 - it cannot run on the stand-in a chunk at a time
            return False
    return len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if not np.issubdtype(a.dtype, np.inexact):
        return bool(np.array_equal(a, b))
    a, b = a.astype(np.float64), b.astype(np.float64)
    return bool(np.allclose(a, b, rtol=1e-6, atol=0.0, equal_nan=True))


def _describe(inner) -> str:
    name = getattr(getattr(inner, "update", None), "__qualname__", "") or type(inner).__name__
    return name.split(".<locals>")[0]


# --------------------------------------------------------------------------------------
# The transformation
# --------------------------------------------------------------------------------------


def lazy(
    inner: optax.GradientTransformation, *, check: bool = True
) -> optax.GradientTransformationExtraArgs:
    r"""Runs an optax transformation on the touched blocks of the sparse gradients only.

    Dense gradient leaves get ``inner``'s update.  For a
    :class:`~blocksparse_jax.SparseBlockGrad` leaf, ``inner`` sees the touched
    blocks of the gradient, of the parameter and of the leaf's optimizer
    state (``mu`` and ``nu`` of Adam, ...), and only those blocks of the state
    change; the update is a ``SparseBlockGrad`` of the same blocks, *added* to
    the parameter by :func:`apply_updates` (or ``optax.apply_updates``).
    Untouched blocks and their state do not change (*lazy* semantics); the step
    count (``count`` of Adam, schedules) is global and advances once per
    ``update``.  This is PyTorch's ``torch.optim.SparseAdam`` and TensorFlow
    Addons' ``LazyAdam``: a block's moments decay only on the steps that touch
    it.  (With ``inner=optax.adam``, ``eps`` follows optax: it is added to the
    bias-corrected ``sqrt(nu_hat)``; PyTorch adds it to the uncorrected
    ``sqrt(nu)``, a difference of the order of ``eps``.)  When every block is
    touched the result is ``inner``'s own.

    ``inner`` sees one tree, shaped like the parameters with the sparse
    leaves cut down to their touched blocks, so transformations that look
    across leaves (``clip_by_global_norm``, ``apply_if_finite``, ``noisy_sgd``,
    ``masked``, ``multi_transform``, ``inject_hyperparams``, extra arguments
    such as ``value=`` for ``reduce_on_plateau``) act on the whole gradient.
    An *element-wise* ``inner`` (``sgd``, ``adam``, ``adamw``, ``adagrad``,
    ``rmsprop``, ``lion``, ``clip`` and chains of them; checked by running it
    on a small tree) is run a chunk of blocks at a time, in place: the step
    holds no temporary of the size of the weight.  Any other ``inner`` holds
    all touched blocks (gradient, parameter, state) gathered at once.

    Args:
      inner: an ``optax.GradientTransformation`` whose per-parameter state has
        the parameters' shapes (as optax's optimizers do).
      check: find out whether ``inner`` is element-wise by running it (at
        construction).  ``False`` trusts that it is.

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``init(params)`` is
      ``inner.init``; ``update(grads, state, params, **extra_args)`` accepts
      gradients with :class:`~blocksparse_jax.SparseBlockGrad` leaves and
      returns updates with ``SparseBlockGrad`` leaves at the same places.

    Raises:
      TypeError: ``inner`` is not a ``GradientTransformation``.
      ValueError: ``inner`` holds ``optax.MultiSteps`` (gradients accumulated
        over steps must be applied to every block they touched, not only to the
        blocks of the step that applies them), or fails on a small tree; at
        update time, ``params`` missing while the gradients have sparse leaves.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from blocksparse_jax import embedding_lookup, value_and_sparse_grad
      >>> from blocksparse_jax.optim import lazy, apply_updates
      >>> table = jnp.ones((6, 2))
      >>> loss_fn = lambda t: jnp.sum(embedding_lookup(t, jnp.array([1, 4, 1])) ** 2)
      >>> tx = lazy(optax.adam(0.1))
      >>> state = tx.init(table)
      >>> @jax.jit
      ... def step(table, state):
      ...     loss, grads = value_and_sparse_grad(loss_fn)(table)
      ...     updates, state = tx.update(grads, state, table)
      ...     return apply_updates(table, updates), state
      >>> table, state = step(table, state)
      >>> table[:, 0].round(4)                    # rows 1 and 4 moved, the others did not
      Array([1. , 0.9, 1. , 1. , 0.9, 1. ], dtype=float32)
      >>> state[0].mu[:, 0]                       # and so did their moments only
      Array([0. , 0.4, 0. , 0. , 0.2, 0. ], dtype=float32)
    """
    if not isinstance(inner, optax.GradientTransformation):
        raise TypeError(
            f"inner must be an optax.GradientTransformation; got {type(inner).__name__}"
        )
    name = getattr(inner, "__name__", None) or _describe(inner)
    inner = optax.with_extra_args_support(inner)
    try:  # on a small tree, when it takes any tree (a mask tree may need the real one)
        with jax.numpy_dtype_promotion("standard"):
            probe_state = inner.init({"a": jnp.zeros((4,), jnp.float32)})
    except Exception:  # noqa: BLE001 - checked again on the real state at update time
        probe_state = None
    _refuse_multi_steps(probe_state, name)
    # Whether the chunked path is exact, per kind of call (static: found at trace time).
    elementwise: dict = {}

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None, **extra_args):
        leaves, treedef = jax.tree.flatten(updates, is_leaf=is_sparse)
        sparse = [i for i, g in enumerate(leaves) if is_sparse(g)]
        if not sparse:
            return inner.update(updates, state, params, **extra_args)
        if params is None:
            raise ValueError(
                "lazy(...).update needs params when the gradients hold SparseBlockGrad leaves "
                "(the optimizer runs on the touched blocks of the parameters): call "
                "tx.update(grads, state, params)"
            )
        p_leaves = treedef.flatten_up_to(params)
        for i in sparse:
            _check_param(leaves[i], p_leaves[i], i)
        _refuse_multi_steps(state, name)
        key = (
            treedef,
            tuple(sparse),
            tuple((np.shape(p), jnp.asarray(p).dtype) for p in p_leaves),
            tuple(leaves[i].block_shape for i in sparse),
            jax.tree.structure(extra_args),
        )
        if key not in elementwise:
            elementwise[key] = (not check) or _is_elementwise(
                inner, treedef, leaves, p_leaves, sparse, extra_args
            )
        run = _update_elementwise if elementwise[key] else _update_whole
        with _mesh_of(p_leaves):
            new_leaves, new_state = run(inner, leaves, treedef, state, p_leaves, sparse, extra_args)
        return jax.tree.unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _mesh_of(arrays):
    """The mesh of the first array typed on an ``Explicit`` mesh, as the context of the update.

    Arrays the update creates (its buffers) then live on the same mesh as the
    parameters they are combined with.
    """
    for a in arrays:
        mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty:
            if mesh != jax.sharding.get_abstract_mesh():
                return jax.sharding.use_abstract_mesh(mesh)
            break
    return contextlib.nullcontext()


def _check_param(g: SparseBlockGrad, p, i: int) -> None:
    if np.shape(p) != g.shape:
        raise ValueError(
            f"lazy(...).update: the parameter of sparse gradient leaf {i} has shape "
            f"{np.shape(p)}; the gradient is of a weight of shape {g.shape}"
        )


def _view(a, g: SparseBlockGrad):
    return jnp.reshape(a, g.layout.view)


def _empty_like_blocks(g: SparseBlockGrad, dtype):
    return jnp.zeros((0, *g.block_shape), dtype)


def _update_whole(inner, leaves, treedef, state, p_leaves, sparse, extra_args):
    """One call of ``inner`` on the whole tree, the sparse leaves cut to their touched blocks."""
    smap = StateMap(state, treedef.unflatten(p_leaves))
    grads, blocks = list(leaves), list(p_leaves)
    for i in sparse:
        g = leaves[i]
        grads[i] = g.values
        blocks[i] = take_blocks(_view(p_leaves[i], g), g.layout, g.indices)
    gathered = smap.map(
        lambda i, e: (
            take_blocks(_view(e, leaves[i]), leaves[i].layout, leaves[i].indices)
            if i in sparse
            else e
        )
    )
    blocks_tree = treedef.unflatten(blocks)
    u, new_state = inner.update(treedef.unflatten(grads), gathered, blocks_tree, **extra_args)
    u_leaves = treedef.flatten_up_to(u)
    for i in sparse:
        g = leaves[i]
        valid = g.valid.reshape((-1,) + (1,) * len(g.block_shape))
        ub = jnp.where(valid, u_leaves[i], jnp.zeros((), u_leaves[i].dtype))
        u_leaves[i] = SparseBlockGrad(ub, Slots(g.indices, g.layout))

    # The old full-size entries, with the new blocks written in (padding slots dropped).
    old = {i: iter(smap.entries(i)) for i in sparse}

    def write(i, new):
        if i not in sparse:
            return new
        g, e = leaves[i], next(old[i])
        return g.layout.put(_view(e, g), g.indices, new).reshape(e.shape)

    return u_leaves, StateMap(new_state, blocks_tree).map(write)


def _update_elementwise(inner, leaves, treedef, state, p_leaves, sparse, extra_args, path=None):
    """``inner`` once for the dense leaves, then in place a chunk of blocks at a time per sparse leaf."""
    params = treedef.unflatten(p_leaves)
    smap = StateMap(state, params)
    n = len(leaves)

    def empty(i, dtype):
        return _empty_like_blocks(leaves[i], dtype) if i in sparse else jnp.zeros((0,), dtype)

    # The dense leaves, and the global count: the sparse leaves empty.
    g0 = [empty(i, leaves[i].dtype) if i in sparse else leaves[i] for i in range(n)]
    p0 = treedef.unflatten(
        [empty(i, p.dtype) if i in sparse else p for i, p in enumerate(p_leaves)]
    )
    s0 = smap.map(lambda i, e: empty(i, e.dtype) if i in sparse else e)
    u0, s1 = inner.update(treedef.unflatten(g0), s0, p0, **extra_args)
    out = treedef.flatten_up_to(u0)

    new_entries = {}
    for i in sparse:
        g = leaves[i]

        def on_blocks(g_blk, p_blk, e_blks, i=i):
            """``inner`` on blocks of leaf ``i`` alone (the others empty), from the step's state."""
            it = iter(e_blks)
            gs = [g_blk if j == i else empty(j, leaves[j].dtype) for j in range(n)]
            ps = treedef.unflatten(
                [p_blk if j == i else empty(j, q.dtype) for j, q in enumerate(p_leaves)]
            )
            s = smap.map(lambda j, entry, it=it, i=i: next(it) if j == i else empty(j, entry.dtype))
            u, s_new = inner.update(treedef.unflatten(gs), s, ps, **extra_args)
            return treedef.flatten_up_to(u)[i], StateMap(s_new, ps).entries(i)

        entries = smap.entries(i)
        result = _inplace.update(
            _inplace.LeafUpdate(
                g, _view(p_leaves[i], g), [_view(e, g) for e in entries], on_blocks
            ),
            path,
        )
        values = result.values.astype(_inplace._acc(p_leaves[i].dtype))
        applied = Applied(p_leaves[i], values, result.param.reshape(g.shape))
        out[i] = SparseBlockGrad(values, Slots(g.indices, g.layout, applied=applied))
        new_entries[i] = [e.reshape(x.shape) for e, x in zip(result.entries, entries, strict=True)]

    taken = {i: iter(new_entries[i]) for i in sparse}
    s_final = StateMap(s1, p0).map(lambda i, e: next(taken[i]) if i in sparse else e)
    return out, s_final


# --------------------------------------------------------------------------------------
# Applying updates
# --------------------------------------------------------------------------------------


def apply_updates(params, updates):
    """``optax.apply_updates`` with :class:`~blocksparse_jax.SparseBlockGrad` updates added to their blocks.

    Dense leaves: ``params + updates`` in the parameter's dtype, as
    ``optax.apply_updates``.  Sparse leaves: the parameter plus the update on
    its touched blocks, in place when ``params`` is donated to the jitted step
    (the update of an element-wise :func:`lazy` optimizer, unchanged since, is
    already in place and costs nothing more).

    Args:
      params: the parameters.
      updates: the updates (dense arrays, ``SparseBlockGrad`` leaves, ``None``).

    Returns:
      The new parameters.
    """

    def apply(p, u):
        if u is None:
            return p
        if isinstance(u, SparseBlockGrad):
            return u.add_to(p)
        return jnp.asarray(p + u).astype(jnp.asarray(p).dtype)

    return jax.tree.map(apply, params, updates, is_leaf=lambda x: x is None or is_sparse(x))
