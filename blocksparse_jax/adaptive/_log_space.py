"""The adaptive softmax's log-probabilities and loss.

With ``S = cutoffs[0]`` shortlist outputs and ``K`` tail clusters, cluster
``i`` holding the outputs ``cutoffs[i] <= o < cutoffs[i + 1]`` (the last one
ending at ``n_outputs``):

```
head = log_softmax(x @ head_W + head_b)                      (S + K entries)
log p(o | x) = head[o]                                       for o < S
log p(o | x) = head[S + i] + log_softmax((x @ tail_proj[i]) @ tail_out[i])[o - cutoffs[i]]
```

For one target per example only the target's cluster is evaluated, and only
for the examples whose target is in it (``_buckets``): a batch whose targets
are mostly in the shortlist costs little more than the head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _checks, _targets
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax.adaptive import _buckets
from blocksparse_jax.adaptive._params import AdaptiveSoftmaxParams, prepare


def head_log_probs(x: jax.Array, params: AdaptiveSoftmaxParams, acc) -> jax.Array:
    """``(batch, shortlist + n_clusters)`` log-softmax of the head, in ``acc``."""
    dt = _checks.common_float_dtype(x.dtype, params.head_W.dtype)
    logits = jnp.dot(x.astype(dt), params.head_W.astype(dt), preferred_element_type=acc)
    if params.head_b is not None:
        logits = logits + params.head_b.astype(acc)[None, :]
    return jax.nn.log_softmax(logits, axis=-1)


def projection(x: jax.Array, params: AdaptiveSoftmaxParams, i: int, acc):
    """``(x @ tail_proj[i], tail_out[i])`` in their common dtype (accumulated in ``acc``)."""
    P, W = params.tail_proj[i], params.tail_out[i]
    dt = _checks.common_float_dtype(x.dtype, P.dtype, W.dtype)
    h = jnp.dot(x.astype(dt), P.astype(dt), preferred_element_type=acc).astype(dt)
    return h, W.astype(dt)


def cluster_of(t: jax.Array, params: AdaptiveSoftmaxParams) -> tuple[jax.Array, jax.Array]:
    """``(cluster, offset)`` of in-range outputs ``t``: 0 for the shortlist, ``i + 1`` for tail ``i``."""
    cutoffs = params.cutoffs
    cluster = sum((t >= c).astype(jnp.int32) for c in cutoffs)
    bounds = jnp.asarray((0, *cutoffs), jnp.int32)
    return cluster, t - bounds[cluster]


def _full_log_probs(x, params: AdaptiveSoftmaxParams, acc) -> jax.Array:
    S = params.shortlist_size
    head = head_log_probs(x, params, acc)
    parts = [head[:, :S]]
    for i in range(params.n_clusters):
        h, W = projection(x, params, i, acc)
        logits = jnp.dot(h, W, preferred_element_type=acc)
        parts.append(head[:, S + i, None] + jax.nn.log_softmax(logits, axis=-1))
    return jnp.concatenate(parts, axis=1)


def _target_log_probs(x, params: AdaptiveSoftmaxParams, t, mask, acc, chunk_rows) -> jax.Array:
    """``(batch,)`` log-probabilities of the targets (``-inf`` for an out-of-range one).

    The examples that do not count (``mask`` False, or an out-of-range target)
    are replaced by a zero input with target 0 before anything is computed, so
    whatever their ``x`` holds (NaN included) reaches no output and no gradient.
    """
    S = params.shortlist_size
    t, valid = _targets.normalize_target(t, params.n_outputs)
    keep = valid & mask
    x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
    t = jnp.where(keep, t, jnp.zeros((), t.dtype))
    cluster, offset = cluster_of(t, params)
    head = head_log_probs(x, params, acc)
    head_idx = jnp.where(cluster == 0, t, S + cluster - 1)
    logp = jnp.take_along_axis(head, head_idx[:, None], axis=1)[:, 0]
    buckets = _buckets.sort_into_buckets(cluster, offset, params.n_clusters, chunk_rows)
    for i in range(params.n_clusters):
        h, W = projection(x, params, i, acc)
        logp = logp + _buckets.tail_log_probs(h, W, buckets[i])
    return jnp.where(valid, logp, jnp.full((), -jnp.inf, acc))


@functools.partial(jax.jit, static_argnames=("acc",))
def _full_jit(x, params, *, acc):
    with jax.named_scope("adaptive_log_softmax"):
        return _full_log_probs(x, params, acc)


@functools.partial(jax.jit, static_argnames=("acc", "chunk_rows", "reduction"))
def _target_jit(x, params, t, mask, *, acc, chunk_rows, reduction):
    with jax.named_scope("adaptive_softmax_loss" if reduction else "adaptive_log_softmax"):
        logp = _target_log_probs(x, params, t, mask, acc, chunk_rows)
        return logp if reduction is None else _targets.reduce_nll(logp, mask, reduction)


def _chunk_rows(batch: int, params: AdaptiveSoftmaxParams) -> tuple[int, ...]:
    return tuple(_buckets.rows_per_chunk(batch, s) for s in params.cluster_sizes)


def _checked_target(target, batch: int, n_outputs: int, batched: bool) -> jax.Array:
    """``target`` as ``(batch,)``; its shape and (when concrete) its values checked."""
    t, exact = _targets.check_target(target, (batch,) if batched else ())
    _targets.check_target_range(exact, n_outputs)
    return t.reshape(batch)


def _loss_target_and_mask(target, mask, reduction: str, *, batched: bool):
    """Validates ``reduction`` and ``mask``; returns ``(target, mask)``, masked targets 0."""
    _targets.check_reduction(reduction)
    target = _as_array("target", target)
    _checks.check_int("target", target)
    mask = _targets.check_mask(mask, target.shape[:1] if batched else ())
    keep = mask.reshape(mask.shape + (1,) * (target.ndim - mask.ndim))
    return jnp.where(keep, target, jnp.zeros((), target.dtype)), mask


def adaptive_log_softmax(
    x: ArrayLike, params: AdaptiveSoftmaxParams, target: ArrayLike | None = None
) -> jax.Array:
    r"""Log-probabilities of the adaptive softmax (PyTorch's ``AdaptiveLogSoftmaxWithLoss``).

    With ``S = cutoffs[0]`` and tail cluster ``i`` holding the outputs
    ``cutoffs[i] <= o < cutoffs[i + 1]``:

    ```
    head = log_softmax(x @ head_W + head_b)
    log p(o | x) = head[o]                                          (o < S)
    log p(o | x) = head[S + i] + log_softmax(x @ tail_proj[i] @ tail_out[i])[o - cutoffs[i]]
    ```

    Without ``target`` every output is computed: ``(batch, n_outputs)``, as
    PyTorch's ``log_prob``.  With ``target`` only the target's cluster is, and
    only for the examples whose target is in a tail cluster: the examples are
    sorted by cluster and each cluster walks its own examples in fixed-size
    chunks, so the tail costs ``O(d_i * cluster_size_i)`` per example that
    needs it and nothing for the others; ``(batch, cluster_size)`` is never
    built (forward or backward).  Under ``jax.vmap`` the chunks are not skipped
    (a batched ``lax.cond`` runs both branches); call the batched form for speed.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`AdaptiveSoftmaxParams`.
      target: optional ``(batch,)`` or ``(batch, 1)`` integer outputs in
        ``[0, n_outputs)`` (a scalar for a 1-D ``x``).

    Returns:
      ``(batch, n_outputs)`` log-probabilities without ``target``, else the
      ``(batch,)`` log-probability of each target (the batch axis dropped for a
      1-D ``x``).  float64 if any input is float64, else float32 (float16 and
      bfloat16 inputs accumulate in float32).

    Raises:
      TypeError: non-float weights or inputs, non-integer ``target``, ``params``
        not an :class:`AdaptiveSoftmaxParams`.
      ValueError: shapes that do not match each other.
      IndexError: a concrete ``target`` outside ``[0, n_outputs)``.  Under
        ``jit`` an out-of-range target gets ``-inf``, takes no part in the
        gradient, and ``checkify.index_checks`` reports it.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import adaptive_log_softmax, adaptive_softmax_init
      >>> params = adaptive_softmax_init(jax.random.key(0), 16, 100, [10, 40])
      >>> x = jax.random.normal(jax.random.key(1), (3, 16))
      >>> logp = adaptive_log_softmax(x, params)
      >>> logp.shape, jnp.exp(logp).sum(axis=-1).round(5)
      ((3, 100), Array([1., 1., 1.], dtype=float32))
      >>> target = jnp.array([2, 25, 99])
      >>> bool(jnp.allclose(adaptive_log_softmax(x, params, target), logp[jnp.arange(3), target]))
      True
    """
    x, params, batched, acc = prepare(x, params)
    if target is None:
        out = _full_jit(x, params, acc=acc)
    else:
        batch = x.shape[0]
        t = _checked_target(target, batch, params.n_outputs, batched)
        mask = jnp.ones((batch,), jnp.bool_)
        out = _target_jit(
            x, params, t, mask, acc=acc, chunk_rows=_chunk_rows(batch, params), reduction=None
        )
    return out if batched else out[0]


def adaptive_softmax_loss(
    x: ArrayLike,
    params: AdaptiveSoftmaxParams,
    target: ArrayLike,
    *,
    reduction: str = "mean",
    mask: ArrayLike | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of the targets under the adaptive softmax.

    ```
    loss[b] = -log p(target[b] | x[b])          (see adaptive_log_softmax)
    ```

    reduced by ``mean`` over the unmasked examples (0 if there are none),
    ``sum`` or not at all (``none``, masked entries 0).  ``reduction="mean"``
    is PyTorch's ``AdaptiveLogSoftmaxWithLoss(x, target).loss``.  A tail
    cluster is evaluated only for the examples whose target is in it, so the
    gradient costs about as much as the forward pass of the head plus the
    targets' clusters.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`AdaptiveSoftmaxParams`.
      target: ``(batch,)`` or ``(batch, 1)`` integer outputs in ``[0, n_outputs)``
        (a scalar for a 1-D ``x``).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      mask: optional ``(batch,)`` bool (a scalar for a 1-D ``x``), ``False`` for
        padding tokens: their targets are ignored (they may be out of range,
        e.g. ``-1``) and their inputs reach neither the loss nor any gradient
        (a NaN there is harmless).

    Returns:
      A scalar, or ``(batch,)`` for ``reduction="none"``; float32 (float64 if
      any input is float64).  Under ``jit`` an unmasked out-of-range target
      makes its loss ``inf`` (and the mean and sum ``inf``), while the gradient
      stays finite and ignores it; ``checkify.index_checks`` reports it.

    Raises:
      ValueError: an unknown ``reduction``, a ``mask`` of the wrong shape, and
        everything :func:`adaptive_log_softmax` raises.
      TypeError: a ``mask`` that is not bool.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import adaptive_softmax_init, adaptive_softmax_loss
      >>> params = adaptive_softmax_init(jax.random.key(0), 16, 100, [10, 40])
      >>> x = jax.random.normal(jax.random.key(1), (4, 16))
      >>> target = jnp.array([1, 5, 42, -1])             # the last one is padding
      >>> mask = jnp.array([True, True, True, False])
      >>> loss = adaptive_softmax_loss(x, params, target, mask=mask)
      >>> grads = jax.grad(adaptive_softmax_loss, argnums=1)(x, params, target, mask=mask)
      >>> [bool(jnp.any(g != 0)) for g in grads.tail_out]   # only 42's cluster is touched
      [False, True]
    """
    x = _as_array("x", x)
    target, mask = _loss_target_and_mask(target, mask, reduction, batched=x.ndim == 2)
    x, params, batched, acc = prepare(x, params)
    batch = x.shape[0]
    t = _checked_target(target, batch, params.n_outputs, batched)
    out = _target_jit(
        x,
        params,
        t,
        mask.reshape(batch),
        acc=acc,
        chunk_rows=_chunk_rows(batch, params),
        reduction=reduction,
    )
    return out[0] if reduction == "none" and not batched else out


__all__ = ["adaptive_log_softmax", "adaptive_softmax_loss"]
