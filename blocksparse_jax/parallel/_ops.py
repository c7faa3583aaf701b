"""The block-sparse ops with the batch and ``W``'s output blocks sharded."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

import blocksparse_jax.blocksparse as _bs
from blocksparse_jax import _checks
from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._scope import named
from blocksparse_jax.blocksparse._ops import (
    BiasRule,
    GemvWeightRule,
    bias_masked,
    gemv_masked,
    outer_masked,
)
from blocksparse_jax.parallel._mesh import (
    check_divisible,
    check_mesh,
    local_index,
    place,
    require_batched,
    shard_map,
    size,
    validate_op,
    vary,
)


def _gemv_like(single, args: dict, *, mesh, data_axis, model_axis, strategy):
    """Shared body of gemv (adds ``o``) and dot (adds ``b[output_idx]``).

    ``single`` is the single-device op and ``args`` its arguments by name, in
    its order; its own checks run first, with the same messages.
    """
    check_mesh(mesh, data_axis, model_axis)
    args = {
        k: (_checks.as_index_array if k.endswith("_idx") else _as_array)(k, v)
        for k, v in args.items()
    }
    W, h, input_idx, output_idx = (args[k] for k in ("W", "h", "input_idx", "output_idx"))
    o, bias = args.get("o"), args.get("b")
    validate_op(
        functools.partial(single, strategy=strategy),
        tuple(args.values()),
        (
            ("input_idx", input_idx, W.shape[0], "i_blocks"),
            ("output_idx", output_idx, W.shape[1], "o_blocks"),
        ),
    )
    require_batched("h", h, "(batch, i_win, i_size)")
    _, o_blocks, _, o_size = W.shape
    check_divisible(
        "o_blocks (W.shape[1])",
        o_blocks,
        mesh,
        model_axis,
        "choose o_blocks as a multiple of it (unused blocks are never selected), "
        "or split over fewer devices",
    )
    check_divisible(
        "batch", h.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    i_blocks = W.shape[0]
    ob_local = o_blocks // size(mesh, model_axis)
    acc = _checks.accumulation_dtype(W.dtype, h.dtype, (o if bias is None else bias).dtype)
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)

    def body(W, h, ii, vi, oi, vo, *bias):
        loc, mine = local_index(oi, vo, ob_local, model_axis)
        W, h = vary(axes, W, h)
        if bias:
            (b,) = bias
            b = vary(axes, b.astype(acc))
            start = bias_masked(b, loc, mine)
        else:
            start = vary(axes, jnp.zeros((*loc.shape, o_size), acc))
        # Slots this shard does not own are masked: they add nothing, never read
        # their parked block, and get a zero cotangent (selection, not arithmetic).
        part = gemv_masked(start, W, h, ii, vi, loc, mine, strategy)
        return part if model_axis is None else lax.psum(part, model_axis)

    d, m = data_axis, model_axis
    # The single-device sparse rules, on the global indices (value_and_sparse_grad):
    # the weights' gradients are the touched blocks, scattered into W's shards in place.
    # The indices are normalised once, outside shard_map (an index check inside it and
    # another outside is more than checkify can combine).
    ii, vi = _checks.normalize_index(input_idx, i_blocks)
    oi, vo = _checks.normalize_index(output_idx, o_blocks)
    w = sites.mark_weight(W)
    operands = [w, h, ii, vi, oi, vo]
    specs = [P(None, m), P(d), P(d), P(d), P(d), P(d)]
    if bias is not None:
        bw = sites.mark_weight(bias)
        operands.append(bw)
        specs.append(P(m))
    part = shard_map(mesh, body, specs, P(d), operands)
    part = sites.mark_use(part, w, (h, ii, vi, oi, vo), GemvWeightRule(o_blocks))
    if bias is not None:
        part = sites.mark_use(part, bw, (oi, vo), BiasRule())
        return part.astype(bias.dtype)
    o = place(mesh, o, P(d))
    return (o.astype(acc) + part).astype(o.dtype)


@named
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

    ```
    out[b, j] = o[b, j] + sum_i h[b, i] @ W[input_idx[b, i], output_idx[b, j]]
    ```

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


@named
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

    ```
    out[b_, j] = b[output_idx[b_, j]] + sum_i h[b_, i] @ W[input_idx[b_, i], output_idx[b_, j]]
    ```

    As :func:`sparse_block_gemv`; the bias ``b`` ``(o_blocks, o_size)`` is split
    over ``model_axis`` like ``W``'s second axis, and each output slot's bias is
    added once, by the shard that owns its block.

    Returns:
      ``(batch, o_win, o_size)`` in ``b``'s dtype, sharded over ``data_axis``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> W = jnp.ones((2, 4, 3, 2)); b = jnp.arange(8.0).reshape(4, 2); h = jnp.ones((2, 1, 3))
      >>> ii, oi = jnp.array([[0], [1]]), jnp.array([[3], [0]])
      >>> out = parallel.sparse_block_dot(W, h, ii, b, oi, mesh=mesh)
      >>> out[:, 0]
      Array([[ 9., 10.],
             [ 3.,  4.]], dtype=float32)
      >>> bool(jnp.array_equal(out, bsj.sparse_block_dot(W, h, ii, b, oi)))
      True
    """
    return _gemv_like(
        _bs.sparse_block_dot,
        dict(W=W, h=h, input_idx=input_idx, b=b, output_idx=output_idx),
        mesh=mesh,
        data_axis=data_axis,
        model_axis=model_axis,
        strategy=strategy,
    )


