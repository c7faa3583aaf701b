"""``h_softmax_sgd_step``: one SGD step that updates ``W2`` and ``b2`` sparsely, in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
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
    n_outputs: int,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    class_sizes: ArrayLike | None = None,
) -> tuple[jax.Array, HSoftmaxParams, jax.Array]:
    r"""One SGD step on :func:`h_softmax_loss` that updates ``W2`` sparsely, in place.

    ::

        params' = params - learning_rate * grad(h_softmax_loss)(params)

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
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`HSoftmaxParams`.
      target: ``(batch,)`` or ``(batch, 1)`` integer outputs in ``[0, n_outputs)``.
      learning_rate: scalar step size (an array or a Python float; traced, so a
        schedule does not recompile).
      n_outputs, mask, reduction, class_sizes: as in :func:`h_softmax_loss`;
        ``reduction`` must reduce to a scalar (``"mean"`` or ``"sum"``).

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
    x = _as_array("x", x)
    target, mask = _p.loss_target_and_mask(target, mask, reduction, batched=x.ndim == 2)
    learning_rate = _as_array("learning_rate", learning_rate)
    if learning_rate.shape != ():
        raise ValueError(f"learning_rate must be a scalar; got shape {_shape(learning_rate.shape)}")
    if not jnp.issubdtype(learning_rate.dtype, jnp.floating):
        raise TypeError(f"learning_rate must be a float scalar; got dtype {learning_rate.dtype}")
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    t = _p.checked_target(prob, target)
    mask = mask.reshape(prob.x.shape[0])
    loss, new, dx = _p.run(_sgd_step, prob._replace(batched=True), t, mask, learning_rate,
                         reduction=reduction)  # fmt: skip
    return loss, new, (dx if prob.batched else dx[0]).astype(x.dtype)


def _sgd_step(prob: _p.Problem, t, mask, learning_rate, *, reduction):
    batch, P = prob.x.shape[0], prob.per_class

    def loss_fn(x, W1, b1, act_offset):
        p = prob._replace(x=x, W1=W1, b1=b1)
        return _p.reduce_nll(p.target_log_probs(t, act_offset), mask, reduction)

    # W2 and b2 are held fixed: their dense gradients are never built (XLA drops
    # them); the cotangent of the second-level activations updates their blocks.
    offset = jnp.zeros((batch, P), prob.acc)
    loss, vjp = jax.vjp(loss_fn, prob.x, prob.W1, prob.b1, offset)
    dx, dW1, db1, g_act = vjp(jnp.ones((), loss.dtype))
    lr = learning_rate.astype(prob.acc)
    sgd = lambda p, g: (p.astype(prob.acc) - lr * g.astype(prob.acc)).astype(p.dtype)
    # dx reads W2; the update must come after that read, or XLA copies W2 to
    # keep the read safe.  Deriving the update's block indices from dx orders them.
    classes = _after(_p.normalize_target(t, prob.n_outputs)[0] // P, dx)
    zeros = jnp.zeros((batch, 1), jnp.int32)
    W2 = sparse_block_outer(
        prob.W2[None], prob.x[:, None, :], g_act[:, None, :], zeros, classes[:, None], alpha=-lr
    )[0]
    b2 = prob.b2.astype(prob.acc).at[classes].add(-lr * g_act, mode="drop").astype(prob.b2.dtype)
    return loss, HSoftmaxParams(sgd(prob.W1, dW1), sgd(prob.b1, db1), W2, b2), dx


def _after(idx, dep):
    """``idx`` unchanged, computed from ``dep`` so that its users run after ``dep``.

    XLA:CPU drops ``lax.optimization_barrier`` before it decides which reads of
    a donated buffer may overlap an in-place update, so the order is made a data
    dependence: a zero derived from the bits of ``dep[0]``, which XLA does not fold.
    """
    first = dep.reshape(-1)[:1].astype(jnp.float32)
    bits = lax.bitcast_convert_type(first, jnp.int32)
    sign = lax.shift_right_logical(bits, jnp.full_like(bits, 31))  # 0 or 1
    zero = lax.shift_right_logical(sign, jnp.ones_like(sign))  # always 0
    return idx + zero.astype(idx.dtype)
