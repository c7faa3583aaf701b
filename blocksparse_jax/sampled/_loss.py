"""``sampled_softmax_loss``: TensorFlow's sampled softmax, and the sparse rules of its weights.

With ``S`` sampled classes ``ids`` and the expected counts ``Q`` of
:func:`~blocksparse_jax.sample_candidates` (TensorFlow's ``sampled_values``):

```
true[b]       = x[b] . W[:, t[b]] + b[t[b]] - log Q_true[b]
sampled[b, s] = x[b] . W[:, ids[s]] + b[ids[s]] - log Q_sampled[s]
                (- FLT_MAX where ids[s] == t[b]: an accidental hit)
loss[b]       = logsumexp([true[b], sampled[b, :]]) - true[b]
```

The ``(batch, 1 + S)`` logits read ``batch + S`` columns of ``W`` (and entries
of ``b``) only.  Both weights mark that use (:mod:`blocksparse_jax._sparse_sites`):
under :func:`~blocksparse_jax.value_and_sparse_grad` their gradients hold
those columns alone, each the product of the logits' cotangent and ``x``
(:class:`SampledColumnsRule`, :class:`SampledBiasRule`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax import _checks, _targets
from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named
from blocksparse_jax.full._core import output_weights, outputs_dot
from blocksparse_jax.full._params import FullSoftmaxParams, checked_target, prepare
from blocksparse_jax.sampled._samplers import (
    SampledValues,
    check_n_sampled,
    check_sampler,
    sample_candidates,
)

# TensorFlow adds -FLT_MAX (float32's largest finite magnitude) to an accidental hit's logit.
_FLT_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class SampledColumnsRule(sites.SparseRule):
    """``W``'s gradient: one column per example's target and one per sampled class.

    ``W (n_in, n_outputs)`` is viewed as itself, blocks along axis 1 (a block
    is a column); ``W (n_outputs, n_in)`` (``rows``,
    :class:`~blocksparse_jax.FullSoftmaxRowParams`) along axis 0 (a block is a
    row).  ``pairs(cotangent, x, true_blocks, sampled_blocks)``:
    ``cotangent`` is that of the ``(batch, 1 + S)`` logits; a target's pair
    is ``cotangent[b, 0] * x[b]``, a sampled class's ``cotangent[:, 1 + s] @ x``.
    Examples that take no part and sampled ids outside ``[0, n_outputs)``
    come as block ``n_outputs`` (no contribution).
    """

    rows: bool = False

    def layout(self, weight_shape: tuple[int, ...]) -> sites.BlockLayout:
        shape = tuple(int(d) for d in weight_shape)
        return sites.BlockLayout(shape, shape, axis=0 if self.rows else 1)

    def pairs(self, cotangent, x, true_blocks, sampled_blocks) -> sites.BlockPairs:
        x = x.astype(cotangent.dtype)
        true_right = cotangent[:, :1] * x
        sampled_right = jnp.dot(cotangent[:, 1:].T, x)
        return sites.BlockPairs(
            jnp.concatenate([true_blocks, sampled_blocks]),
            None,
            jnp.concatenate([true_right, sampled_right], axis=0),
        )


@dataclasses.dataclass(frozen=True)
class SampledBiasRule(sites.SparseRule):
    """``b``'s gradient: one entry per example's target and one per sampled class."""

    def layout(self, weight_shape: tuple[int, ...]) -> sites.BlockLayout:
        return sites.BlockLayout.leading(weight_shape, 0)

    def pairs(self, cotangent, true_blocks, sampled_blocks) -> sites.BlockPairs:
        right = jnp.concatenate([cotangent[:, 0], jnp.sum(cotangent[:, 1:], axis=0)])
        return sites.BlockPairs(
            jnp.concatenate([true_blocks, sampled_blocks]), None, right[:, None]
        )


class Selected(NamedTuple):
    """The examples and sampled classes that take part, ready for the gathers and the rules."""

    x: jax.Array  # (batch, n_in), zeros where an example takes no part
    target: jax.Array  # (batch,) int32, 0 where it takes no part
    ids: jax.Array  # (S,) int32, 0 where out of range
    true_blocks: jax.Array  # (batch,) target, or n_outputs where the example takes no part
    sampled_blocks: jax.Array  # (S,) ids, or n_outputs where out of range
    sampled_ok: jax.Array  # (S,) bool: the sampled id is in range
    valid: jax.Array  # (batch,) bool: the target is in range


@functools.partial(jax.jit, static_argnames=("n_outputs",))
def _select_jit(x, target, mask, ids, *, n_outputs):
    with jax.named_scope("sampled_softmax_loss"):
        t, valid = _targets.normalize_target(target, n_outputs)
        keep = valid & mask
        x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
        t = jnp.where(keep, t, jnp.zeros((), t.dtype))
        ok = (ids >= 0) & (ids < n_outputs)
        safe = jnp.where(ok, ids, 0).astype(jnp.int32)
        none = jnp.int32(n_outputs)
        return Selected(x, t, safe, jnp.where(keep, t, none), jnp.where(ok, safe, none), ok, valid)


@functools.partial(jax.jit, static_argnames=("rows",))
def _logits_jit(x, W, b, target, ids, *, rows):
    """``(batch, 1 + S)`` raw logits of each example's target and of the sampled classes."""
    with jax.named_scope("sampled_softmax_loss"):
        dt = _checks.common_float_dtype(x.dtype, W.dtype)
        acc = _checks.accumulation_dtype(x.dtype, W.dtype, *([] if b is None else [b.dtype]))
        x = x.astype(dt)
        Wt = output_weights(W, target, rows).astype(dt)
        true = jnp.einsum("nd,nd->n", x, Wt, preferred_element_type=acc)
        sampled = outputs_dot(x, output_weights(W, ids, rows).astype(dt), True, acc)
        if b is not None:
            true = true + b[target].astype(acc)
            sampled = sampled + b[ids].astype(acc)[None, :]
        return jnp.concatenate([true[:, None], sampled], axis=1)


