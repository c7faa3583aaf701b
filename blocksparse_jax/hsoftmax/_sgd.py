"""``h_softmax_sgd_step``: one SGD step that updates ``W2`` and ``b2`` sparsely, in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _targets
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._order import after
from blocksparse_jax._scope import named
from blocksparse_jax.blocksparse import sparse_block_outer
from blocksparse_jax.hsoftmax import _problem as _p
from blocksparse_jax.hsoftmax._params import HSoftmaxParams


@named
def h_softmax_sgd_step(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike,
    learning_rate: ArrayLike,
    *,
    n_outputs: int | None = None,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    class_sizes: ArrayLike | None = None,
) -> tuple[jax.Array, HSoftmaxParams, jax.Array]:
    r"""One SGD step on :func:`h_softmax_loss` that updates ``W2`` sparsely, in place.

    ```
    params' = params - learning_rate * grad(h_softmax_loss)(params)
    ```

    The same values as the dense step, but the gradients of ``W2`` and ``b2``
    are never built: they are non-zero only in the targets' classes, and the
    update is applied to those blocks directly, with :func:`sparse_block_outer`
    (``alpha=-learning_rate``) for ``W2`` and a scatter-add for ``b2``.
    ``jax.grad`` must return a dense ``W2``-sized gradient, whose zero-fill
    dominates a step at large vocabularies (``W2`` holds ``n_in * n_outputs``
    weights); this step touches ``W2`` only where the targets' classes are.
    Under ``jax.jit`` with ``params`` donated (``donate_argnums``) the update
    is made in the donated buffer; without donation XLA copies ``W2`` first.

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`HSoftmaxParams`.
      target: integer outputs in ``[0, n_outputs)``, shaped ``x.shape[:-1]``.
      learning_rate: scalar step size (an array or a Python float; traced, so a
        schedule does not recompile).
      n_outputs: as in :func:`h_softmax_loss`.
      mask: as in :func:`h_softmax_loss`.  A masked-out example (and, under
        ``jit``, an out-of-range or padded target) changes no parameter,
        whatever its ``x`` holds.
      reduction: as in :func:`h_softmax_loss`, but it must reduce to a scalar
        (``"mean"`` or ``"sum"``).
      class_sizes: as in :func:`h_softmax_loss`.

    Returns:
      ``(loss, new_params, dx)``: the loss before the step (as
      :func:`h_softmax_loss`), the updated parameters (each in its own dtype) and
      the gradient of the loss with respect to ``x`` (to backpropagate into the
      layers below), shaped and typed like ``x``.

    Raises:
      ValueError: ``reduction="none"``, a ``learning_rate`` that is not a scalar,
        and everything :func:`h_softmax_loss` raises.
      TypeError: a ``learning_rate`` that is not a float.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax_init, h_softmax_loss, h_softmax_sgd_step
      >>> params = h_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, 7])
      >>> step = jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)
      >>> dense = jax.tree.map(lambda p, g: p - 0.1 * g, params,
      ...                      jax.grad(h_softmax_loss, argnums=1)(x, params, target, n_outputs=100))
      >>> loss, params, dx = step(x, params, target, 0.1, n_outputs=100)
      >>> all(bool(jnp.allclose(a, b, atol=1e-6)) for a, b in zip(params, dense))
      True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum' for a training step (a scalar loss); got {reduction!r}"
        )
    learning_rate = _as_array("learning_rate", learning_rate)
    if learning_rate.shape != ():
        raise ValueError(f"learning_rate must be a scalar; got shape {_shape(learning_rate.shape)}")
    if not jnp.issubdtype(learning_rate.dtype, jnp.floating):
        raise TypeError(f"learning_rate must be a float scalar; got dtype {learning_rate.dtype}")
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    mask = _targets.check_mask(mask, prob.lead)
    t = _p.checked_target(prob, target, mask)
    loss, new, dx = _p.run_flat(
        _sgd_step, prob, t, mask.reshape(-1), learning_rate, reduction=reduction
    )
    return loss, new, _p.unflatten(prob, dx).astype(prob.x.dtype)


def _sgd_step(prob: _p.Problem, t, mask, learning_rate, *, reduction):
    batch, P = prob.x.shape[0], prob.per_class

    def loss_fn(x, W1, b1, act_offset):
        p = prob._replace(x=x, W1=W1, b1=b1)
        return _targets.reduce_nll(p.target_log_probs(t, act_offset, mask), mask, reduction)

    # W2 and b2 are held fixed: their dense gradients are never built (XLA drops
    # them); the cotangent of the second-level activations updates their blocks.
    offset = jnp.zeros((batch, P), prob.acc)
    loss, vjp = jax.vjp(loss_fn, prob.x, prob.W1, prob.b1, offset)
    dx, dW1, db1, g_act = vjp(jnp.ones((), loss.dtype))
    lr = learning_rate.astype(prob.acc)
    sgd = lambda p, g: (p.astype(prob.acc) - lr * g.astype(prob.acc)).astype(p.dtype)
    # The examples that take no part (masked out, out of range, padded) are
    # selected out: their rows of x and of the cotangent are zeros, whatever x held.
    t, use, x = prob.select_targets(t, mask)
    # dx reads W2; the update must come after that read, or XLA copies W2 to
    # keep the read safe.  Deriving the update's block indices from dx orders them.
    classes = after(t // P, dx)
    g_act = jnp.where(use[:, None], g_act, jnp.zeros((), g_act.dtype))
    zeros = jnp.zeros((batch, 1), jnp.int32)
    W2 = sparse_block_outer(
        prob.W2[None], x[:, None, :], g_act[:, None, :], zeros, classes[:, None], alpha=-lr
    )[0]
    b2 = prob.b2.astype(prob.acc).at[classes].add(-lr * g_act, mode="drop").astype(prob.b2.dtype)
    return loss, HSoftmaxParams(sgd(prob.W1, dW1), sgd(prob.b1, db1), W2, b2), dx
