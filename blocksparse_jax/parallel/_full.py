"""The exact softmax with the outputs split over a mesh axis.

Each model shard runs the logits-free core (:mod:`blocksparse_jax.full._core`)
on its own contiguous range of columns of ``W`` (and entries of ``b``); the
per-example statistics are combined across the shards: the log-sum-exp by a
``pmax`` of the local ones (held constant for the gradient) and a ``psum`` of
the rescaled sums, the target's logit by a ``psum`` of the owning shard's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from blocksparse_jax import _targets
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named
from blocksparse_jax.full import _core
from blocksparse_jax.full._loss import LossOptions, make_plan, per_example_loss
from blocksparse_jax.full._params import (
    FullSoftmaxParams,
    check_option,
    check_params,
    checked_target,
    prepare,
)
from blocksparse_jax.parallel._mesh import check_divisible, check_mesh, place, shard_map, size, vary


def _w_spec(rows: bool, model_axis) -> P:
    """``W``'s outputs over ``model_axis``: its columns, or its rows (``FullSoftmaxRowParams``)."""
    return P(model_axis, None) if rows else P(None, model_axis)


def shard_full_params(params: FullSoftmaxParams, mesh: Mesh, model_axis) -> FullSoftmaxParams:
    """``W``'s outputs placed over ``model_axis`` (see :func:`_w_spec`), ``b`` as ``P(model_axis)``."""
    check_mesh(mesh, None, model_axis)
    params = check_params(params)
    W, b = params
    check_divisible(
        "n_outputs",
        params.n_outputs,
        mesh,
        model_axis,
        "choose a vocabulary size that is a multiple of it (pad the vocabulary with unused "
        "words), or shard over a smaller axis",
    )
    W = jax.device_put(W, NamedSharding(mesh, _w_spec(params.rows, model_axis)))
    if b is not None:
        b = jax.device_put(b, NamedSharding(mesh, P(model_axis)))
    return type(params)(W, b)


def _combine(stats: _core.Stats, mine, model_axis):
    """``(lse, target logit, total)`` over every shard's outputs, from this shard's stats."""
    lse, picked, total = stats.lse, stats.target, stats.total
    if model_axis is None:
        return lse, picked, total
    m = lax.pmax(lax.stop_gradient(lse), model_axis)
    lse = m + jnp.log(lax.psum(jnp.exp(lse - m), model_axis))
    picked = lax.psum(jnp.where(mine, picked, jnp.zeros((), picked.dtype)), model_axis)
    if total is not None:
        total = lax.psum(total, model_axis)
    return lse, picked, total


def _sharded(x, params, target, mask, *, mesh, data_axis, model_axis, plan_options, body):
    """``(body(combined stats, valid) of every example, lead)``, the stats from every shard.

    ``plan_options``: ``(chunk_size, softcap, with_total)``.
    """
    check_mesh(mesh, data_axis, model_axis)
    x, params, lead = prepare(x, params)
    if lead == ():
        raise ValueError(
            f"x must be (batch, n_in) or (..., n_in) for the parallel functions (the batch is "
            f"split over the data axis); got shape {_shape(x.shape[1:])}"
        )
    V = params.n_outputs
    check_divisible(
        "n_outputs",
        V,
        mesh,
        model_axis,
        "choose a vocabulary size that is a multiple of it (pad the vocabulary with unused words)",
    )
    check_divisible(
        "batch", x.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    n_local = V // size(mesh, model_axis)
    chunk_size, softcap, with_total = plan_options
    plan = make_plan(
        x.shape[0] // size(mesh, data_axis),
        n_local,
        chunk_size,
        softcap,
        with_total=with_total,
        rows=params.rows,
    )
    t = checked_target(target, lead, V, mask)
    mask = jnp.ones(t.shape, jnp.bool_) if mask is None else mask.reshape(-1)
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)
    has_bias = params.b is not None

    def shard(x, W, t, mask, *b):
        x, W, *b = vary(axes, x, W, *b)
        b = b[0] if has_bias else None
        t, valid = _targets.normalize_target(t, V)
        keep = valid & mask
        x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
        first = 0 if model_axis is None else lax.axis_index(model_axis) * n_local
        local = t - first
        mine = keep & (local >= 0) & (local < n_local)
        stats = _core.logit_stats(x, W, b, jnp.where(mine, local, 0).astype(jnp.int32), plan)
        return body(_combine(stats, mine, model_axis), valid)

    d, m = data_axis, model_axis
    args = [x, params.W, t, mask] + ([params.b] if has_bias else [])
    specs = [P(d), _w_spec(params.rows, m), P(d), P(d)] + ([P(m)] if has_bias else [])
    return shard_map(mesh, shard, specs, P(d), args), lead