@functools.partial(jax.jit, static_argnames=("remove_accidental_hits", "reduction"))
def _loss_jit(logits, sel, true_count, sampled_count, mask, *, remove_accidental_hits, reduction):
    with jax.named_scope("sampled_softmax_loss"):
        acc = logits.dtype
        true = logits[:, 0] - jnp.log(true_count.astype(acc))
        sampled = logits[:, 1:]
        if remove_accidental_hits:
            hit = sel.ids[None, :] == sel.target[:, None]
            sampled = sampled + jnp.where(hit, jnp.asarray(-_FLT_MAX, acc), jnp.zeros((), acc))
        sampled = sampled - jnp.log(sampled_count.astype(acc))[None, :]
        # Sampled ids outside [0, n_outputs) take no part.
        sampled = jnp.where(sel.sampled_ok[None, :], sampled, jnp.full((), -jnp.inf, acc))
        out = jnp.concatenate([true[:, None], sampled], axis=1)
        logp = true - jax.nn.logsumexp(out, axis=1)
        logp = jnp.where(sel.valid, logp, jnp.full((), -jnp.inf, acc))
        return _targets.reduce_nll(logp, mask, reduction)


def _check_sampled(sampled, lead: tuple[int, ...], n_sampled) -> SampledValues:
    if not isinstance(sampled, tuple) or len(sampled) != 3:
        raise TypeError(
            "sampled must be a SampledValues(ids, true_expected_count, sampled_expected_count) "
            f"(or a 3-tuple in that order, as TensorFlow's sampled_values); got "
            f"{type(sampled).__name__}. Make one with sample_candidates."
        )
    ids, true_count, sampled_count = (
        _as_array(n, a)
        for n, a in zip(
            ("sampled.ids", "sampled.true_expected_count", "sampled.sampled_expected_count"),
            sampled,
            strict=True,
        )
    )
    _checks.check_int("sampled.ids", ids)
    _checks.check_ndim("sampled.ids", ids, 1, "(n_sampled,)")
    S = ids.shape[0]
    if n_sampled is not None and _checks.static_int("n_sampled", n_sampled) != S:
        raise ValueError(
            f"n_sampled={n_sampled} does not match sampled.ids of shape {_shape(ids.shape)}; "
            "leave n_sampled out when passing sampled"
        )
    for name, a in (("true_expected_count", true_count), ("sampled_expected_count", sampled_count)):
        _checks.check_float(f"sampled.{name}", a)
    if true_count.shape not in (lead, lead + (1,)):
        raise ValueError(
            f"sampled.true_expected_count must have shape x.shape[:-1] = {_shape(lead)} (or that "
            f"with a trailing 1, as TensorFlow's (batch, num_true)); got shape "
            f"{_shape(true_count.shape)}"
        )
    if sampled_count.shape != (S,):
        raise ValueError(
            f"sampled.sampled_expected_count must have shape (n_sampled,) = {_shape((S,))} "
            f"(sampled.ids.shape); got shape {_shape(sampled_count.shape)}"
        )
    return SampledValues(ids, true_count.reshape(-1), sampled_count)


