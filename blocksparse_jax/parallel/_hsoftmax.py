"""The hierarchical softmax with the classes split over a mesh axis.

Each shard evaluates :class:`~blocksparse_jax.hsoftmax._problem.Problem` on its
own classes with ``model_axis`` set; the problem's formulas combine the shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named
from blocksparse_jax.hsoftmax import HSoftmaxParams
from blocksparse_jax.hsoftmax import _problem as _p
from blocksparse_jax.hsoftmax._params import check_params
from blocksparse_jax.parallel._mesh import check_divisible, check_mesh, place, shard_map, size, vary


def _pad_class_sizes(class_sizes, n_classes: int, mesh: Mesh, model_axis):
    """``class_sizes`` of the unpadded classes gets zeros for the classes :func:`shard_params` added."""
    if class_sizes is None:
        return None
    class_sizes = _as_array("class_sizes", class_sizes)
    n = class_sizes.shape[0] if class_sizes.ndim == 1 else n_classes
    if n < n_classes and -(-n // size(mesh, model_axis)) * size(mesh, model_axis) == n_classes:
        class_sizes = jnp.pad(class_sizes, (0, n_classes - n))
    return class_sizes


def _hs_log_probs(x, params, target, *, n_outputs, class_sizes, mesh, data_axis, model_axis):
    """Log-probabilities ``(batch, n_outputs)`` (``target is None``) or ``(batch,)``."""
    check_mesh(mesh, data_axis, model_axis)
    if not isinstance(params, tuple) or len(params) != 4:
        check_params(params)  # raises its TypeError
    n_classes = _as_array("W1", params[0]).shape[-1]
    class_sizes = _pad_class_sizes(class_sizes, n_classes, mesh, model_axis)
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    if not prob.batched:
        raise ValueError(
            f"x must be 2-D (batch, n_in) for the parallel functions (the batch is split over the "
            f"data axis); got shape {_shape(prob.x.shape[1:])}"
        )
    check_divisible(
        "n_classes",
        n_classes,
        mesh,
        model_axis,
        "place the parameters with parallel.shard_params(params, mesh), which pads the classes",
    )
    check_divisible(
        "batch", prob.x.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)
    sizes = prob.class_sizes
    if sizes is None:  # a placeholder keeps one signature; every slot then counts as full
        sizes = jnp.full((n_classes,), prob.per_class, jnp.int32)

    def shard(x, W1, b1, W2, b2, class_valid, sizes):
        # Every input varies over every axis: the core ops are custom VJPs whose
        # cotangents must be typed like their inputs, and the transpose of the
        # cast is the psum that reduces each shard's gradient.
        x, W1, b1, W2, b2 = vary(axes, x, W1, b1, W2, b2)
        return prob._replace(
            x=x, W1=W1, b1=b1, W2=W2, b2=b2, class_valid=class_valid,
            class_sizes=None if prob.class_sizes is None else sizes, model_axis=model_axis,
        )  # fmt: skip

    d, m = data_axis, model_axis
    args = [prob.x, prob.W1, prob.b1, prob.W2, prob.b2, prob.class_valid, sizes]
    specs = [P(d), P(None, m), P(m), P(m), P(m), P(m), P()]
    if target is None:
        out = shard_map(mesh, lambda *a: shard(*a).full_log_probs(), specs, P(d, m), args)
        if out.shape[1] == n_outputs:
            return out
        # Dropping the padded slots makes the columns uneven: gather them first (this
        # moves log-probabilities, never weights).
        return place(mesh, out, P(d))[:, :n_outputs]
    t = _p.checked_target(prob, target)  # concrete out-of-range or padded targets raise
    body = lambda *a: shard(*a[:-1]).target_log_probs(a[-1])
    return shard_map(mesh, body, [*specs, P(d)], P(d), [*args, t])


@named
def h_log_softmax(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike | None = None,
    *,
    n_outputs: int,
    mesh: Mesh,
    class_sizes: ArrayLike | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
) -> jax.Array:
    r""":func:`blocksparse_jax.h_log_softmax` with the classes split over ``model_axis``.

    ``x`` and ``target`` are split over ``data_axis`` along the batch; the
    classes of ``params`` (columns of ``W1``, entries of ``b1``, ``W2``, ``b2``)
    over ``model_axis``.  The class-level log-sum-exp is combined across the
    model shards (``pmax`` of the local maxima, ``psum`` of the rescaled sums);
    a target's second-level log-softmax is computed by the shard that owns its
    class - the only shard whose ``W2`` gets a gradient from it - and summed in.
    Values and gradients equal the single-device function's.

    Args:
      x: ``(batch, n_in)``.
      params: :class:`blocksparse_jax.HSoftmaxParams`, best placed with
        :func:`shard_params` (which pads ``n_classes`` to a multiple of the
        model axis size; padded classes get ``-inf`` logits, zero probability).
      target: ``None``, or ``(batch,)`` / ``(batch, 1)`` integer outputs in
        ``[0, n_outputs)``.
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``.
      mesh: the ``jax.sharding.Mesh`` to run on.
      class_sizes: optional ``(n_classes,)`` class sizes, as in the
        single-device function (the unpadded count is fine: the classes
        :func:`shard_params` added get size 0).
      data_axis: mesh axis the batch is split over (``None``: not split).
      model_axis: mesh axis the classes are split over (``None``: not split).

    Returns:
      ``(batch, n_outputs)`` log-probabilities, or ``(batch,)`` for a target;
      float64 if any input is float64, else float32.

    Raises:
      ValueError: an unknown mesh axis, a 1-D ``x``, a ``batch`` not divisible
        by the data axis size, or an ``n_classes`` not divisible by the model
        axis size (use :func:`shard_params`); and everything the single-device
        function raises (same messages).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = bsj.h_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> logp = parallel.h_log_softmax(x, parallel.shard_params(params, mesh), n_outputs=100,
      ...                               mesh=mesh)
      >>> logp.shape, bool(jnp.allclose(jnp.exp(logp).sum(axis=1), 1.0))
      ((4, 100), True)
    """
    return _hs_log_probs(
        x,
        params,
        target,
        n_outputs=n_outputs,
        class_sizes=class_sizes,
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
    )


@named
def h_softmax_loss(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike,
    *,
    n_outputs: int,
    mesh: Mesh,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    class_sizes: ArrayLike | None = None,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
) -> jax.Array:
    r""":func:`blocksparse_jax.h_softmax_loss` with the classes split over ``model_axis``.

    ``loss[b] = -log p(target[b] | x[b])`` (see :func:`h_log_softmax`),
    reduced by ``"mean"`` over the unmasked examples (0 if there are none),
    ``"sum"``, or not at all (``"none"``, masked entries 0).  A ``mask`` entry
    ``False`` marks a padding token whose target is ignored (it may be ``-1``).
    The gradients of ``W1``, ``b1``, ``W2`` and ``b2`` come back sharded like the
    parameters, and a training step never gathers ``W1`` or ``W2``.

    Returns:
      A scalar, or ``(batch,)`` (sharded over ``data_axis``) for ``reduction="none"``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = bsj.h_softmax_init(jax.random.key(0), 8, 100)
      >>> sharded = parallel.shard_params(params, mesh)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, 7])
      >>> loss = parallel.h_softmax_loss(x, sharded, target, n_outputs=100, mesh=mesh)
      >>> bool(jnp.allclose(loss, bsj.h_softmax_loss(x, params, target, n_outputs=100)))
      True
    """
    x = _as_array("x", x)
    target, mask = _p.loss_target_and_mask(target, mask, reduction, batched=True)
    logp = _hs_log_probs(
        x,
        params,
        target,
        n_outputs=n_outputs,
        class_sizes=class_sizes,
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
    )
    return _p.reduce_nll(logp, place(mesh, mask, P(data_axis)), reduction)


def shard_params(params: HSoftmaxParams, mesh: Mesh, model_axis: str = "model") -> HSoftmaxParams:
    """Places :class:`blocksparse_jax.HSoftmaxParams` on ``mesh``, the classes over ``model_axis``.

    ``W1`` goes to ``P(None, model_axis)``; ``b1``, ``W2`` and ``b2`` to
    ``P(model_axis)``.  An ``n_classes`` that the model axis size does not
    divide is padded with zero classes up to the next multiple (not refused).
    The parallel functions give every class past ``ceil(n_outputs /
    n_outputs_per_class)`` a ``-inf`` logit, so a padded class has probability 0
    and gets a zero gradient; values and gradients of the real classes are
    those of the unpadded parameters.  To get the single-device parameters
    back, slice the first ``n_classes`` classes:
    ``HSoftmaxParams(W1[:, :n], b1[:n], W2[:n], b2[:n])``.

    Args:
      params: ``HSoftmaxParams(W1, b1, W2, b2)``.
      mesh: the ``jax.sharding.Mesh``.
      model_axis: the mesh axis the classes are split over.

    Returns:
      ``HSoftmaxParams`` with ``n_classes`` rounded up to a multiple of the model
      axis size, sharded as above.

    Examples:
      >>> import jax
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> params = bsj.h_softmax_init(jax.random.key(0), 8, 100)
      >>> sharded = parallel.shard_params(params, mesh)
      >>> from jax.sharding import PartitionSpec as P
      >>> [a.shape for a in sharded], sharded.W2.sharding.spec == P("model")
      ([(8, 10), (10,), (10, 8, 10), (10, 10)], True)
    """
    check_mesh(mesh, None, model_axis)
    W1, b1, W2, b2 = check_params(params)
    pad = -W1.shape[1] % size(mesh, model_axis)
    if pad:
        W1 = jnp.pad(W1, ((0, 0), (0, pad)))
        b1, W2, b2 = (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (b1, W2, b2))
    m = model_axis
    placed = (
        jax.device_put(a, NamedSharding(mesh, s))
        for a, s in zip((W1, b1, W2, b2), (P(None, m), P(m), P(m), P(m)), strict=True)
    )
    return type(params)(*placed)
