"""The public block-sparse ops: validation, masking of out-of-range indices, the core call.

Static checks (ranks, shapes, dtypes) run first and raise naming the argument;
concrete index values are checked eagerly; under ``jit`` an out-of-range index
is masked by selection (see the package docstring).  The products themselves
are the custom-VJP core of ``_core``; :func:`gemv_masked` and
:func:`outer_masked` are its interface for ``parallel`` (normalised indices
with their masks, no checks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _checks
from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._scope import named
from blocksparse_jax.blocksparse._core import _gemv, _outer
from blocksparse_jax.blocksparse._dispatch import check_strategy

_W_DESC = "(i_blocks, o_blocks, i_size, o_size)"


def _check_windowed(
    name: str, x, idx_name: str, idx, *, win: str, size: str, size_value: int, size_source: str
) -> tuple[bool, int]:
    """Checks an activation ``(batch, win, size)`` and its index array ``(batch, win)``.

    Also accepts the per-example form ``(win, size)`` with a 1-D index array.
    Returns ``(batched, batch)``.
    """
    _checks.check_float(name, x)
    _checks.check_int(idx_name, idx)
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 3-D (batch, {win}, {size}) or, for one example, 2-D ({win}, {size}); "
            f"got shape {_checks.shape_str(x.shape)}"
        )
    batched = x.ndim == 3
    desc = f"(batch, {win}, {size})" if batched else f"({win}, {size})"
    _checks.check_dim(name, x, -1, size_value, desc, f"{size}={size_value} ({size_source})")
    idx_desc = f"(batch, {win})" if batched else f"({win},)"
    if idx.ndim != x.ndim - 1 or idx.shape != x.shape[:-1]:
        raise ValueError(
            f"{idx_name} must have shape {idx_desc} = {_checks.shape_str(x.shape[:-1])} to match "
            f"{name} of shape {_checks.shape_str(x.shape)}; got shape {_checks.shape_str(idx.shape)}"
        )
    return batched, (x.shape[0] if batched else 1)


def _check_batch(a_name: str, a_batched: bool, a_shape, b_name: str, b_batched: bool, b_shape):
    if a_batched != b_batched:
        raise ValueError(
            f"{a_name} has shape {_checks.shape_str(a_shape)} and {b_name} has shape "
            f"{_checks.shape_str(b_shape)}: both must be batched (3-D) or both per-example (2-D)"
        )
    if a_batched and a_shape[0] != b_shape[0]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same batch size; got {a_name} of shape "
            f"{_checks.shape_str(a_shape)} and {b_name} of shape {_checks.shape_str(b_shape)}"
        )


def _normalize(name: str, idx, n: int, what: str):
    _checks.check_index_values(name, idx, n, what)
    return _checks.normalize_index(idx, n)


def _batched(*xs):
    return tuple(x[None] for x in xs)


@dataclasses.dataclass(frozen=True)
class GemvWeightRule(sites.SparseRule):
    """``W``'s gradient: ``h[b, i] (outer) g[b, j]`` into block ``(input_idx[b, i], output_idx[b, j])``.

    ``g`` is the cotangent of the output; a pair with a masked slot adds nothing.
    """

    o_blocks: int

    def layout(self, weight_shape):
        return sites.BlockLayout.leading(weight_shape, 2)

    def pairs(self, g, h, ii, vi, oi, vo):
        batch, i_win, i_size = h.shape
        o_win, o_size = g.shape[1:]
        blocks = ii[:, :, None] * self.o_blocks + oi[:, None, :]
        blocks = jnp.where(vi[:, :, None] & vo[:, None, :], blocks, -1)
        shape = (batch, i_win, o_win)
        left = jnp.broadcast_to(h[:, :, None, :], (*shape, i_size)).reshape(-1, i_size)
        right = jnp.broadcast_to(g[:, None, :, :], (*shape, o_size)).reshape(-1, o_size)
        return sites.BlockPairs(blocks.reshape(-1), left, right)


@dataclasses.dataclass(frozen=True)
class BiasRule(sites.SparseRule):
    """``b``'s gradient: ``g[b, j]`` into row ``output_idx[b, j]`` (nothing for a masked slot)."""

    def layout(self, weight_shape):
        return sites.BlockLayout.leading(weight_shape, 1)

    def pairs(self, g, oi, vo):
        rows = jnp.where(vo, oi, -1).reshape(-1)
        return sites.BlockPairs(rows, None, g.reshape(rows.shape[0], -1))


