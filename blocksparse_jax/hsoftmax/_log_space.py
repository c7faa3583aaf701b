"""The log-space functions: ``h_log_softmax`` and ``h_softmax_loss``."""

from __future__ import annotations

import jax
from jax.typing import ArrayLike

from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax import _targets
from blocksparse_jax._scope import named
from blocksparse_jax.hsoftmax import _problem as _p
from blocksparse_jax.hsoftmax._params import HSoftmaxParams


@named
def h_log_softmax(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike | None = None,
    *,
    n_outputs: int | None = None,
    class_sizes: ArrayLike | None = None,
) -> jax.Array:
    r"""Log-probabilities of the two-level hierarchical softmax, computed in log space.

    With ``c = o // n_outputs_per_class`` and ``s = o % n_outputs_per_class``:

    ```
    log p(o | x) = log_softmax(x @ W1 + b1)[c] + log_softmax(x @ W2[c] + b2[c])[s]
    ```

    where both softmaxes run only over real outputs: padded slots (``o >=
    n_outputs``, or ``s >= class_sizes[c]``) and empty classes are masked out,
    so ``sum_o p(o | x) == 1`` exactly.  Nothing is exponentiated outside a
    ``log_softmax``, so logits of magnitude ``1e4`` are fine.

    With ``target`` only the targets' classes are evaluated at the second level
    (a ``sparse_block_dot``), ``O(n_in * (n_classes + n_outputs_per_class))`` per
    example, and the gradient of ``W2`` and ``b2`` is non-zero only in the
    targets' classes.  Without it all ``n_outputs`` are computed.

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`HSoftmaxParams`.
      target: optional integer outputs in ``[0, n_outputs)`` of shape
        ``x.shape[:-1]`` (or that with a trailing 1; a scalar for a 1-D ``x``).
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``;
        default ``n_classes * n_outputs_per_class`` from the parameters' shapes
        (a layout's ``n_outputs``).  A Python int: under ``jax.jit`` leave it
        out or mark it static (``static_argnames="n_outputs"``).
      class_sizes: optional ``(n_classes,)`` integer number of outputs in each
        class (slots ``0 .. class_sizes[c] - 1``); the other slots are padding,
        with log-probability ``-inf``.  See :func:`frequency_classes`.

    Returns:
      ``(..., n_outputs)`` log-probabilities without ``target``, else the
      ``(...)`` log-probability of each target (``...`` = ``x.shape[:-1]``).  float64 if any input is float64, else float32 (float16 and
      bfloat16 inputs accumulate in float32).

    Raises:
      TypeError: non-float weights or inputs, non-integer ``target``.
      ValueError: shapes that do not match each other, ``n_outputs`` too large,
        a concrete ``class_sizes`` with no real output.
      TypeError: a traced ``n_outputs`` (say how to make it static).
      IndexError: a concrete ``target`` outside ``[0, n_outputs)`` or on a
        padded slot.  Under ``jit`` an out-of-range target gets ``-inf`` and
        ``checkify.index_checks`` reports it.

    Differentiation is reverse mode only: ``jax.grad``, ``jax.vjp``,
    ``jax.jacrev`` and ``jax.jacrev(jax.jacrev(f))`` work; ``jax.jvp``,
    ``jax.jacfwd`` and ``jax.hessian`` do not (the second level is a custom-VJP
    block-sparse op).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_log_softmax, h_softmax_init
      >>> params = h_softmax_init(jax.random.key(0), 8, 10)   # 4 classes of 3: 2 padded slots
      >>> x = jax.random.normal(jax.random.key(1), (2, 8))
      >>> logp = h_log_softmax(x, params, n_outputs=10)
      >>> logp.shape, jnp.exp(logp).sum(axis=-1).round(6)
      ((2, 10), Array([1., 1.], dtype=float32))
      >>> target = jnp.array([3, 9])
      >>> bool(jnp.allclose(h_log_softmax(x, params, target, n_outputs=10), logp[jnp.arange(2), target]))
      True
    """
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    if target is None:
        return _p.run(_all_outputs, prob)
    return _p.run(_target_log_probs, prob, _p.checked_target(prob, target), None)


def _target_log_probs(prob: _p.Problem, t, mask) -> jax.Array:
    return prob.target_log_probs(t, mask=mask)


def _all_outputs(prob: _p.Problem) -> jax.Array:
    return prob.full_log_probs()[:, : prob.n_outputs]


@named
def h_softmax_loss(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike,
    *,
    n_outputs: int | None = None,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    class_sizes: ArrayLike | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of the targets under the hierarchical softmax.

    ```
    loss[b] = -log p(target[b] | x[b])          (see h_log_softmax)
    ```

    reduced by ``mean`` over the unmasked examples (0 if there are none),
    ``sum`` or not at all (``none``, masked entries 0).  The second level is
    evaluated only for the targets' classes, so the gradient of ``W2`` and
    ``b2`` is non-zero only in those classes' blocks.

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`HSoftmaxParams`.
      target: integer outputs in ``[0, n_outputs)``, shaped ``x.shape[:-1]``
        (or that with a trailing 1).
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``;
        default ``n_classes * n_outputs_per_class`` from the parameters' shapes
        (a layout's ``n_outputs``).  A Python int: under ``jax.jit`` leave it
        out or mark it static (``static_argnames="n_outputs"``).
      mask: optional bool of shape ``x.shape[:-1]``, ``False`` for padding
        tokens.  A masked-out example is free: its target may be anything
        (``-1``, a padded slot) and is not checked, and its ``x`` (even NaN or
        inf) is selected out before any arithmetic, so it reaches neither the
        loss nor any gradient.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      class_sizes: optional ``(n_classes,)`` class sizes, as in
        :func:`h_log_softmax`.

    Returns:
      A scalar, or ``x.shape[:-1]`` for ``reduction="none"``; float32 (float64 if
      any input is float64).

    Raises:
      ValueError: an unknown ``reduction``, a ``mask`` of the wrong shape, and
        everything :func:`h_log_softmax` raises.

    Reverse-mode differentiation only (``jax.grad``, ``jax.jacrev``, nested
    ``jacrev``); ``jax.jvp`` / ``jacfwd`` / ``hessian`` are not supported.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax_init, h_softmax_loss
      >>> params = h_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, -1])             # the last one is padding
      >>> mask = jnp.array([True, True, True, False])
      >>> loss = h_softmax_loss(x, params, target, n_outputs=100, mask=mask)
      >>> grads = jax.grad(h_softmax_loss, argnums=1)(x, params, target, n_outputs=100, mask=mask)
      >>> jnp.flatnonzero(jnp.any(grads.W2 != 0, axis=(1, 2)))   # classes of 1, 42 and 99
      Array([0, 4, 9], dtype=int32)
    """
    _targets.check_reduction(reduction)
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    # The second level reads W2 and b2 only in the targets' classes.
    prob = prob._replace(W2=sites.mark_weight(prob.W2), b2=sites.mark_weight(prob.b2))
    mask = _targets.check_mask(mask, prob.lead)
    t = _p.checked_target(prob, target, mask)
    logp = _p.run(_target_log_probs, prob, t, mask.reshape(-1))
    return _targets.reduce_nll(logp, mask, reduction)
