"""The exact softmax's parameters, their initialisation and the validation every head shares.

The sampled softmax trains the same :class:`FullSoftmaxParams` (and is
evaluated with the exact functions), so its validation lives here too.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax import _checks, _targets
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named
from blocksparse_jax.hsoftmax._params import check_count


class FullSoftmaxParams(NamedTuple):
    """The weights of a softmax over every output (a pytree), laid out as ``x @ W + b``.

    Attributes:
      W: ``(n_in, n_outputs)`` weights, one column per output.
      b: ``(n_outputs,)`` bias, or ``None`` (no bias).

    :class:`FullSoftmaxRowParams` holds the same weights one row per output.
    """

    W: jax.Array
    b: jax.Array | None

    #: Whether ``W`` holds one row per output (:class:`FullSoftmaxRowParams`).
    rows = False

    @property
    def n_in(self) -> int:
        """The input width."""
        return int(self.W.shape[0])

    @property
    def n_outputs(self) -> int:
        """The number of outputs (the vocabulary size)."""
        return int(self.W.shape[1])

    def to_columns(self) -> FullSoftmaxParams:
        """These parameters."""
        return self

    def to_rows(self) -> FullSoftmaxRowParams:
        """The same weights as :class:`FullSoftmaxRowParams` (``W`` transposed: a copy)."""
        return FullSoftmaxRowParams(jnp.asarray(self.W).T, self.b)


class FullSoftmaxRowParams(FullSoftmaxParams):
    """:class:`FullSoftmaxParams` with ``W`` laid out one row per output: ``x @ W.T + b``.

    ``W`` is ``(n_outputs, n_in)``, as PyTorch's ``nn.Linear``, TensorFlow's
    ``sampled_softmax_loss`` and an input embedding table (tied weights) hold
    it.  Every function of the exact and the sampled softmax takes either
    layout and gives the same values; gradients and optimizer state have the
    layout of the parameters.

    Pick this layout to train with the sampled softmax (or the gradient
    filter) through :func:`~blocksparse_jax.value_and_sparse_grad`: the
    update then reads and writes each touched output's weights as one
    contiguous row, where the column layout touches ``n_in`` entries a row of
    ``W`` apart (measured in ``benchmarks/README.md``, "Output heads").

    Attributes:
      W: ``(n_outputs, n_in)`` weights, one row per output.
      b: ``(n_outputs,)`` bias, or ``None`` (no bias).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import full_softmax_init, full_softmax_loss
      >>> params = full_softmax_init(jax.random.key(0), 16, 1000, layout="rows")
      >>> type(params).__name__, params.W.shape, params.n_in, params.n_outputs
      ('FullSoftmaxRowParams', (1000, 16), 16, 1000)
      >>> x, t = jnp.ones((4, 16)), jnp.array([1, 2, 3, 4])
      >>> columns = params.to_columns()  # the same weights as FullSoftmaxParams
      >>> bool(jnp.allclose(full_softmax_loss(x, params, t), full_softmax_loss(x, columns, t)))
      True
    """

    __slots__ = ()

    rows = True

    @property
    def n_in(self) -> int:
        """The input width."""
        return int(self.W.shape[1])

    @property
    def n_outputs(self) -> int:
        """The number of outputs (the vocabulary size)."""
        return int(self.W.shape[0])

    def to_columns(self) -> FullSoftmaxParams:
        """The same weights as :class:`FullSoftmaxParams` (``W`` transposed: a copy)."""
        return FullSoftmaxParams(jnp.asarray(self.W).T, self.b)

    def to_rows(self) -> FullSoftmaxRowParams:
        """These parameters."""
        return self


@named
def full_softmax_init(
    key: jax.Array,
    n_in: int,
    n_outputs: int,
    *,
    bias: bool = True,
    dtype=jnp.float32,
    layout: str = "columns",
) -> FullSoftmaxParams:
    r"""Initial :class:`FullSoftmaxParams`: ``W`` from ``N(0, 1 / n_in)``, a zero bias.

    The scale of :func:`h_softmax_init`'s weights (LeCun normal: logits of the
    scale of ``x``'s entries), so that heads compared on one model start alike.

    Args:
      key: a PRNG key.
      n_in: input width.
      n_outputs: number of outputs (the vocabulary size).
      bias: whether the head has a bias (``b`` is ``None`` otherwise).
      dtype: float dtype of the parameters.
      layout: ``"columns"`` (``W (n_in, n_outputs)``) or ``"rows"``
        (:class:`FullSoftmaxRowParams`, ``W (n_outputs, n_in)``: the layout
        to train with the sampled softmax; the same values either way).

    Returns:
      ``FullSoftmaxParams(W (n_in, n_outputs), b (n_outputs,) or None)``, or
      ``FullSoftmaxRowParams(W (n_outputs, n_in), b)`` with ``layout="rows"``.

    Raises:
      ValueError: a size that is not a positive whole number, an unknown ``layout``.
      TypeError: a size that is not a number (or a bool), a non-float ``dtype``.

    Examples:
      >>> import jax
      >>> from blocksparse_jax import full_softmax_init
      >>> params = full_softmax_init(jax.random.key(0), 16, 1000)
      >>> params.W.shape, params.b.shape, params.n_outputs
      ((16, 1000), (1000,), 1000)
      >>> full_softmax_init(jax.random.key(0), 16, 1000, bias=False).b is None
      True
    """
    n_in = check_count("n_in", n_in)
    n_outputs = check_count("n_outputs", n_outputs)
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a float dtype; got {dtype!r}") from e
    if dtype not in [jnp.dtype(d) for d in _checks.FLOAT_DTYPES]:
        raise TypeError(
            "dtype must be a float dtype (float16, bfloat16, float32 or float64) for trainable "
            f"weights; got {dtype}"
        )
    if layout not in ("columns", "rows"):
        raise ValueError(f'layout must be "columns" or "rows"; got {layout!r}')
    return _init(key, n_in, n_outputs, bool(bias), dtype, layout == "rows")


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init(key, n_in, n_outputs, bias, dtype, rows) -> FullSoftmaxParams:
    W = jax.random.normal(key, (n_in, n_outputs), jnp.float32) * (1.0 / math.sqrt(n_in))
    W = W.astype(dtype)
    b = jnp.zeros((n_outputs,), dtype) if bias else None
    # The same draws in either layout.
    return FullSoftmaxRowParams(W.T, b) if rows else FullSoftmaxParams(W, b)


def check_params(params) -> FullSoftmaxParams:
    """``params`` as :class:`FullSoftmaxParams` of arrays, their shapes checked."""
    if not isinstance(params, tuple) or len(params) != 2:
        raise TypeError(
            "params must be a FullSoftmaxParams(W, b) (or a 2-tuple in that order) or a "
            f"FullSoftmaxRowParams(W, b); got {type(params).__name__}. Create one with "
            "full_softmax_init."
        )
    rows = isinstance(params, FullSoftmaxRowParams)
    out = 0 if rows else 1
    W = _as_array("W", params[0])
    _checks.check_float("W", W)
    _checks.check_ndim("W", W, 2, "(n_outputs, n_in)" if rows else "(n_in, n_outputs)")
    if W.shape[out] < 1:
        raise ValueError(
            f"W must have at least one output {'row' if rows else 'column'}; got shape "
            f"{_shape(W.shape)}"
        )
    b = params[1]
    if b is not None:
        b = _as_array("b", b)
        _checks.check_float("b", b)
        if b.shape != (W.shape[out],):
            raise ValueError(
                f"b must have shape (n_outputs,) = {_shape((W.shape[out],))} with "
                f"n_outputs={W.shape[out]} (W.shape[{out}]), or be None; got shape "
                f"{_shape(b.shape)}"
            )
    return (FullSoftmaxRowParams if rows else FullSoftmaxParams)(W, b)


def check_x(x, n_in: int, n_in_axis: int = 0) -> jax.Array:
    """``x`` of shape ``(..., n_in)``."""
    x = _as_array("x", x)
    _checks.check_float("x", x)
    if x.ndim == 0:
        raise ValueError(
            "x must have shape (..., n_in): any leading batch dimensions, then n_in; got a scalar"
        )
    if x.shape[-1] != n_in:
        desc = {1: "(n_in,)", 2: "(batch, n_in)"}.get(x.ndim, "(..., n_in)")
        raise ValueError(
            f"x must have shape {desc} with n_in={n_in} (W.shape[{n_in_axis}]); got shape "
            f"{_shape(x.shape)}"
        )
    return x


def check_option(name: str, value, *, low: float, high: float | None = None, open_low=False):
    """A Python number in ``[low, high)`` (``(low, high)`` with ``open_low``), as a float."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python number, fixed at trace time; got a traced value. Under "
            f"jax.jit mark it static, e.g. jax.jit(f, static_argnames={name!r})"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = value <= low if open_low else value < low
    too_high = high is not None and value >= high
    if not math.isfinite(value) or too_low or too_high:
        lo = f"({low}" if open_low else f"[{low}"
        hi = f"{high})" if high is not None else "inf)"
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}; got {value!r}")
    return value