def gemv_masked(o, W, h, ii, vi, oi, vo, strategy: str) -> jax.Array:
    """The batched core gemv on normalised indices: a masked slot (``vi``/``vo`` False) is absent.

    ``out[b, j] = o[b, j]`` for a masked output slot; a masked input slot adds
    nothing; neither ever sees a value of its parked block or its activations.
    """
    return _gemv(o, W, h, ii, oi, vi, vo, False, strategy)


def outer_masked(o, x, y, xi, vx, yi, vy, alpha, strategy: str) -> jax.Array:
    """The batched core outer update on normalised indices: a pair with a masked slot adds nothing."""
    acc = _checks.accumulation_dtype(o.dtype, x.dtype, y.dtype)
    if not jnp.issubdtype(alpha.dtype, jnp.floating):
        alpha = alpha.astype(acc)
    return _outer(o, x, y, xi, yi, vx, vy, alpha, strategy)


def bias_masked(b, oi, vo) -> jax.Array:
    """``b[oi]`` ``(batch, o_win, o_size)``, zero (by selection) in masked slots."""
    if b.shape[0] == 0:  # no blocks: every slot is masked
        return jnp.zeros((*oi.shape, b.shape[1]), b.dtype)
    return jnp.where(vo[..., None], b[oi], jnp.zeros((), b.dtype))


def _prepare_gemv(W, h, input_idx, output_idx):
    """Validates ``W``, ``h`` and the index arrays; returns the normalised problem.

    Returns ``(W, h, ii, vi, oi, vo, batched)`` with ``h``, the indices and their
    masks given a leading batch axis if they had none.
    """
    W = _as_array("W", W)
    h = _as_array("h", h)
    input_idx = _checks.as_index_array("input_idx", input_idx)
    output_idx = _checks.as_index_array("output_idx", output_idx)
    _checks.check_float("W", W)
    _checks.check_ndim("W", W, 4, _W_DESC)
    i_blocks, o_blocks, i_size, _ = W.shape
    batched, _ = _check_windowed(
        "h",
        h,
        "input_idx",
        input_idx,
        win="i_win",
        size="i_size",
        size_value=i_size,
        size_source="W.shape[2]",
    )
    _checks.check_int("output_idx", output_idx)
    if output_idx.ndim != h.ndim - 1 or output_idx.shape[:-1] != h.shape[:-2]:
        want = "(batch, o_win)" if batched else "(o_win,)"
        raise ValueError(
            f"output_idx must have shape {want} with the batch of h of shape "
            f"{_checks.shape_str(h.shape)}; got shape {_checks.shape_str(output_idx.shape)}"
        )
    ii, vi = _normalize("input_idx", input_idx, i_blocks, "i_blocks")
    oi, vo = _normalize("output_idx", output_idx, o_blocks, "o_blocks")
    if not batched:
        h, ii, vi, oi, vo = _batched(h, ii, vi, oi, vo)
    return W, h, ii, vi, oi, vo, batched


