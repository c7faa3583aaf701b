"""Block-sparse ops and the hierarchical softmax over a device mesh (``jax.shard_map``).

The batch is split over ``data_axis`` and the output side of the weights over
``model_axis``:

* ``sparse_block_gemv`` / ``sparse_block_dot`` / ``sparse_block_outer``: ``W``'s
  ``o_blocks`` (axis 1; ``b``'s axis 0) are split into equal contiguous ranges,
  one per model shard.  A shard remaps the global output indices to its own
  range; an index outside the range contributes nothing there (the core ops'
  masking of out-of-range indices does it), and the per-shard partial results
  are summed over ``model_axis`` (``psum``).  Every output block is owned by
  exactly one shard, so the sum is the single-device result.
* ``h_log_softmax`` / ``h_softmax_loss``: the classes (columns of ``W1``,
  entries of ``b1``, ``W2``, ``b2``) are split over ``model_axis``.  The
  class-level log-sum-exp is combined across shards (``pmax`` of the local
  maxima, ``psum`` of the rescaled sums); a target's within-class log-softmax is
  computed on the shard that owns its class and summed in.

Weights are never gathered: the weight gradient comes back sharded like the
weights, and the data-parallel reduction of the weight gradient is a ``psum``
over ``data_axis`` of each shard's own blocks only.

Uneven splits: ``o_blocks`` (and ``batch``) must be divisible by the size of the
mesh axis they are split over; anything else is refused with a ``ValueError``
that says how to fix it (padding ``W`` would change what a negative index points
at).  Uneven class counts are different: :func:`shard_params` pads the classes to
a multiple of the model axis, and the padded classes get ``-inf`` logits (zero
probability).

Works on any ``jax.sharding.Mesh`` - CPU, GPU, TPU, one host or many - with
``Auto`` or ``Explicit`` axis types.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from blocksparse_jax import _blocksparse as _bs
from blocksparse_jax import _checks
from blocksparse_jax import _hsoftmax as _hs
from blocksparse_jax._execute import vary_over
from blocksparse_jax._hsoftmax import HSoftmaxParams

__all__ = [
    "h_log_softmax",
    "h_softmax_loss",
    "shard_params",
    "sparse_block_dot",
    "sparse_block_gemv",
    "sparse_block_outer",
]


# --------------------------------------------------------------------------------------
# Mesh plumbing.
# --------------------------------------------------------------------------------------


def _check_mesh(mesh, data_axis, model_axis) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((2, 4), ('data', 'model'))); "
            f"got {type(mesh).__name__}"
        )
    for kind, axis in (("data_axis", data_axis), ("model_axis", model_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(
                f"{kind}={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}; "
                f"pass {kind}= one of them (or None to not split over it)"
            )
    if data_axis is not None and data_axis == model_axis:
        raise ValueError(f"data_axis and model_axis must differ; both are {data_axis!r}")


def _size(mesh: Mesh, axis) -> int:
    return 1 if axis is None else mesh.shape[axis]


def _check_divisible(what: str, n: int, mesh: Mesh, axis, fix: str) -> None:
    k = _size(mesh, axis)
    if n % k:
        raise ValueError(
            f"{what}={n} is not divisible by the size {k} of mesh axis {axis!r}, over which it "
            f"is split; {fix}"
        )


def _place(mesh: Mesh, x: jax.Array, spec: P) -> jax.Array:
    """On a mesh with ``Explicit`` axes, reshards ``x`` to ``spec`` (``shard_map`` does not)."""
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return x


def _vary(axes: tuple, *xs):
    """Marks each ``x`` as varying over all ``axes`` inside ``shard_map``.

    The core ops are ``custom_vjp`` functions, whose backward pass must return
    cotangents typed like the primal inputs; making every input vary over the
    axes the outputs vary over lets it.  The transpose of this cast is a
    ``psum``: for a weight shard that is the data-parallel reduction of its own
    blocks' gradient, for the activations the sum over the model shards.
    """
    out = tuple(vary_over(x, axes) for x in xs)
    return out[0] if len(out) == 1 else out


def _shard_map(mesh, body, in_specs, out_specs, args):
    """``shard_map(body)(*args)``, jitted.

    The outer ``jit``: an eager ``shard_map`` would compile op by op.  The inner
    one: ``checkify`` instruments a ``shard_map`` whose body is a ``jit`` call
    (with the bare body, JAX 0.10's checkify rule for ``shard_map`` fails).
    """
    args = [_place(mesh, a, s) for a, s in zip(args, in_specs, strict=True)]
    f = jax.shard_map(jax.jit(body), mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs)
    return jax.jit(f)(*args)


def _local_index(idx: jax.Array, n: int, n_local: int, model_axis) -> tuple[jax.Array, jax.Array]:
    """Global block indices -> ``(local index, mine)`` on this model shard.

    ``idx`` may hold negative (from the end) and, under ``jit``, out-of-range
    entries; it is normalised as the core ops do (its probe is what
    ``checkify.index_checks`` reports).  ``mine`` is ``False`` for an index
    another shard owns, or an invalid one; its local index is then 0, a valid
    block, and the caller zeroes that slot's contribution (an out-of-range
    sentinel would make checkify report every other shard's index).
    """
    safe, valid = _checks.normalize_index(idx, n)
    local = safe if model_axis is None else safe - lax.axis_index(model_axis) * n_local
    mine = valid & (local >= 0) & (local < n_local)
    return jnp.where(mine, local, 0), mine


def _validate_op(fn, args, index_checks) -> None:
    """The single-device op's own trace-time checks (same messages), then concrete index values.

    The op is traced on bare shapes and dtypes (no sharding), which runs its
    static checks and nothing else.
    """
    jax.eval_shape(fn, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    for name, idx, n, what in index_checks:
        _checks.check_index_values(name, idx, n, what)


def _require_batched(name: str, x: jax.Array, desc: str) -> None:
    if x.ndim != 3:
        raise ValueError(
            f"{name} must be 3-D {desc} for the parallel ops (the batch axis is split over the "
            f"data axis); got shape {_checks.shape_str(x.shape)}. For one example, add a batch "
            f"axis of 1 and use data_axis=None."
        )


# --------------------------------------------------------------------------------------
# The block-sparse ops.
# --------------------------------------------------------------------------------------


def _gemv_like(single, args: dict, *, mesh, data_axis, model_axis, strategy):
    """Shared body of gemv (adds ``o``) and dot (adds ``b[output_idx]``).

    ``single`` is the single-device op and ``args`` its arguments by name, in
    its order; its own checks run first, with the same messages.
    """
    _check_mesh(mesh, data_axis, model_axis)
    args = {k: _bs._as_array(k, v) for k, v in args.items()}
    W, h, input_idx, output_idx = (args[k] for k in ("W", "h", "input_idx", "output_idx"))
    o, bias = args.get("o"), args.get("b")
    _validate_op(
        functools.partial(single, strategy=strategy),
        tuple(args.values()),
        (
            ("input_idx", input_idx, W.shape[0], "i_blocks"),
            ("output_idx", output_idx, W.shape[1], "o_blocks"),
        ),
    )
    _require_batched("h", h, "(batch, i_win, i_size)")
    _, o_blocks, _, o_size = W.shape
    _check_divisible(
        "o_blocks (W.shape[1])",
        o_blocks,
        mesh,
        model_axis,
        "choose o_blocks as a multiple of it (unused blocks are never selected), "
        "or split over fewer devices",
    )
    _check_divisible(
        "batch", h.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    ob_local = o_blocks // _size(mesh, model_axis)
    acc = _checks.accumulation_dtype(W.dtype, h.dtype, (o if bias is None else bias).dtype)
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)

    def body(W, h, ii, oi, *bias):
        loc, mine = _local_index(oi, o_blocks, ob_local, model_axis)
        W, h = _vary(axes, W, h)
        if bias:
            (b,) = bias
            part = _bs.sparse_block_dot(
                W, h, ii, _vary(axes, b.astype(acc)), loc, strategy=strategy
            )
        else:
            zeros = _vary(axes, jnp.zeros((*loc.shape, o_size), acc))
            part = _bs.sparse_block_gemv(zeros, W, h, ii, loc, strategy=strategy)
        # Slots this shard does not own contribute nothing (and get a zero cotangent).
        part = jnp.where(mine[..., None], part, jnp.zeros((), part.dtype))
        return part if model_axis is None else lax.psum(part, model_axis)

    d, m = data_axis, model_axis
    operands = [W, h, input_idx, output_idx]
    specs = [P(None, m), P(d), P(d), P(d)]
    if bias is not None:
        operands.append(bias)
        specs.append(P(m))
    part = _shard_map(mesh, body, specs, P(d), operands)
    if bias is not None:
        return part.astype(bias.dtype)
    o = _place(mesh, o, P(d))
    return (o.astype(acc) + part).astype(o.dtype)


def sparse_block_gemv(
    o: ArrayLike,
    W: ArrayLike,
    h: ArrayLike,
    input_idx: ArrayLike,
    output_idx: ArrayLike,
    *,
    mesh: Mesh,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    strategy: str = "auto",
) -> jax.Array:
    r""":func:`blocksparse_jax.sparse_block_gemv` with the batch and ``W``'s output blocks sharded.

    ::

        out[b, j] = o[b, j] + sum_i h[b, i] @ W[input_idx[b, i], output_idx[b, j]]

    ``o``, ``h`` and the index arrays are split over ``data_axis`` along the
    batch; ``W`` is split over ``model_axis`` along ``o_blocks`` (axis 1), each
    model shard owning ``o_blocks / n_model`` contiguous blocks.  Each shard
    computes the products of its own output blocks; the partial results are
    summed over ``model_axis``.  Values and gradients equal the single-device
    op; the gradient of ``W`` is sharded like ``W`` (a ``psum`` over
    ``data_axis`` of each shard's own blocks, never a gather).

    Args:
      o: ``(batch, o_win, o_size)``.
      W: ``(i_blocks, o_blocks, i_size, o_size)``; best placed beforehand with
        ``jax.device_put(W, NamedSharding(mesh, P(None, model_axis)))``.
      h: ``(batch, i_win, i_size)``.
      input_idx: ``(batch, i_win)`` integer indices into ``W``'s first axis.
      output_idx: ``(batch, o_win)`` integer indices into ``W``'s second axis.
      mesh: the ``jax.sharding.Mesh`` to run on.
      data_axis: mesh axis the batch is split over (``None``: not split).
      model_axis: mesh axis ``o_blocks`` is split over (``None``: not split).
      strategy: the single-device op's execution strategy, applied to each
        shard's local problem (``"auto"`` decides from the per-shard shapes).

    Returns:
      ``(batch, o_win, o_size)`` in ``o``'s dtype, sharded over ``data_axis``.

    Raises:
      TypeError, ValueError, IndexError: as the single-device op (same messages),
        and ``ValueError`` for an unknown mesh axis, per-example (2-D) inputs,
        or an ``o_blocks`` / ``batch`` not divisible by its mesh axis size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> W = jnp.ones((2, 4, 3, 2)); h = jnp.ones((2, 1, 3)); o = jnp.zeros((2, 1, 2))
      >>> parallel.sparse_block_gemv(o, W, h, jnp.array([[0], [1]]), jnp.array([[3], [0]]),
      ...                            mesh=mesh)[:, 0]
      Array([[3., 3.],
             [3., 3.]], dtype=float32)
    """
    return _gemv_like(
        _bs.sparse_block_gemv,
        dict(o=o, W=W, h=h, input_idx=input_idx, output_idx=output_idx),
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
        strategy=strategy,
    )


def sparse_block_dot(
    W: ArrayLike,
    h: ArrayLike,
    input_idx: ArrayLike,
    b: ArrayLike,
    output_idx: ArrayLike,
    *,
    mesh: Mesh,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    strategy: str = "auto",
) -> jax.Array:
    r""":func:`blocksparse_jax.sparse_block_dot` with the batch and the output blocks sharded.

    ::

        out[b_, j] = b[output_idx[b_, j]] + sum_i h[b_, i] @ W[input_idx[b_, i], output_idx[b_, j]]

    As :func:`sparse_block_gemv`; the bias ``b`` ``(o_blocks, o_size)`` is split
    over ``model_axis`` like ``W``'s second axis, and each output slot's bias is
    added once, by the shard that owns its block.

    Returns:
      ``(batch, o_win, o_size)`` in ``b``'s dtype, sharded over ``data_axis``.
    """
    return _gemv_like(
        _bs.sparse_block_dot,
        dict(W=W, h=h, input_idx=input_idx, b=b, output_idx=output_idx),
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
        strategy=strategy,
    )


def sparse_block_outer(
    o: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    x_idx: ArrayLike,
    y_idx: ArrayLike,
    alpha: ArrayLike = 1.0,
    *,
    mesh: Mesh,
    data_axis: str | None = "data",
    model_axis: str | None = "model",
    strategy: str = "auto",
) -> jax.Array:
    r""":func:`blocksparse_jax.sparse_block_outer` with ``o``'s ``y_blocks`` and the batch sharded.

    ::

        out[x_idx[b, i], y_idx[b, j]] += alpha * outer(x[b, i], y[b, j])

    ``o`` ``(x_blocks, y_blocks, x_size, y_size)`` is split over ``model_axis``
    along ``y_blocks`` (its axis 1, the ``o_blocks`` of the ``W`` it updates);
    ``x``, ``y`` and the index arrays over ``data_axis`` along the batch.  Each
    model shard applies the updates of its own blocks; the updates of the data
    shards are summed (``psum`` over ``data_axis`` of the shard's blocks only).
    With ``o = W`` and ``alpha = -learning_rate`` this is a sharded sparse SGD
    step.

    Returns:
      ``(x_blocks, y_blocks, x_size, y_size)`` in ``o``'s dtype, sharded like ``o``.
    """
    _check_mesh(mesh, data_axis, model_axis)
    names = ("o", "x", "y", "x_idx", "y_idx", "alpha")
    o, x, y, x_idx, y_idx, alpha = (
        _bs._as_array(n, a) for n, a in zip(names, (o, x, y, x_idx, y_idx, alpha), strict=True)
    )
    _validate_op(
        functools.partial(_bs.sparse_block_outer, strategy=strategy),
        (o, x, y, x_idx, y_idx, alpha),
        (("x_idx", x_idx, o.shape[0], "x_blocks"), ("y_idx", y_idx, o.shape[1], "y_blocks")),
    )
    _require_batched("x", x, "(batch, x_win, x_size)")
    y_blocks = o.shape[1]
    _check_divisible(
        "y_blocks (o.shape[1])",
        y_blocks,
        mesh,
        model_axis,
        "choose y_blocks as a multiple of it, or split over fewer devices",
    )
    _check_divisible(
        "batch", x.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    yb_local = y_blocks // _size(mesh, model_axis)
    acc = _checks.accumulation_dtype(o.dtype, x.dtype, y.dtype)
    if not jnp.issubdtype(alpha.dtype, jnp.floating):
        alpha = alpha.astype(acc)
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)

    def body(o, x, y, xi, yi, alpha):
        loc, mine = _local_index(yi, y_blocks, yb_local, model_axis)
        y = jnp.where(mine[..., None], y, jnp.zeros((), y.dtype))  # others' slots: no update
        zeros = jnp.zeros(o.shape, acc)
        zeros, x, y, alpha = _vary(axes, zeros, x, y, alpha)
        upd = _bs.sparse_block_outer(zeros, x, y, xi, loc, alpha, strategy=strategy)
        if data_axis is not None:
            upd = lax.psum(upd, data_axis)
        return (o.astype(acc) + upd).astype(o.dtype)

    d, m = data_axis, model_axis
    return _shard_map(
        mesh,
        body,
        [P(None, m), P(d), P(d), P(d), P(d), P()],
        P(None, m),
        [o, x, y, x_idx, y_idx, alpha],
    )


# --------------------------------------------------------------------------------------
# The hierarchical softmax.
# --------------------------------------------------------------------------------------


def _global_lse(logits: jax.Array, model_axis) -> jax.Array:
    """``logsumexp`` over the classes of every model shard, ``(batch,)``.

    The maximum only keeps ``exp`` in range; it is held constant for the
    gradient (which does not depend on it), so ``pmax`` needs no derivative.
    """
    m = lax.stop_gradient(jnp.max(logits, axis=1))
    if model_axis is not None:
        m = lax.pmax(m, model_axis)
    s = jnp.sum(jnp.exp(logits - m[:, None]), axis=1)
    if model_axis is not None:
        s = lax.psum(s, model_axis)
    return m + jnp.log(s)


def _pad_class_sizes(class_sizes, n_classes: int, mesh: Mesh, model_axis):
    """``class_sizes`` of the unpadded classes gets zeros for the classes :func:`shard_params` added."""
    if class_sizes is None:
        return None
    class_sizes = _bs._as_array("class_sizes", class_sizes)
    n = class_sizes.shape[0] if class_sizes.ndim == 1 else n_classes
    if n < n_classes and -(-n // _size(mesh, model_axis)) * _size(mesh, model_axis) == n_classes:
        class_sizes = jnp.pad(class_sizes, (0, n_classes - n))
    return class_sizes


def _hs_log_probs(x, params, target, *, n_outputs, class_sizes, mesh, data_axis, model_axis):
    """Log-probabilities ``(batch, n_outputs)`` (``target is None``) or ``(batch,)``."""
    _check_mesh(mesh, data_axis, model_axis)
    if not isinstance(params, tuple) or len(params) != 4:
        _hs._check_params(params)  # raises its TypeError
    n_classes = _bs._as_array("W1", params[0]).shape[-1]
    class_sizes = _pad_class_sizes(class_sizes, n_classes, mesh, model_axis)
    prob = _hs._prepare(x, params, n_outputs, class_sizes)
    if not prob.batched:
        raise ValueError(
            f"x must be 2-D (batch, n_in) for the parallel functions (the batch is split over the "
            f"data axis); got shape {_checks.shape_str(prob.x.shape[1:])}"
        )
    batch, per_class, n_outputs = prob.x.shape[0], prob.per_class, prob.n_outputs
    _check_divisible(
        "n_classes",
        n_classes,
        mesh,
        model_axis,
        "place the parameters with parallel.shard_params(params, mesh), which pads the classes",
    )
    _check_divisible(
        "batch", batch, mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    c_local = n_classes // _size(mesh, model_axis)
    acc, sizes = prob.acc, prob.class_sizes
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)
    d, m = data_axis, model_axis

    def first_class():
        return 0 if model_axis is None else lax.axis_index(model_axis) * c_local

    def class_logits(x, W1, b1, class_valid):
        logits = _hs._class_logits(x, W1, b1, acc)
        return jnp.where(class_valid[None, :], logits, _neg_inf(acc))

    def full_body(x, W1, b1, W2, b2, class_valid, sizes):
        logits = class_logits(x, W1, b1, class_valid)
        class_logp = logits - _global_lse(logits, model_axis)[:, None]
        act = _hs._all_activations(x, W2, b2, acc)  # (batch, c_local, per_class)
        classes = first_class() + jnp.arange(c_local, dtype=jnp.int32)
        slot_ok = _hs._slot_valid(classes, per_class, n_outputs, sizes)[None]
        slot_logp = _hs._masked_log_softmax(act, slot_ok)
        logp = _hs._neg_inf_where_invalid(class_logp[:, :, None] + slot_logp, slot_ok)
        return logp.reshape(x.shape[0], c_local * per_class)

    def target_body(x, W1, b1, W2, b2, class_valid, sizes, t):
        t, valid = _hs._normalize_target(t, n_outputs)
        logits = class_logits(x, W1, b1, class_valid)
        lse = _global_lse(logits, model_axis)
        classes, slots = t // per_class, t % per_class
        local = classes - first_class()
        mine = (local >= 0) & (local < c_local)
        # For a class another shard owns, class 0 stands in; ``part`` below drops it, so
        # this shard's W2 gets a zero gradient from it.
        local = jnp.where(mine, local, 0)
        xv, W2v, b2v = _vary(axes, x, W2, b2)
        act = _hs._target_activations(xv, W2v, b2v, local, acc)
        slot_ok = _hs._slot_valid(classes, per_class, n_outputs, sizes)
        slot_logp = jnp.take_along_axis(
            _hs._masked_log_softmax(act, slot_ok), slots[:, None], axis=1
        )[:, 0]
        class_logit = jnp.take_along_axis(logits, local[:, None], axis=1)
        part = jnp.where(mine, class_logit[:, 0] + slot_logp, jnp.zeros((), acc))
        if model_axis is not None:
            part = lax.psum(part, model_axis)
        valid &= jnp.take_along_axis(slot_ok, slots[:, None], axis=1)[:, 0]
        return _hs._neg_inf_where_invalid(part - lse, valid)

    if sizes is None:  # a placeholder keeps one signature; every slot then counts as full
        sizes = jnp.full((n_classes,), per_class, jnp.int32)
    args = [prob.x, prob.W1, prob.b1, prob.W2, prob.b2, prob.class_valid, sizes]
    specs = [P(d), P(None, m), P(m), P(m), P(m), P(m), P()]
    if target is None:
        out = _shard_map(mesh, full_body, specs, P(d, m), args)
        if out.shape[1] == n_outputs:
            return out
        # Dropping the padded slots makes the columns uneven: gather them first (this
        # moves log-probabilities, never weights).
        return _place(mesh, out, P(d))[:, :n_outputs]
    t = _hs._check_target(target, batch, n_outputs, batched=True)
    # Concrete targets: out-of-range and padded-slot ones raise IndexError (no-ops when traced).
    _hs._check_target_values(t, n_outputs)
    _hs._check_padding_target(t, prob.class_sizes, per_class)
    return _shard_map(mesh, target_body, [*specs, P(d)], P(d), [*args, t])


def _neg_inf(dtype) -> jax.Array:
    return jnp.full((), -jnp.inf, dtype)


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
      As the single-device function (same messages), and ``ValueError`` for an
      unknown mesh axis, a 1-D ``x``, a ``batch`` not divisible by the data axis
      size, or an ``n_classes`` not divisible by the model axis size (use
      :func:`shard_params`).
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
    x = _bs._as_array("x", x)
    target, mask = _hs._loss_target_and_mask(target, mask, reduction, batched=True)
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
    return _hs._reduce_nll(logp, _place(mesh, mask, P(data_axis)), reduction)


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
    """
    _check_mesh(mesh, None, model_axis)
    W1, b1, W2, b2 = _hs._check_params(params)
    pad = -W1.shape[1] % _size(mesh, model_axis)
    if pad:
        W1 = jnp.pad(W1, ((0, 0), (0, pad)))
        b1, W2, b2 = (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (b1, W2, b2))
    m = model_axis
    placed = (
        jax.device_put(a, NamedSharding(mesh, s))
        for a, s in zip((W1, b1, W2, b2), (P(None, m), P(m), P(m), P(m)), strict=True)
    )
    return type(params)(*placed)
