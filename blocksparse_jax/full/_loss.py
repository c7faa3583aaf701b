"""``full_log_softmax`` and ``full_softmax_loss``: the exact softmax without its logits."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax import _targets
from blocksparse_jax._scope import named
from blocksparse_jax.full import _core
from blocksparse_jax.full._params import (
    FullSoftmaxParams,
    check_chunk_size,
    check_option,
    checked_target,
    prepare,
)
from blocksparse_jax.full._sparse import FilteredChunksRule


class LossOptions(NamedTuple):
    """The loss's static options (see :func:`full_softmax_loss`)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0


def check_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    return check_option("softcap", softcap, low=0.0, open_low=True)


def make_plan(
    batch: int,
    n_outputs: int,
    chunk_size,
    softcap,
    *,
    with_total=False,
    filter_eps=None,
    rows: bool = False,
):
    """The core's :class:`~blocksparse_jax.full._core.Plan` for validated options."""
    chunk = _core.chunk_size(batch, n_outputs, check_chunk_size(chunk_size))
    return _core.Plan(n_outputs, chunk, check_softcap(softcap), with_total, filter_eps, rows)


class Used(NamedTuple):
    """What the core was called with, the examples that take no part taken out, and its stats."""

    x: jax.Array  # (batch, n_in), zeros where not used
    target: jax.Array  # (batch,) int32, 0 where not used
    valid: jax.Array  # (batch,) bool: the target is in range
    stats: _core.Stats


def _used_stats(x, W, b, target, mask, plan: _core.Plan) -> Used:
    """The core's statistics; masked examples and out-of-range targets are taken out first.

    Such an example's row of ``x`` becomes zeros and its target 0 (selection,
    not arithmetic), so whatever it held (NaN included) reaches no output and
    no gradient.
    """
    t, valid = _targets.normalize_target(target, plan.n_outputs)
    keep = valid & mask
    x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
    t = jnp.where(keep, t, jnp.zeros((), t.dtype))
    return Used(x, t, valid, _core.logit_stats(x, W, b, t, plan))


@functools.partial(jax.jit, static_argnames=("plan",))
def _used_stats_jit(x, W, b, target, mask, *, plan):
    with jax.named_scope("full_softmax_loss"):
        return _used_stats(x, W, b, target, mask, plan)


def per_example_loss(lse, picked, total, valid, n_outputs: int, options: LossOptions):
    """``(batch,)`` losses: ``lse - (1 - eps) z_t - eps mean(z) + z_loss lse**2`` (``inf`` if invalid)."""
    eps = options.label_smoothing
    loss = lse - picked if eps == 0 else lse - (1 - eps) * picked - (eps / n_outputs) * total
    if options.z_loss:
        loss = loss + options.z_loss * lse * lse
    return jnp.where(valid, loss, jnp.full((), jnp.inf, loss.dtype))


@functools.partial(jax.jit, static_argnames=("n_outputs", "options", "reduction"))
def _reduce_jit(lse, picked, total, valid, mask, *, n_outputs, options, reduction):
    with jax.named_scope("full_softmax_loss"):
        loss = per_example_loss(lse, picked, total, valid, n_outputs, options)
        return _targets.reduce_nll(-loss, mask, reduction)


@functools.partial(jax.jit, static_argnames=("plan", "options", "reduction"))
def _loss_jit(x, W, b, target, mask, *, plan, options, reduction):
    with jax.named_scope("full_softmax_loss"):
        used = _used_stats(x, W, b, target, mask, plan)
        s = used.stats
        loss = per_example_loss(s.lse, s.target, s.total, used.valid, plan.n_outputs, options)
        return _targets.reduce_nll(-loss, mask, reduction)


@functools.partial(jax.jit, static_argnames=("plan",))
def _target_log_probs_jit(x, W, b, target, *, plan):
    with jax.named_scope("full_log_softmax"):
        mask = jnp.ones(target.shape, jnp.bool_)
        used = _used_stats(x, W, b, target, mask, plan)
        logp = used.stats.target - used.stats.lse
        return jnp.where(used.valid, logp, jnp.full((), -jnp.inf, logp.dtype))