@named
def sampled_softmax_loss(
    key: jax.Array | None,
    x: ArrayLike,
    params: FullSoftmaxParams,
    target: ArrayLike,
    *,
    n_sampled: int | None = None,
    sampler: str | ArrayLike = "log_uniform",
    remove_accidental_hits: bool = True,
    sampled: SampledValues | None = None,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""TensorFlow's sampled softmax loss: the target against ``n_sampled`` sampled classes.

    ``n_sampled`` distinct classes are drawn (:func:`sample_candidates`) and
    shared by the batch; with their expected counts ``Q``:

    ```
    true[b]       = x[b] . W[:, t[b]] + b[t[b]] - log Q_true[b]
    sampled[b, s] = x[b] . W[:, ids[s]] + b[ids[s]] - log Q_sampled[s]
    loss[b]       = logsumexp([true[b], sampled[b, :]]) - true[b]
    ```

    (``W[t[b]]`` and ``W[ids[s]]`` with :class:`~blocksparse_jax.FullSoftmaxRowParams`,
    the layout to train this loss with: each class's weights are then one
    contiguous row, which the lazy update reads and writes fastest),
    with an accidental hit (``ids[s] == t[b]``) given ``-FLT_MAX`` when
    ``remove_accidental_hits``: ``tf.nn.sampled_softmax_loss`` with one true
    class per example, value for value and gradient for gradient on the same
    ``sampled`` values.  A step reads ``batch + n_sampled`` columns of ``W``
    instead of ``n_outputs``; under :func:`~blocksparse_jax.value_and_sparse_grad`
    the gradients of ``W`` and ``b`` hold those columns alone, and
    :func:`~blocksparse_jax.optim.lazy` updates only them.  It estimates the
    full softmax's loss with a bias: train with it, evaluate with
    :func:`full_log_softmax` on the same parameters.

    Args:
      key: a PRNG key for the sampler, or ``None`` with ``sampled``.
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`FullSoftmaxParams` or :class:`FullSoftmaxRowParams`.
      target: integer classes in ``[0, n_outputs)`` of shape ``x.shape[:-1]``
        (or that with a trailing 1).
      n_sampled: number of distinct sampled classes (not needed with ``sampled``).
      sampler: ``"log_uniform"`` (default), ``"uniform"``, or unigram counts,
        as in :func:`sample_candidates`.
      remove_accidental_hits: give a sampled class that is the example's own
        target the logit ``-FLT_MAX`` (TensorFlow's default).
      sampled: optional :class:`SampledValues` (TensorFlow's ``sampled_values``:
        ``(ids, true_expected_count, sampled_expected_count)``) instead of
        drawing; ids outside ``[0, n_outputs)`` take no part.
      mask: optional bool of shape ``x.shape[:-1]``, ``False`` for padding
        tokens: their targets are not checked and their ``x`` reaches no
        gradient.
      reduction: ``"mean"`` (over the unmasked examples), ``"sum"`` or
        ``"none"`` (TensorFlow's per-example losses; masked entries 0).

    Returns:
      A scalar, or ``x.shape[:-1]`` for ``reduction="none"``; float32 (float64
      if any input is float64).

    Raises:
      ValueError: an unknown ``reduction`` or ``sampler``, ``n_sampled``
        missing or out of range, ``sampled`` of the wrong shapes, and bad
        shapes of ``x``, ``params``, ``target`` or ``mask``.
      TypeError: ``sampled`` not a 3-tuple, non-integer ids or targets,
        non-float counts, no ``key`` without ``sampled``.
      IndexError: a concrete unmasked ``target`` outside ``[0, n_outputs)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import full_softmax_init, sampled_softmax_loss
      >>> params = full_softmax_init(jax.random.key(0), 16, 10_000)
      >>> x = jax.random.normal(jax.random.key(1), (4, 16))
      >>> target = jnp.array([1, 42, 9_999, 7])
      >>> loss = sampled_softmax_loss(jax.random.key(2), x, params, target, n_sampled=64)
      >>> grads = jax.grad(sampled_softmax_loss, argnums=2)(
      ...     jax.random.key(2), x, params, target, n_sampled=64)
      >>> int(jnp.sum(jnp.any(grads.W != 0, axis=0))) <= 4 + 64   # the columns read
      True
    """
    _targets.check_reduction(reduction)
    x, params, lead = prepare(x, params)
    V = params.n_outputs
    mask = _targets.check_mask(mask, lead)
    t = checked_target(target, lead, V, mask)
    if not isinstance(remove_accidental_hits, (bool, np.bool_)):
        raise TypeError(
            f"remove_accidental_hits must be a bool; got {type(remove_accidental_hits).__name__}"
        )
    if sampled is None:
        if n_sampled is None:
            raise ValueError("n_sampled is required (the number of classes to sample)")
        if key is None:
            raise TypeError("key must be a PRNG key to draw the sampled classes; got None")
        kind, counts = check_sampler(sampler, V)
        check_n_sampled(n_sampled, V, counts)
        sampled = sample_candidates(key, t, n_outputs=V, n_sampled=n_sampled, sampler=sampler)
    else:
        sampled = _check_sampled(sampled, lead, n_sampled)
    flat_mask = mask.reshape(-1)
    sel = _select_jit(x, t, flat_mask, sampled.ids, n_outputs=V)
    # Mark the columns read, for value_and_sparse_grad (the rules above).
    w = sites.mark_weight(params.W)
    bw = None if params.b is None else sites.mark_weight(params.b)
    logits = _logits_jit(sel.x, w, bw, sel.target, sel.ids, rows=params.rows)
    logits = sites.mark_use(
        logits, w, (sel.x, sel.true_blocks, sel.sampled_blocks), SampledColumnsRule(params.rows)
    )
    if bw is not None:
        logits = sites.mark_use(
            logits, bw, (sel.true_blocks, sel.sampled_blocks), SampledBiasRule()
        )
    loss = _loss_jit(
        logits,
        sel,
        sampled.true_expected_count,
        sampled.sampled_expected_count,
        flat_mask,
        remove_accidental_hits=bool(remove_accidental_hits),
        reduction=reduction,
    )
    return loss.reshape(lead) if reduction == "none" else loss