@named
def sparse_block_gemv(
    o: ArrayLike,
    W: ArrayLike,
    h: ArrayLike,
    input_idx: ArrayLike,
    output_idx: ArrayLike,
    *,
    strategy: str = "auto",
) -> jax.Array:
    r"""Block-sparse matrix-vector product, Theano's ``SparseBlockGemv``.

    For every example ``b`` and output slot ``j``:

    ```
    out[b, j] = o[b, j] + sum_i h[b, i] @ W[input_idx[b, i], output_idx[b, j]]
    ```

    Only the ``i_win * o_win`` selected blocks of ``W`` are read per example.
    For one example, pass ``o (o_win, o_size)``, ``h (i_win, i_size)`` and 1-D
    index arrays; the result is then ``(o_win, o_size)`` (convenient under
    ``jax.vmap``).

    Args:
      o: ``(batch, o_win, o_size)`` values the products are added to.
      W: ``(i_blocks, o_blocks, i_size, o_size)`` block weight matrix.
      h: ``(batch, i_win, i_size)`` input blocks.
      input_idx: ``(batch, i_win)`` integer indices into ``W``'s first axis.
        Negative values count from the end.
      output_idx: ``(batch, o_win)`` integer indices into ``W``'s second axis.
      strategy: how the products are executed, the same values either way:
        ``"auto"`` or a name in ``STRATEGIES`` (see :mod:`blocksparse_jax.blocksparse`).

    Returns:
      ``(batch, o_win, o_size)`` in ``o``'s dtype.  Float16/bfloat16 inputs
      accumulate in float32.

    Raises:
      TypeError: a non-float ``o``/``W``/``h`` or a non-integer index array.
      ValueError: a rank or shape that does not match the others, or an unknown
        ``strategy``.
      IndexError: a concrete (not traced) index outside ``[-n, n)``, or one that
        JAX's integer dtype cannot hold (a NumPy ``int64`` or Python int beyond
        ``int32`` with ``jax_enable_x64`` off).  Under ``jit`` an out-of-range
        index is masked: it adds nothing, whatever its block and activations
        hold (no NaN appears); ``checkify.index_checks`` reports it.
      TypeError: under ``jax.jvp`` / ``jax.jacfwd`` (forward mode is not
        supported; ``jax.grad``, ``jax.vjp`` and ``jax.jacrev`` work to any order,
        e.g. ``jax.jacrev(jax.jacrev(f))`` for second derivatives).

    NaN and inf propagate exactly as in the selected products (the same in
    every strategy); a non-finite value in a block no example selects never
    reaches the result or the gradients.

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import sparse_block_gemv
      >>> W = jnp.arange(2 * 3 * 2 * 2, dtype=jnp.float32).reshape(2, 3, 2, 2)
      >>> h = jnp.ones((1, 1, 2))                 # batch=1, i_win=1, i_size=2
      >>> o = jnp.zeros((1, 2, 2))                # o_win=2, o_size=2
      >>> sparse_block_gemv(o, W, h, jnp.array([[1]]), jnp.array([[0, 2]]))
      Array([[[26., 28.],
              [42., 44.]]], dtype=float32)

    References:
      Theano/Aesara ``aesara.tensor.nnet.blocksparse.SparseBlockGemv``.
    """
    strategy = check_strategy(strategy)
    W, h, ii, vi, oi, vo, batched = _prepare_gemv(W, h, input_idx, output_idx)
    o = _as_array("o", o)
    _checks.check_float("o", o)
    expected = (*oi.shape, W.shape[3])
    if o.shape != (expected if batched else expected[1:]):
        want = "(batch, o_win, o_size)" if batched else "(o_win, o_size)"
        got = expected if batched else expected[1:]
        raise ValueError(
            f"o must have shape {want} = {_checks.shape_str(got)} from output_idx and W; "
            f"got shape {_checks.shape_str(o.shape)}"
        )
    w = sites.mark_weight(W)
    out = gemv_masked(o if batched else o[None], w, h, ii, vi, oi, vo, strategy)
    out = sites.mark_use(out, w, (h, ii, vi, oi, vo), GemvWeightRule(W.shape[1]))
    return out if batched else out[0]


