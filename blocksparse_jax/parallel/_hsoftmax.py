"""The hierarchical softmax with the classes split over a mesh axis.

Each shard holds a :class:`~blocksparse_jax.hsoftmax._problem.Problem` of its
own classes; :class:`_Shard` evaluates it and combines the shards: a global
log-sum-exp over the classes, a ``psum`` of the owning shard's term.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax import _targets
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named
from blocksparse_jax.full import FullSoftmaxParams
from blocksparse_jax.hsoftmax import HSoftmaxParams
from blocksparse_jax.hsoftmax import _formulas as _f
from blocksparse_jax.hsoftmax import _problem as _p
from blocksparse_jax.hsoftmax._params import check_params
from blocksparse_jax.parallel._full import shard_full_params
from blocksparse_jax.parallel._mesh import check_divisible, check_mesh, place, shard_map, size, vary


class ShardedHSoftmaxParams(HSoftmaxParams):
    """:class:`~blocksparse_jax.HSoftmaxParams` placed by :func:`shard_params`, padding recorded.

    A pytree like ``HSoftmaxParams`` (``jax.grad``, ``jax.tree.map`` and
    optimizers keep the type and the record) whose ``n_real_classes``
    attribute is the number of classes before :func:`shard_params` padded them
    to a multiple of the model axis.  The parallel functions check
    ``n_outputs`` and ``class_sizes`` against it, exactly as the single-device
    functions check them against the unpadded parameters, and keep the padded
    classes empty.
    """

    n_real_classes: int

    def __new__(cls, W1, b1, W2, b2, *, n_real_classes: int):
        self = super().__new__(cls, W1, b1, W2, b2)
        self.n_real_classes = n_real_classes
        return self

    def _replace(self, **kwargs) -> ShardedHSoftmaxParams:
        return ShardedHSoftmaxParams(
            *HSoftmaxParams(*self)._replace(**kwargs), n_real_classes=self.n_real_classes
        )


def _flatten(params):
    return tuple(params), params.n_real_classes


def _unflatten(n_real_classes, children):
    return ShardedHSoftmaxParams(*children, n_real_classes=n_real_classes)


jax.tree_util.register_pytree_node(ShardedHSoftmaxParams, _flatten, _unflatten)


class _Shard(NamedTuple):
    """One model shard inside ``shard_map``: ``prob`` holds its contiguous range of classes."""

    prob: _p.Problem
    model_axis: str

    def first_class(self):
        """The global id of this shard's first class."""
        return lax.axis_index(self.model_axis) * self.prob.W2.shape[0]

    def class_lse(self, logits) -> jax.Array:
        """``(batch,)`` log-sum-exp of the class logits of every shard.

        The maximum across shards only keeps ``exp`` in range; it is held
        constant for the gradient (which does not depend on it).  With no class
        at all it is 0, so that every log-probability is ``-inf`` rather than NaN.
        """
        m = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=1)), self.model_axis)
        m = jnp.where(jnp.isneginf(m), jnp.zeros((), m.dtype), m)
        s = lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), axis=1), self.model_axis)
        lse = m + jnp.log(s)
        return jnp.where(jnp.isneginf(lse), jnp.zeros((), lse.dtype), lse)

    def full_log_probs(self) -> jax.Array:
        """``(batch, shard classes * n_outputs_per_class)`` log-probabilities of its outputs."""
        logits = self.prob.masked_class_logits()
        class_log_probs = logits - self.class_lse(logits)[:, None]
        return self.prob.output_log_probs(class_log_probs, self.first_class())

    def target_parts(self, t, use) -> tuple[jax.Array, jax.Array]:
        """``(act, first)``: the targets' second-level activations and first-level terms.

        ``t`` and ``use`` come from :meth:`Problem.select_targets` on the global
        batch, and ``prob.x`` is its cut-down ``x``.  ``act`` ``(batch,
        n_outputs_per_class)`` are the activations of each target's class,
        computed by the shard that owns it and summed over the shards; ``first``
        ``(batch,)`` is the log-probability of the target's class (the owner's
        logit, the log-sum-exp of every shard).  For a class another shard owns,
        class 0 stands in and its activations are replaced by zeros (selection),
        so this shard's ``W2`` gets no gradient from it, even where its class 0
        holds a NaN.
        """
        prob = self.prob
        x = prob.x
        local = t // prob.per_class - self.first_class()
        owned = (local >= 0) & (local < prob.W2.shape[0])
        local = jnp.where(owned, local, 0)
        mine = use & owned
        act = _f.target_activations(x, prob.W2, prob.b2, local, prob.acc)
        act = lax.psum(jnp.where(mine[:, None], act, jnp.zeros((), act.dtype)), self.model_axis)
        logits = prob._replace(x=x).masked_class_logits()
        owner = jnp.where(mine, _f.take_rows(logits, local), jnp.zeros((), logits.dtype))
        first = lax.psum(owner, self.model_axis) - self.class_lse(logits)
        return act, first