@functools.partial(jax.jit, static_argnames=("softcap", "rows"))
def _all_log_probs_jit(x, W, b, *, softcap, rows):
    with jax.named_scope("full_log_softmax"):
        dt, acc = _core.dtypes(x, W, b)
        z = _core.outputs_dot(x.astype(dt), W.astype(dt), rows, acc)
        if b is not None:
            z = z + b.astype(acc)[None, :]
        return jax.nn.log_softmax(_core.cap(z, softcap), axis=-1)


@named
def full_log_softmax(
    x: ArrayLike,
    params: FullSoftmaxParams,
    target: ArrayLike | None = None,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Log-probabilities of the exact softmax over every output.

    ```
    z = x @ W + b                      (softcap * tanh(z / softcap) with softcap)
    log p(o | x) = z[o] - logsumexp(z)
    ```

    With ``target`` the ``(batch, n_outputs)`` logits are never built: the
    outputs are walked in chunks of ``chunk_size`` columns with a running
    log-sum-exp, forward and backward (the backward pass recomputes each
    chunk's logits), so memory is ``O(batch * chunk_size)`` beside the
    parameters.  Without ``target`` every log-probability is returned, which is
    ``(batch, n_outputs)`` by itself.

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`FullSoftmaxParams` or :class:`FullSoftmaxRowParams`.
      target: optional integer outputs in ``[0, n_outputs)`` of shape
        ``x.shape[:-1]`` (or that with a trailing 1).
      softcap: optional positive float: logits are soft-capped to
        ``softcap * tanh(z / softcap)`` (Gemma 2's final logit soft-capping).
      chunk_size: optional columns per chunk (default: about ``2**20 / batch``,
        at least 256 and at most 4,096; a divisor of ``n_outputs`` when one
        is at least a quarter of that).

    Returns:
      ``(..., n_outputs)`` log-probabilities without ``target``, else the
      ``(...)`` log-probability of each target.  float64 if any input is
      float64, else float32 (float16 and bfloat16 inputs accumulate in float32).

    Raises:
      TypeError: non-float weights or inputs, a non-integer ``target``,
        ``params`` not a :class:`FullSoftmaxParams`, a traced ``softcap``.
      ValueError: shapes that do not match each other, a ``softcap`` or
        ``chunk_size`` that is not positive.
      IndexError: a concrete ``target`` outside ``[0, n_outputs)``.  Under
        ``jit`` an out-of-range target gets ``-inf`` and no gradient, and
        ``checkify.index_checks`` reports it.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import full_log_softmax, full_softmax_init
      >>> params = full_softmax_init(jax.random.key(0), 16, 1000)
      >>> x = jax.random.normal(jax.random.key(1), (3, 16))
      >>> logp = full_log_softmax(x, params)
      >>> logp.shape, jnp.exp(logp).sum(axis=-1).round(5)
      ((3, 1000), Array([1., 1., 1.], dtype=float32))
      >>> target = jnp.array([2, 500, 999])
      >>> bool(jnp.allclose(full_log_softmax(x, params, target), logp[jnp.arange(3), target]))
      True
    """
    x, params, lead = prepare(x, params)
    plan = make_plan(x.shape[0], params.n_outputs, chunk_size, softcap, rows=params.rows)
    if target is None:
        out = _all_log_probs_jit(x, params.W, params.b, softcap=plan.softcap, rows=plan.rows)
        return out.reshape(lead + out.shape[1:])
    t = checked_target(target, lead, params.n_outputs)
    return _target_log_probs_jit(x, params.W, params.b, t, plan=plan).reshape(lead)


@named
def full_softmax_loss(
    x: ArrayLike,
    params: FullSoftmaxParams,
    target: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    filter_eps: float | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Cross-entropy of the targets under the exact softmax, without the logits in memory.

    With ``z = x @ W + b`` (soft-capped with ``softcap``), ``lse =
    logsumexp(z)`` and ``eps = label_smoothing``:

    ```
    loss[b] = lse - (1 - eps) * z[target] - eps * mean(z) + z_loss * lse**2
    ```

    (with ``eps = 0`` and ``z_loss = 0``, ``-log p(target | x)``), reduced by
    ``mean`` over the unmasked examples (0 if there are none), ``sum`` or not
    at all (``none``, masked entries 0; weight the examples by multiplying
    it: the gradient follows any cotangent).

    No ``(batch, n_outputs)`` array exists in the forward or the backward
    pass: a custom VJP walks the outputs in chunks of ``chunk_size`` columns,
    the forward pass with a running log-sum-exp, the backward pass recomputing
    each chunk's logits and writing that chunk's columns of ``W``'s gradient.
    float16 and bfloat16 products run in that dtype and accumulate in float32.

    ``filter_eps`` (Cut Cross-Entropy's gradient filter, with a bound) skips,
    in the backward pass, the chunks of least probability for as long as, for
    every example, the probability they hold together stays at most
    ``filter_eps``: the loss is exact, each example's gradient leaves out
    softmax terms that sum to at most ``filter_eps`` times its cotangent, and
    the backward pass costs only the kept chunks (it is then first-order
    only: the filtered backward pass is not differentiated again).  It pays
    when the whole batch's probability lives in few chunks (a confident model,
    outputs sorted by frequency); the guide (docs/heads.md) has measurements.
    Under :func:`~blocksparse_jax.value_and_sparse_grad`, ``W``'s gradient is
    then the kept chunks and the targets' columns only, and
    :func:`~blocksparse_jax.optim.lazy` updates those alone.

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`FullSoftmaxParams` or :class:`FullSoftmaxRowParams`.
      target: integer outputs in ``[0, n_outputs)``, shaped ``x.shape[:-1]``
        (or that with a trailing 1).
      mask: optional bool of shape ``x.shape[:-1]``, ``False`` for padding
        tokens: their targets are not checked (they may be ``-1``) and their
        ``x`` (even NaN) reaches neither the loss nor any gradient.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      label_smoothing: ``eps`` in ``[0, 1)``: the target distribution is
        ``(1 - eps) * onehot + eps / n_outputs`` (PyTorch's ``label_smoothing``).
      z_loss: weight ``>= 0`` of the ``lse**2`` penalty (PaLM's z-loss, which
        keeps the log-partition function near 0).
      softcap: optional positive float, as in :func:`full_log_softmax`.
      filter_eps: optional probability in ``(0, 1)`` that the gradient filter
        may leave out of each example; ``None`` (default) gives the exact
        gradient.  Not with ``label_smoothing`` (which gives every output a
        gradient).
      chunk_size: optional columns per chunk, as in :func:`full_log_softmax`.

    Returns:
      A scalar, or ``x.shape[:-1]`` for ``reduction="none"``; float32 (float64
      if any input is float64).  Under ``jit`` an unmasked out-of-range target
      makes its loss ``inf`` and takes no part in the gradient;
      ``checkify.index_checks`` reports it.

    Raises:
      ValueError: an unknown ``reduction``, a ``mask`` of the wrong shape, an
        option out of range, ``filter_eps`` with ``label_smoothing``, and
        everything :func:`full_log_softmax` raises.
      TypeError: a non-bool ``mask``, an option that is not a Python number.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import full_log_softmax, full_softmax_init, full_softmax_loss
      >>> params = full_softmax_init(jax.random.key(0), 16, 1000)
      >>> x = jax.random.normal(jax.random.key(1), (4, 16))
      >>> target = jnp.array([1, 42, 999, -1])             # the last one is padding
      >>> mask = jnp.array([True, True, True, False])
      >>> loss = full_softmax_loss(x, params, target, mask=mask)
      >>> bool(jnp.allclose(loss, -full_log_softmax(x[:3], params, target[:3]).mean()))
      True
      >>> grads = jax.grad(full_softmax_loss, argnums=1)(x, params, target, mask=mask)
      >>> grads.W.shape, grads.b.shape
      ((16, 1000), (1000,))
    """
    _targets.check_reduction(reduction)
    x, params, lead, t, flat_mask, options, plan = _checked(
        x, params, target, mask, label_smoothing, z_loss, softcap, filter_eps, chunk_size
    )
    if plan.filter_eps is None:
        loss = _loss_jit(
            x, params.W, params.b, t, flat_mask, plan=plan, options=options, reduction=reduction
        )
    else:
        lse, picked, valid = _marked_pair(x, params, t, flat_mask, plan)
        loss = _reduce_jit(
            lse,
            picked,
            None,
            valid,
            flat_mask,
            n_outputs=plan.n_outputs,
            options=options,
            reduction=reduction,
        )
    return loss.reshape(lead) if reduction == "none" else loss


def _checked(x, params, target, mask, label_smoothing, z_loss, softcap, filter_eps, chunk_size):
    """:func:`full_softmax_loss`'s arguments checked: ``(x, params, lead, target, flat mask, options, plan)``."""
    x, params, lead = prepare(x, params)
    mask = _targets.check_mask(mask, lead)
    t = checked_target(target, lead, params.n_outputs, mask)
    options = LossOptions(
        check_option("label_smoothing", label_smoothing, low=0.0, high=1.0),
        check_option("z_loss", z_loss, low=0.0),
    )
    if filter_eps is not None:
        filter_eps = check_option("filter_eps", filter_eps, low=0.0, high=1.0, open_low=True)
        if options.label_smoothing:
            raise ValueError(
                f"filter_eps={filter_eps} cannot be used with label_smoothing="
                f"{options.label_smoothing}: label smoothing gives every output a gradient of "
                "at least label_smoothing / n_outputs, which the filter would drop. Leave one out."
            )
    plan = make_plan(
        x.shape[0],
        params.n_outputs,
        chunk_size,
        softcap,
        with_total=options.label_smoothing > 0,
        filter_eps=filter_eps,
        rows=params.rows,
    )
    return x, params, lead, t, mask.reshape(-1), options, plan


def _marked_pair(x, params, t, flat_mask, plan):
    """``(lse, target logit, valid)`` of the filtered loss, ``W``'s use marked for the sparse rule."""
    # W's use is marked for value_and_sparse_grad: the rule turns the cotangent of each
    # example's (lse, target logit) into the kept chunks' blocks (full/_sparse.py).
    w = sites.mark_weight(params.W)
    used = _used_stats_jit(x, w, params.b, t, flat_mask, plan=plan)
    s = used.stats
    bias = () if params.b is None else (params.b,)
    pair = sites.mark_use(
        jnp.stack([s.lse, s.target], axis=1),
        w,
        (used.x, w, *bias, used.target, s.lse, s.chunk_lse),
        FilteredChunksRule(plan, has_bias=params.b is not None),
    )
    return pair[:, 0], pair[:, 1], used.valid


@functools.partial(jax.jit, static_argnames=("n_outputs", "options"))
def _losses_and_log_probs_jit(lse, picked, total, valid, *, n_outputs, options):
    with jax.named_scope("full_softmax_loss"):
        loss = per_example_loss(lse, picked, total, valid, n_outputs, options)
        logp = jnp.where(valid, picked - lse, jnp.full((), -jnp.inf, lse.dtype))
        return loss, logp


def losses_and_log_probs(
    x: ArrayLike,
    params: FullSoftmaxParams,
    target: ArrayLike,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    filter_eps: float | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(losses, log_probs)``, both ``x.shape[:-1]``, from one pass over the outputs.

    ``losses`` is :func:`full_softmax_loss` with ``reduction="none"`` (its
    options included, the gradient filter's sparse rule too), ``log_probs``
    :func:`full_log_softmax` at ``target``; the layers' ``(output, loss)``.
    """
    x, params, lead, t, flat_mask, options, plan = _checked(
        x, params, target, None, label_smoothing, z_loss, softcap, filter_eps, chunk_size
    )
    if plan.filter_eps is None:
        used = _used_stats_jit(x, params.W, params.b, t, flat_mask, plan=plan)
        lse, picked, total, valid = used.stats.lse, used.stats.target, used.stats.total, used.valid
    else:
        (lse, picked, valid), total = _marked_pair(x, params, t, flat_mask, plan), None
    loss, logp = _losses_and_log_probs_jit(
        lse, picked, total, valid, n_outputs=plan.n_outputs, options=options
    )
    return loss.reshape(lead), logp.reshape(lead)