@named
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

    ```
    out[x_idx[b, i], y_idx[b, j]] += alpha * outer(x[b, i], y[b, j])
    ```

    ``o`` ``(x_blocks, y_blocks, x_size, y_size)`` is split over ``model_axis``
    along ``y_blocks`` (its axis 1, the ``o_blocks`` of the ``W`` it updates);
    ``x``, ``y`` and the index arrays over ``data_axis`` along the batch.  Each
    model shard applies the updates of its own blocks; the updates of the data
    shards are summed (``psum`` over ``data_axis`` of the shard's blocks only).
    With ``o = W`` and ``alpha = -learning_rate`` this is a sharded sparse SGD
    step.

    Returns:
      ``(x_blocks, y_blocks, x_size, y_size)`` in ``o``'s dtype, sharded like ``o``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import blocksparse_jax as bsj
      >>> from blocksparse_jax import parallel
      >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
      >>> W = jnp.ones((2, 4, 3, 2)); x = jnp.ones((2, 1, 3)); y = jnp.ones((2, 1, 2))
      >>> xi, yi = jnp.array([[0], [1]]), jnp.array([[3], [3]])
      >>> W_new = parallel.sparse_block_outer(W, x, y, xi, yi, -0.5, mesh=mesh)
      >>> float(W_new[0, 3, 0, 0]), float(W_new[1, 3, 0, 0]), float(W_new[0, 0, 0, 0])
      (0.5, 0.5, 1.0)
      >>> bool(jnp.array_equal(W_new, bsj.sparse_block_outer(W, x, y, xi, yi, -0.5)))
      True
    """
    check_mesh(mesh, data_axis, model_axis)
    names = ("o", "x", "y", "x_idx", "y_idx", "alpha")
    o, x, y, x_idx, y_idx, alpha = (
        (_checks.as_index_array if n.endswith("_idx") else _as_array)(n, a)
        for n, a in zip(names, (o, x, y, x_idx, y_idx, alpha), strict=True)
    )
    validate_op(
        functools.partial(_bs.sparse_block_outer, strategy=strategy),
        (o, x, y, x_idx, y_idx, alpha),
        (("x_idx", x_idx, o.shape[0], "x_blocks"), ("y_idx", y_idx, o.shape[1], "y_blocks")),
    )
    require_batched("x", x, "(batch, x_win, x_size)")
    y_blocks = o.shape[1]
    check_divisible(
        "y_blocks (o.shape[1])",
        y_blocks,
        mesh,
        model_axis,
        "choose y_blocks as a multiple of it, or split over fewer devices",
    )
    check_divisible(
        "batch", x.shape[0], mesh, data_axis, "choose a batch size that is a multiple of it"
    )
    yb_local = y_blocks // size(mesh, model_axis)
    acc = _checks.accumulation_dtype(o.dtype, x.dtype, y.dtype)
    if not jnp.issubdtype(alpha.dtype, jnp.floating):
        alpha = alpha.astype(acc)
    axes = tuple(a for a in (data_axis, model_axis) if a is not None)

    x_blocks = o.shape[0]

    def body(o, x, y, xi, yi, alpha):
        xi, vx = _checks.normalize_index(xi, x_blocks)
        loc, mine = local_index(*_checks.normalize_index(yi, y_blocks), yb_local, model_axis)
        zeros = jnp.zeros(o.shape, acc)
        zeros, x, y, alpha = vary(axes, zeros, x, y, alpha)
        # Others' slots are masked: no update, whatever their values.
        upd = outer_masked(zeros, x, y, xi, vx, loc, mine, alpha, strategy)
        if data_axis is not None:
            upd = lax.psum(upd, data_axis)
        return (o.astype(acc) + upd).astype(o.dtype)

    d, m = data_axis, model_axis
    return shard_map(
        mesh,
        body,
        [P(None, m), P(d), P(d), P(d), P(d), P()],
        P(None, m),
        [o, x, y, x_idx, y_idx, alpha],
    )