def _hs_log_probs(
    x,
    params,
    target,
    *,
    n_outputs,
    class_sizes,
    mesh,
    data_axis,
    model_axis,
    mask=None,
    mark=False,
):
    """Log-probabilities ``(..., n_outputs)`` (``target is None``) or ``(...)``.

    With ``mask`` (the loss), masked-out examples are taken out as on one
    device and their targets are not checked.
    """
    check_mesh(mesh, data_axis, model_axis)
    if not isinstance(params, tuple) or len(params) != 4:
        check_params(params)  # raises its TypeError
    n_classes = _as_array("W1", params[0]).shape[-1]
    n_real = getattr(params, "n_real_classes", None)
    prob = _p.prepare(x, params, n_outputs, class_sizes, n_real_classes=n_real)
    if mark:  # the loss reads W2 and b2 only in the targets' classes
        prob = prob._replace(W2=sites.mark_weight(prob.W2), b2=sites.mark_weight(prob.b2))
    n_outputs = prob.n_outputs
    if prob.lead == ():
        raise ValueError(
            f"x must be (batch, n_in) or (..., n_in) for the parallel functions (the batch is "
            f"split over the data axis); got shape {_shape(prob.x.shape[1:])}"
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
        class_sizes = None if prob.class_sizes is None else sizes
        own = dict(x=x, W1=W1, b1=b1, W2=W2, b2=b2, class_valid=class_valid)
        return _Shard(prob._replace(**own, class_sizes=class_sizes), model_axis)

    d, m = data_axis, model_axis
    args = [prob.x, prob.W1, prob.b1, prob.W2, prob.b2, prob.class_valid, sizes]
    specs = [P(d), P(None, m), P(m), P(m), P(m), P(m), P()]
    if target is None:
        out = shard_map(mesh, lambda *a: shard(*a).full_log_probs(), specs, P(d, m), args)
        if out.shape[1] != n_outputs:
            # Dropping the padded slots makes the columns uneven: gather them first (this
            # moves log-probabilities, never weights).
            out = place(mesh, out, P(d))[:, :n_outputs]
        return _p.unflatten(prob, out)
    t = _p.checked_target(prob, target, mask)  # concrete out-of-range or padded targets raise
    flat_mask = None if mask is None else place(mesh, mask.reshape(-1), P(d))
    # The targets are normalised once, on the global batch (an index check inside
    # shard_map and another outside it is more than checkify can combine).
    t, use, x = prob.select_targets(t, flat_mask)
    slots = prob.slot_valid(t // prob.per_class)
    args[0] = x
    body = lambda *a: shard(*a[:-2]).target_parts(a[-2], a[-1])
    act, first = shard_map(mesh, body, [*specs, P(d), P(d)], (P(d), P(d)), [*args, t, use])
    # The second level per example, on the global batch: the sparse rules of W2 and b2
    # are the single-device ones, on global classes (value_and_sparse_grad).
    act = prob.mark_sparse_use(act, x, t // prob.per_class, use)
    second = prob.second_from_activations(act, t, use, slots=slots)
    logp = _f.neg_inf_where_invalid(first + second, use)
    return _p.unflatten(prob, logp)


@named
def h_log_softmax(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike | None = None,
    *,
    n_outputs: int | None = None,
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
      x: ``(batch, n_in)`` or ``(..., n_in)`` (the leading dimensions are
        flattened into the batch that is split over ``data_axis``).
      params: :class:`blocksparse_jax.HSoftmaxParams`, best placed with
        :func:`shard_params`, which pads ``n_classes`` to a multiple of the
        model axis size and returns a :class:`ShardedHSoftmaxParams` recording
        the real class count: ``n_outputs`` and ``class_sizes`` are then checked
        against the unpadded parameters, exactly as on one device, and padded
        classes get ``-inf`` logits (zero probability).
      target: ``None``, or integer outputs in ``[0, n_outputs)`` of shape
        ``x.shape[:-1]`` (or that with a trailing 1).
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``
        of the unpadded parameters, which is the default.
      mesh: the ``jax.sharding.Mesh`` to run on.
      class_sizes: optional ``(n_classes,)`` class sizes of the unpadded
        classes, as in the single-device function (the classes
        :func:`shard_params` added get size 0).
      data_axis: mesh axis the batch is split over (``None``: not split).
      model_axis: mesh axis the classes are split over (``None``: not split).

    Returns:
      ``(..., n_outputs)`` log-probabilities, or ``(...)`` for a target;
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
    n_outputs: int | None = None,
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
    ``False`` marks a padding token whose target is ignored (it may be ``-1``)
    and whose ``x`` reaches no gradient, as on one device.
    The gradients of ``W1``, ``b1``, ``W2`` and ``b2`` come back sharded like the
    parameters, and a training step never gathers ``W1`` or ``W2``.

    Returns:
      A scalar, or ``x.shape[:-1]`` for ``reduction="none"``.

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
    _targets.check_reduction(reduction)
    x = _as_array("x", x)
    mask = _targets.check_mask(mask, tuple(x.shape[:-1]))
    logp = _hs_log_probs(
        x,
        params,
        target,
        n_outputs=n_outputs,
        class_sizes=class_sizes,
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
        mask=mask,
        mark=True,
    )
    return _targets.reduce_nll(logp, mask, reduction)


def shard_params(params: HSoftmaxParams, mesh: Mesh, model_axis: str = "model") -> HSoftmaxParams:
    """Places :class:`blocksparse_jax.HSoftmaxParams` on ``mesh``, the classes over ``model_axis``.

    (A :class:`blocksparse_jax.FullSoftmaxParams` is placed with its outputs
    over ``model_axis``: ``W`` as ``P(None, model_axis)`` (a
    :class:`blocksparse_jax.FullSoftmaxRowParams`'s as ``P(model_axis, None)``),
    ``b`` as ``P(model_axis)``; ``n_outputs`` must be a multiple of the axis size.)

    ``W1`` goes to ``P(None, model_axis)``; ``b1``, ``W2`` and ``b2`` to
    ``P(model_axis)``.  An ``n_classes`` that the model axis size does not
    divide is padded with zero classes up to the next multiple (not refused),
    and the result, a :class:`ShardedHSoftmaxParams`, records the real count
    as ``n_real_classes`` (it survives ``jax.grad``, ``jax.tree.map`` and
    optimizer updates).  The parallel functions keep every padded class empty
    (a ``-inf`` logit: probability 0, a zero gradient) and check ``n_outputs``
    and ``class_sizes`` against the real count, so they refuse what the
    single-device functions refuse.  Values and gradients of the real classes
    are those of the unpadded parameters.  To get the single-device parameters
    back, slice the first ``n = params.n_real_classes`` classes:
    ``HSoftmaxParams(W1[:, :n], b1[:n], W2[:n], b2[:n])``.  Rebuilding a plain
    ``HSoftmaxParams`` from padded arrays loses the record: every class then
    counts as real.

    Args:
      params: ``HSoftmaxParams(W1, b1, W2, b2)``.
      mesh: the ``jax.sharding.Mesh``.
      model_axis: the mesh axis the classes are split over.

    Returns:
      :class:`ShardedHSoftmaxParams` with ``n_classes`` rounded up to a multiple
      of the model axis size, sharded as above.

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
    if isinstance(params, FullSoftmaxParams):
        return shard_full_params(params, mesh, model_axis)
    check_mesh(mesh, None, model_axis)
    W1, b1, W2, b2 = check_params(params)
    n_real = getattr(params, "n_real_classes", W1.shape[1])
    pad = -W1.shape[1] % size(mesh, model_axis)
    if pad:
        W1 = jnp.pad(W1, ((0, 0), (0, pad)))
        b1, W2, b2 = (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (b1, W2, b2))
    m = model_axis
    placed = (
        jax.device_put(a, NamedSharding(mesh, s))
        for a, s in zip((W1, b1, W2, b2), (P(None, m), P(m), P(m), P(m)), strict=True)
    )
    return ShardedHSoftmaxParams(*placed, n_real_classes=n_real)
