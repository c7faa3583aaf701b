"""``value_and_sparse_grad``: ``jax.value_and_grad`` with the block-sparse weights' gradients sparse."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from blocksparse_jax._order import after
from blocksparse_jax._sparse_sites import BlockPairs
from blocksparse_jax.optim import _trace
from blocksparse_jax.optim._blocks import SparseBlockGrad, build


class DenseGradientWarning(UserWarning):
    """A weight read by a block-sparse op gets a dense gradient from :func:`value_and_sparse_grad`."""


def value_and_sparse_grad(
    fun: Callable, argnums: int | Sequence[int] = 0, *, has_aux: bool = False
) -> Callable:
    r"""Like ``jax.value_and_grad``, with the weights of the block-sparse ops as :class:`SparseBlockGrad`.

    A differentiated array that ``fun`` reads only through the block-sparse
    ops gets its gradient as a :class:`SparseBlockGrad` holding only the
    blocks the call touched:

    * ``W`` of :func:`~blocksparse_jax.sparse_block_gemv` and
      :func:`~blocksparse_jax.sparse_block_dot`, and ``b`` of the latter;
    * ``params.W2`` and ``params.b2`` of :func:`~blocksparse_jax.h_softmax_loss`;
    * ``table`` of :func:`~blocksparse_jax.embedding_lookup`;

    and the same functions of :mod:`blocksparse_jax.parallel`.  Every other
    leaf comes back dense, exactly as from ``jax.value_and_grad``, and the
    values of a sparse gradient are those of the dense one.  No weight-sized
    gradient is built for a sparse leaf.

    The ops may be called anywhere in ``fun``: inside ``jax.jit``,
    ``jax.checkpoint``, ``lax.scan`` / ``fori_loop`` with static bounds (one
    set of blocks per step, all summed), ``lax.cond`` / ``switch`` (the
    branch that runs), ``jax.vmap`` over anything but the weight.  A leaf that
    ``fun`` also uses in another way (tied weights, a cast, a weight batched by
    ``vmap``, an op inside a ``while_loop`` or a custom-derivative function)
    gets its full gradient, dense, and a :class:`DenseGradientWarning` naming
    it and the reason.  Several sparse uses of a leaf are summed into one
    :class:`SparseBlockGrad`; the same array passed twice (two leaves) gets two.

    ``fun`` is traced once, to a jaxpr, which is then evaluated; call the
    result under ``jax.jit``.  It works under ``jax.jit``, ``jax.vmap`` and
    ``jax.grad`` (an outer derivative of its value or of its gradients is that
    of ``jax.value_and_grad``'s).  A :class:`SparseBlockGrad` keeps its indices
    out of the pytree's leaves: use it inside the function that made it.

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
      ValueError: ``argnums`` out of range.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import value_and_sparse_grad, h_softmax_init, h_softmax_loss
      >>> params = h_softmax_init(jax.random.key(0), 8, 100)          # 10 classes of 10
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, 45])
      >>> loss_fn = lambda p: h_softmax_loss(x, p, target, n_outputs=100)
      >>> @jax.jit
      ... def touched(p):
      ...     loss, grads = value_and_sparse_grad(loss_fn)(p)
      ...     return grads.W2.indices, grads.W2.todense(), grads.W1
      >>> indices, dW2, dW1 = touched(params)
      >>> indices                                  # classes 0, 4 and 9; one padding slot
      Array([ 0,  4,  9, 10], dtype=int32)
      >>> dense = jax.grad(loss_fn)(params)
      >>> bool(jnp.allclose(dW2, dense.W2, atol=1e-6)), bool(jnp.allclose(dW1, dense.W1))
      (True, True)
    """
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)
    if not nums or not all(isinstance(n, int) for n in nums):
        raise TypeError(f"argnums must be an int or a tuple of ints; got {argnums!r}")

    def wrapped(*args, **kwargs):
        leaves, treedef, names = _differentiated_leaves(args, nums)
        closed, aux_tree = _trace_fun(fun, args, kwargs, nums, treedef, has_aux, leaves)
        plan = _trace.plan(closed, len(leaves))
        for k, reason in plan.dense_reasons.items():
            warnings.warn(
                f"value_and_sparse_grad: {names[k]} gets a dense gradient: {reason}",
                DenseGradientWarning,
                stacklevel=2,
            )
        value, aux_flat, grad_leaves = _value_and_grads(closed, leaves, plan)
        grads = jax.tree.unflatten(treedef, grad_leaves)
        grads = grads[0] if single else grads
        if has_aux:
            return (value, jax.tree.unflatten(aux_tree, aux_flat)), grads
        return value, grads

    return wrapped


def _differentiated_leaves(args, nums):
    """The leaves of the differentiated arguments (arrays), their treedef and their names."""
    for n in nums:
        if not -len(args) <= n < len(args):
            raise ValueError(
                f"argnums {n} is out of range for a call with {len(args)} positional arguments"
            )
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tuple(args[n] for n in nums))
    leaves, names = [], []
    for path, a in with_path:
        a = a if isinstance(a, jax.Array) else jnp.asarray(a)
        name = f"argument {nums[path[0].idx]}{jax.tree_util.keystr(path[1:])}"
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(
                f"value_and_sparse_grad differentiates float arrays only; {name} has dtype "
                f"{a.dtype}"
            )
        leaves.append(a)
        names.append(name)
    return leaves, treedef, names


def _trace_fun(fun, args, kwargs, nums, treedef, has_aux, leaves):
    """The closed jaxpr of ``fun`` as a function of the differentiated leaves.

    Its outputs are the value, then the auxiliary output's leaves.
    """
    aux_tree = []

    def flat_fun(*leaf_list):
        full = list(args)
        for n, v in zip(nums, jax.tree.unflatten(treedef, leaf_list), strict=True):
            full[n] = v
        out = fun(*full, **kwargs)
        value, aux = (out[0], out[1]) if has_aux else (out, None)
        value = jnp.asarray(value)
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise TypeError(
                "value_and_sparse_grad needs fun to return a real scalar"
                f"{' (as the first element of its output)' if has_aux else ''}; got shape "
                f"{value.shape} and dtype {value.dtype}"
            )
        aux_flat, tree = jax.tree.flatten(aux)
        aux_tree.append(tree)
        return [value, *aux_flat]

    closed = jax.make_jaxpr(flat_fun)(*leaves)
    return closed, aux_tree[-1]


def _value_and_grads(closed, leaves, plan: _trace.Plan):
    """``(value, aux leaves, gradient leaves)``: dense leaves by ``jax.vjp``, sparse ones from sites."""
    sparse = set(plan.sparse)
    dense_pos = [k for k in range(len(leaves)) if k not in sparse]

    def run(dense_leaves, probes):
        args = list(leaves)
        for k, v in zip(dense_pos, dense_leaves, strict=True):
            args[k] = v
        outs, extracted = _trace.evaluate(closed, args, plan, probes)
        return outs[0], (outs[1:], extracted)

    probes = _trace.zero_probes(plan)
    value, vjp, (aux_flat, extracted) = jax.vjp(
        run, [leaves[k] for k in dense_pos], probes, has_aux=True
    )
    ct_dense, ct_probes = vjp(jnp.ones((), value.dtype))
    grads: list = [None] * len(leaves)
    for k, g in zip(dense_pos, ct_dense, strict=True):
        grads[k] = g
    if not sparse:
        return value, aux_flat, grads

    pairs = {k: [] for k in plan.sparse}
    for s, site in enumerate(plan.sites):
        layout = plan.layouts[site.leaf]
        pairs[site.leaf].append(
            _trace.site_pairs(site, ct_probes[s], extracted[s], layout.n_blocks)
        )
    dense_of = dict(zip(dense_pos, ct_dense, strict=True))
    for k in plan.sparse:
        parts = pairs[k]
        blocks = jnp.concatenate([p.blocks.reshape(-1) for p in parts])
        left = None if parts[0].left is None else jnp.concatenate([p.left for p in parts])
        right = jnp.concatenate([p.right for p in parts])
        # The weight is updated in place after this gradient: order it after every
        # read of the weight, the backward passes through it (the dense gradients
        # computed from its value, the other sparse leaves' cotangents) and the value.
        deps = [dense_of[j] for j in plan.readers[k]] + [value]
        deps += [ct_probes[s] for s, site in enumerate(plan.sites) if site.leaf != k]
        deps = [jnp.sum(d.astype(jnp.float32)) for d in deps if d.size]
        grads[k] = build(
            BlockPairs(after(blocks, *deps), left, right), plan.layouts[k], leaves[k].dtype
        )
    return value, aux_flat, grads


__all__ = ["DenseGradientWarning", "SparseBlockGrad", "value_and_sparse_grad"]