@named
def sparse_block_dot(
    W: ArrayLike,
    h: ArrayLike,
    input_idx: ArrayLike,
    b: ArrayLike,
    output_idx: ArrayLike,
    *,
    strategy: str = "auto",
) -> jax.Array:
    r"""Block-sparse dot product plus bias (Theano's ``sparse_block_dot``, in Theano's argument order).

    ```
    out[b_, j] = b[output_idx[b_, j]] + sum_i h[b_, i] @ W[input_idx[b_, i], output_idx[b_, j]]
    ```

    The bias of an output block is added once per output slot, never once per
    input block.

    Args:
      W: ``(i_blocks, o_blocks, i_size, o_size)`` block weight matrix.
      h: ``(batch, i_win, i_size)`` input blocks (or ``(i_win, i_size)`` for one example).
      input_idx: ``(batch, i_win)`` integer indices into ``W``'s first axis.
      b: ``(o_blocks, o_size)`` bias of each output block.
      output_idx: ``(batch, o_win)`` integer indices into ``W``'s second axis and ``b``.
      strategy: how the products are executed, the same values either way:
        ``"auto"`` or a name in ``STRATEGIES`` (see :mod:`blocksparse_jax.blocksparse`).

    Returns:
      ``(batch, o_win, o_size)`` in ``b``'s dtype.

    Raises:
      TypeError, ValueError, IndexError: as :func:`sparse_block_gemv` (forward
        mode included).  Under ``jit`` an out-of-range ``output_idx`` gives zeros
        (no block, no bias).

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import sparse_block_dot
      >>> W = jnp.ones((3, 4, 2, 5))
      >>> b = jnp.arange(4 * 5, dtype=jnp.float32).reshape(4, 5)
      >>> h = jnp.ones((1, 2, 2))
      >>> out = sparse_block_dot(W, h, jnp.array([[0, 2]]), b, jnp.array([[3]]))
      >>> out   # 2 input blocks * 2 ones + b[3]
      Array([[[19., 20., 21., 22., 23.]]], dtype=float32)
    """
    strategy = check_strategy(strategy)
    W, h, ii, vi, oi, vo, batched = _prepare_gemv(W, h, input_idx, output_idx)
    b = _as_array("b", b)
    _checks.check_float("b", b)
    if b.shape != (W.shape[1], W.shape[3]):
        raise ValueError(
            f"b must have shape (o_blocks, o_size) = {_checks.shape_str((W.shape[1], W.shape[3]))} "
            f"from W of shape {_checks.shape_str(W.shape)}; got shape {_checks.shape_str(b.shape)}"
        )
    # No block and no bias for an out-of-range output index.
    w, bw = sites.mark_weight(W), sites.mark_weight(b)
    out = gemv_masked(bias_masked(bw, oi, vo), w, h, ii, vi, oi, vo, strategy)
    out = sites.mark_use(out, w, (h, ii, vi, oi, vo), GemvWeightRule(W.shape[1]))
    out = sites.mark_use(out, bw, (oi, vo), BiasRule())
    return out if batched else out[0]


