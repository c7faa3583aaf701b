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
    """

    W: jax.Array
    b: jax.Array | None

    @property
    def n_in(self) -> int:
        """The input width."""
        return int(self.W.shape[0])

    @property
    def n_outputs(self) -> int:
        """The number of outputs (the vocabulary size)."""
        return int(self.W.shape[1])


@named
def full_softmax_init(
    key: jax.Array, n_in: int, n_outputs: int, *, bias: bool = True, dtype=jnp.float32
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

    Returns:
      ``FullSoftmaxParams(W (n_in, n_outputs), b (n_outputs,) or None)``.

    Raises:
      ValueError: a size that is not a positive whole number.
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
    return _init(key, n_in, n_outputs, bool(bias), dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init(key, n_in, n_outputs, bias, dtype) -> FullSoftmaxParams:
    W = jax.random.normal(key, (n_in, n_outputs), jnp.float32) * (1.0 / math.sqrt(n_in))
    return FullSoftmaxParams(W.astype(dtype), jnp.zeros((n_outputs,), dtype) if bias else None)


def check_params(params) -> FullSoftmaxParams:
    """``params`` as :class:`FullSoftmaxParams` of arrays, their shapes checked."""
    if not isinstance(params, tuple) or len(params) != 2:
        raise TypeError(
            "params must be a FullSoftmaxParams(W, b) (or a 2-tuple in that order); got "
            f"{type(params).__name__}. Create one with full_softmax_init."
        )
    W = _as_array("W", params[0])
    _checks.check_float("W", W)
    _checks.check_ndim("W", W, 2, "(n_in, n_outputs)")
    if W.shape[1] < 1:
        raise ValueError(f"W must have at least one output column; got shape {_shape(W.shape)}")
    b = params[1]
    if b is not None:
        b = _as_array("b", b)
        _checks.check_float("b", b)
        if b.shape != (W.shape[1],):
            raise ValueError(
                f"b must have shape (n_outputs,) = {_shape((W.shape[1],))} with "
                f"n_outputs={W.shape[1]} (W.shape[1]), or be None; got shape {_shape(b.shape)}"
            )
    return FullSoftmaxParams(W, b)


def check_x(x, n_in: int) -> jax.Array:
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
            f"x must have shape {desc} with n_in={n_in} (W.shape[0]); got shape {_shape(x.shape)}"
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
    x = check_x(x, params.n_in)
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
