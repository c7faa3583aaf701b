"""``lazy_train_step``: the usual optax step, with sparse gradients and a lazy optimizer."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from blocksparse_jax.optim._blocks import SparseBlockGrad, is_sparse
from blocksparse_jax.optim._lazy import apply_updates, lazy
from blocksparse_jax.optim._value_and_grad import value_and_sparse_grad


def touched_fractions(grads) -> dict[str, jax.Array]:
    """``{path: fraction of the leaf's blocks touched}`` for each :class:`SparseBlockGrad` in ``grads``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import SparseBlockGrad
      >>> from blocksparse_jax.optim import touched_fractions
      >>> g = SparseBlockGrad.from_pairs(jnp.array([3, 1, 3]), None, jnp.ones((3, 2)), shape=(8, 2))
      >>> touched_fractions({"embed": g, "w": jnp.ones(2)})
      {"['embed']": Array(0.25, dtype=float32)}
    """
    out = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads, is_leaf=is_sparse)[0]:
        if isinstance(g, SparseBlockGrad):
            out[jax.tree_util.keystr(path)] = g.n_touched().astype(jnp.float32) / g.n_blocks
    return out


def lazy_train_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation, *, donate: bool = True
) -> Callable:
    r"""A jitted training step: sparse gradients, ``lazy(optimizer)``, updates applied in place.

    ```
    loss, grads = value_and_sparse_grad(loss_fn)(params, *args)
    updates, opt_state = lazy(optimizer).update(grads, opt_state, params)
    params = apply_updates(params, updates)
    ```

    Args:
      loss_fn: ``(params, *args) -> scalar loss``; its block-sparse weights and
        embedding tables (used through :func:`~blocksparse_jax.embedding_lookup`)
        get sparse gradients.
      optimizer: an element-wise optax transformation (wrapped in :func:`lazy` here).
      donate: donate ``params`` and ``opt_state`` (the updates are made in place).

    Returns:
      ``(init, step)``: ``init(params) -> opt_state`` and ``step(params,
      opt_state, *args) -> (params, opt_state, loss, touched)`` where
      ``touched`` is :func:`touched_fractions` of the step's gradients.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from blocksparse_jax import embedding_lookup
      >>> from blocksparse_jax.optim import lazy_train_step
      >>> loss_fn = lambda p, ids: jnp.mean(embedding_lookup(p["embed"], ids) @ p["w"])
      >>> params = {"embed": jnp.ones((100, 4)), "w": jnp.ones(4)}
      >>> init, step = lazy_train_step(loss_fn, optax.adam(1e-2))
      >>> opt_state = init(params)
      >>> params, opt_state, loss, touched = step(params, opt_state, jnp.array([3, 7, 3]))
      >>> float(loss), touched
      (4.0, {"['embed']": Array(0.02, dtype=float32)})
    """
    tx = lazy(optimizer)

    def step(params, opt_state, *args):
        loss, grads = value_and_sparse_grad(loss_fn)(params, *args)
        # optax's own arithmetic mixes Python floats and int32 counts
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state, loss, touched_fractions(grads)

    return tx.init, jax.jit(step, donate_argnums=(0, 1) if donate else ())