def check_chunk_size(chunk_size) -> int | None:
    """``chunk_size`` (columns per chunk) as a positive Python int, or ``None`` (automatic)."""
    if chunk_size is None:
        return None
    chunk_size = _checks.static_int("chunk_size", chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (columns per chunk); got {chunk_size}")
    return chunk_size


class Prepared(NamedTuple):
    """Validated inputs: ``x`` flattened to ``(batch, n_in)``, the caller's leading dims."""

    x: jax.Array
    params: FullSoftmaxParams
    lead: tuple[int, ...]


def prepare(x: ArrayLike, params) -> Prepared:
    """Validates ``x`` and ``params``; ``x`` comes back as ``(batch, n_in)``."""
    params = check_params(params)
    x = check_x(x, params.n_in, 1 if params.rows else 0)
    lead = tuple(x.shape[:-1])
    return Prepared(x.reshape(-1, x.shape[-1]), params, lead)


def checked_target(target, lead: tuple[int, ...], n_outputs: int, mask=None) -> jax.Array:
    """``target`` as ``(batch,)``; its shape and (when concrete) its values checked.

    Entries where a concrete ``mask`` is ``False`` are not checked; with a
    traced ``mask`` none is.
    """
    t, value = _targets.check_target(target, lead)
    keep = None
    if mask is not None:
        keep = _checks.concrete_value(mask)
        if keep is None:
            return t
    _targets.check_target_range(value, n_outputs, keep)
    return t