@named
def sparse_block_outer(
    o: ArrayLike,
    x: ArrayLike,
    y: ArrayLike,
    x_idx: ArrayLike,
    y_idx: ArrayLike,
    alpha: ArrayLike = 1.0,
    *,
    strategy: str = "auto",
) -> jax.Array:
    r"""Block-sparse outer product update, Theano's ``SparseBlockOuter``.

    For every example ``b``, ``i`` and ``j``:

    ```
    out[x_idx[b, i], y_idx[b, j]] += alpha * outer(x[b, i], y[b, j])
    ```

    starting from ``out = o``; repeated block indices accumulate.  ``alpha`` is
    applied as the formula says (Theano's CPU implementation ignored it).

    This is the weight gradient of :func:`sparse_block_gemv`, and with
    ``o = W`` and ``alpha = -learning_rate`` it is a sparse SGD step that
    touches only the selected blocks.

    Args:
      o: ``(x_blocks, y_blocks, x_size, y_size)`` matrix the updates are added to.
      x: ``(batch, x_win, x_size)`` (or ``(x_win, x_size)`` for one example).
      y: ``(batch, y_win, y_size)`` (or ``(y_win, y_size)``).
      x_idx: ``(batch, x_win)`` integer indices into ``o``'s first axis.
      y_idx: ``(batch, y_win)`` integer indices into ``o``'s second axis.
      alpha: scalar scale of the update (differentiable).
      strategy: how the products are executed, the same values either way:
        ``"auto"`` or a name in ``STRATEGIES`` (see :mod:`blocksparse_jax.blocksparse`).

    Returns:
      ``(x_blocks, y_blocks, x_size, y_size)`` in ``o``'s dtype.

    Raises:
      TypeError, ValueError, IndexError: as :func:`sparse_block_gemv` (forward
        mode included).  Under ``jit`` the update of an out-of-range block is
        dropped, whatever ``x``, ``y`` and ``alpha`` hold.  A non-finite
        ``alpha`` (or ``x``, ``y``) reaches only the selected blocks.

    Examples:
      A sparse SGD step: the gradient of ``sum(out * g)`` for
      ``out = sparse_block_gemv(o, W, h, ii, oi)`` with respect to ``W`` is
      ``sparse_block_outer(zeros_like(W), h, g, ii, oi)``, so the update
      ``W - lr * grad`` is one call that only touches the selected blocks:

      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import sparse_block_gemv, sparse_block_outer
      >>> W = jnp.ones((4, 4, 3, 2)); h = jnp.ones((2, 1, 3)); g = jnp.ones((2, 1, 2))
      >>> ii, oi = jnp.array([[0], [0]]), jnp.array([[1], [3]])
      >>> loss = lambda W: jnp.sum(sparse_block_gemv(jnp.zeros((2, 1, 2)), W, h, ii, oi) * g)
      >>> W_new = sparse_block_outer(W, h, g, ii, oi, alpha=-0.1)
      >>> bool(jnp.allclose(W_new, W - 0.1 * jax.grad(loss)(W)))
      True
      >>> float(W_new[0, 1, 0, 0]), float(W_new[1, 1, 0, 0])   # selected vs untouched block
      (0.8999999761581421, 1.0)
    """
    strategy = check_strategy(strategy)
    o = _as_array("o", o)
    x = _as_array("x", x)
    y = _as_array("y", y)
    x_idx = _checks.as_index_array("x_idx", x_idx)
    y_idx = _checks.as_index_array("y_idx", y_idx)
    _checks.check_float("o", o)
    _checks.check_ndim("o", o, 4, "(x_blocks, y_blocks, x_size, y_size)")
    x_blocks, y_blocks, x_size, y_size = o.shape
    x_batched, _ = _check_windowed(
        "x",
        x,
        "x_idx",
        x_idx,
        win="x_win",
        size="x_size",
        size_value=x_size,
        size_source="o.shape[2]",
    )
    y_batched, _ = _check_windowed(
        "y",
        y,
        "y_idx",
        y_idx,
        win="y_win",
        size="y_size",
        size_value=y_size,
        size_source="o.shape[3]",
    )
    _check_batch("x", x_batched, x.shape, "y", y_batched, y.shape)
    alpha = _as_array("alpha", alpha)
    if alpha.ndim != 0:
        raise ValueError(f"alpha must be a scalar; got shape {_checks.shape_str(alpha.shape)}")
    if not jnp.issubdtype(alpha.dtype, jnp.floating) and not jnp.issubdtype(
        alpha.dtype, jnp.integer
    ):
        raise TypeError(f"alpha must be a real scalar; got dtype {alpha.dtype}")
    xi, vx = _normalize("x_idx", x_idx, x_blocks, "x_blocks")
    yi, vy = _normalize("y_idx", y_idx, y_blocks, "y_blocks")
    if not x_batched:
        x, y, xi, vx, yi, vy = _batched(x, y, xi, vx, yi, vy)
    return outer_masked(o, x, y, xi, vx, yi, vy, alpha, strategy)