@named
def full_log_softmax(
    x: ArrayLike,
    params: FullSoftmaxParams,
    target: ArrayLike | None = None,
    *,
    mesh: Mesh,
    softcap: float | None = None,
    chunk_size: int | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
) -> jax.Array:
    r""":func:`blocksparse_jax.full_log_softmax` with the outputs split over ``model_axis``.

    ``x`` and ``target`` are split over ``data_axis`` along the batch; the
    columns of ``W`` (and entries of ``b``) over ``model_axis``, each shard
    walking its own columns in chunks without their logits.  The log-sum-exp
    is combined across the model shards (``pmax`` of the local maxima,
    ``psum`` of the rescaled sums) and a target's logit comes from the shard
    that owns its column.  Values and gradients equal the single-device
    function's; ``W``'s gradient stays sharded like ``W``.

    Args:
      x: ``(batch, n_in)`` or ``(..., n_in)`` (the leading dimensions are
        flattened into the batch that is split over ``data_axis``).
      params: :class:`blocksparse_jax.FullSoftmaxParams`, best placed with
        :func:`shard_params`; ``n_outputs`` must be a multiple of the model
        axis size.
      target: ``None``, or integer outputs in ``[0, n_outputs)`` of shape
        ``x.shape[:-1]`` (or that with a trailing 1).
      mesh: the ``jax.sharding.Mesh`` to run on.
      softcap: optional positive float, as on one device.
      chunk_size: optional columns per chunk of a shard, as on one device.
      data_axis: mesh axis the batch is split over (``None``: not split).
      model_axis: mesh axis the outputs are split over (``None``: not split).

    Returns:
      ``(..., n_outputs)`` log-probabilities (sharded over ``model_axis``), or
      ``(...)`` for a target; float64 if any input is float64, else float32.

    Raises:
      ValueError: an unknown mesh axis, a 1-D ``x``, a ``batch`` or
        ``n_outputs`` not divisible by the size of the axis it is split over;
        and everything the single-device function raises (same messages).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = parallel.shard_params(bsj.full_softmax_init(jax.random.key(0), 8, 100), mesh)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> logp = parallel.full_log_softmax(x, params, mesh=mesh)
      >>> logp.shape, bool(jnp.allclose(jnp.exp(logp).sum(axis=1), 1.0))
      ((4, 100), True)
    """
    if target is not None:
        logp, lead = _sharded(
            x,
            params,
            target,
            None,
            mesh=mesh,
            data_axis=data_axis,
            model_axis=model_axis,
            plan_options=(chunk_size, softcap, False),
            body=lambda s, valid: jnp.where(valid, s[1] - s[0], jnp.full((), -jnp.inf, s[0].dtype)),
        )
        return logp.reshape(lead)
    check_mesh(mesh, data_axis, model_axis)
    x, params, lead = prepare(x, params)
    plan = make_plan(x.shape[0], params.n_outputs, chunk_size, softcap, rows=params.rows)
    check_divisible(
        "n_outputs",
        params.n_outputs,
        mesh,
        model_axis,
        "choose a vocabulary size that is a multiple of it (pad the vocabulary with unused words)",
    )
    check_divisible(
        "batch", x.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)
    has_bias = params.b is not None

    def shard(x, W, *b):
        x, W, *b = vary(axes, x, W, *b)
        b = b[0] if has_bias else None
        dt, acc = _core.dtypes(x, W, b)
        z = _core.outputs_dot(x.astype(dt), W.astype(dt), plan.rows, acc)
        if b is not None:
            z = z + b.astype(acc)[None, :]
        z = _core.cap(z, plan.softcap)
        m = lax.stop_gradient(jnp.max(z, axis=1))
        if model_axis is not None:
            m = lax.pmax(m, model_axis)
        s = jnp.sum(jnp.exp(z - m[:, None]), axis=1)
        if model_axis is not None:
            s = lax.psum(s, model_axis)
        return z - (m + jnp.log(s))[:, None]

    d, m = data_axis, model_axis
    args = [x, params.W] + ([params.b] if has_bias else [])
    specs = [P(d), _w_spec(params.rows, m)] + ([P(m)] if has_bias else [])
    out = shard_map(mesh, shard, specs, P(d, m), args)
    return out.reshape(lead + out.shape[1:])


@named
def full_softmax_loss(
    x: ArrayLike,
    params: FullSoftmaxParams,
    target: ArrayLike,
    *,
    mesh: Mesh,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
) -> jax.Array:
    r""":func:`blocksparse_jax.full_softmax_loss` with the outputs split over ``model_axis``.

    The loss and its options as on one device (the gradient filter excepted),
    each model shard walking its own columns in chunks; the gradients of ``W``
    and ``b`` come back sharded like them and a training step never gathers
    ``W``.

    Returns:
      A scalar, or ``x.shape[:-1]`` for ``reduction="none"``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = bsj.full_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, 7])
      >>> loss = parallel.full_softmax_loss(x, parallel.shard_params(params, mesh), target, mesh=mesh)
      >>> bool(jnp.allclose(loss, bsj.full_softmax_loss(x, params, target)))
      True
    """
    _targets.check_reduction(reduction)
    lead = tuple(jnp.shape(x)[:-1])
    mask = _targets.check_mask(mask, lead)
    options = LossOptions(
        check_option("label_smoothing", label_smoothing, low=0.0, high=1.0),
        check_option("z_loss", z_loss, low=0.0),
    )
    V = check_params(params).n_outputs

    def body(stats, valid):
        lse, picked, total = stats
        return per_example_loss(lse, picked, total, valid, V, options)

    loss, lead = _sharded(
        x,
        params,
        target,
        mask,
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
        plan_options=(chunk_size, softcap, options.label_smoothing > 0),
        body=body,
    )
    mask = place(mesh, mask.reshape(-1), P(data_axis))
    out = _targets.reduce_nll(-loss, mask, reduction)
    return out.reshape(lead) if reduction == "none" else out
