"""The hierarchical softmax's parameters and their initialisation."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import _checks
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named


class HSoftmaxParams(NamedTuple):
    """The weights of a two-level hierarchical softmax (a pytree).

    Attributes:
      W1: ``(n_in, n_classes)`` first-level (class) weights.
      b1: ``(n_classes,)`` first-level bias.
      W2: ``(n_classes, n_in, n_outputs_per_class)`` second-level weights, one
        ``(n_in, n_outputs_per_class)`` block per class.
      b2: ``(n_classes, n_outputs_per_class)`` second-level bias.
    """

    W1: jax.Array
    b1: jax.Array
    W2: jax.Array
    b2: jax.Array


def default_n_classes(n_outputs: int) -> int:
    """``ceil(sqrt(n_outputs))``: the class count that minimises ``n_classes + n_outputs_per_class``."""
    return math.isqrt(n_outputs - 1) + 1 if n_outputs > 1 else 1


def check_count(name: str, value, *, minimum: int = 1) -> int:
    """A size argument as a Python int ``>= minimum``; integral floats are accepted."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python int, fixed at trace time; got a traced value. Under "
            f"jax.jit mark it static, e.g. jax.jit(f, static_argnames={name!r})"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, np.integer, float, np.floating)
    ):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if isinstance(value, (float, np.floating)) and not (
        math.isfinite(value) and value == int(value)
    ):
        raise ValueError(f"{name} must be a whole number (an int); got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def check_params(params) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Checks the four weight arrays against each other; returns them as arrays."""
    if not isinstance(params, tuple) or len(params) != 4:
        raise TypeError(
            "params must be an HSoftmaxParams(W1, b1, W2, b2) (or a 4-tuple in that order); "
            f"got {type(params).__name__}. Create one with h_softmax_init."
        )
    W1, b1, W2, b2 = (
        _as_array(n, a) for n, a in zip(("W1", "b1", "W2", "b2"), params, strict=True)
    )
    for name, a in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
        _checks.check_float(name, a)
    _checks.check_ndim("W1", W1, 2, "(n_in, n_classes)")
    n_in, n_classes = W1.shape
    if b1.shape != (n_classes,):
        raise ValueError(
            f"b1 must have shape (n_classes,) = {_shape((n_classes,))} with n_classes={n_classes} "
            f"(W1.shape[1]); got shape {_shape(b1.shape)}"
        )
    _checks.check_ndim("W2", W2, 3, "(n_classes, n_in, n_outputs_per_class)")
    if W2.shape[:2] != (n_classes, n_in):
        raise ValueError(
            "W2 must have shape (n_classes, n_in, n_outputs_per_class) with "
            f"n_classes={n_classes} (W1.shape[1]) and n_in={n_in} (W1.shape[0]); "
            f"got shape {_shape(W2.shape)}"
        )
    if b2.shape != (n_classes, W2.shape[2]):
        raise ValueError(
            "b2 must have shape (n_classes, n_outputs_per_class) = "
            f"{_shape((n_classes, W2.shape[2]))} from W2 of shape {_shape(W2.shape)}; "
            f"got shape {_shape(b2.shape)}"
        )
    return W1, b1, W2, b2


@named
def h_softmax_init(
    key: jax.Array,
    n_in: int,
    n_outputs: int,
    *,
    n_classes: int | None = None,
    dtype=jnp.float32,
) -> HSoftmaxParams:
    r"""Initial :class:`HSoftmaxParams` for ``n_outputs`` outputs.

    ``n_classes`` defaults to ``ceil(sqrt(n_outputs))``, which minimises the
    per-example cost ``n_classes + n_outputs_per_class``, and
    ``n_outputs_per_class = ceil(n_outputs / n_classes)``.  ``W1`` and ``W2``
    are drawn from ``N(0, 1 / n_in)`` (LeCun normal: logits of the scale of
    ``x``'s entries); the biases are zero.

    Args:
      key: a PRNG key.
      n_in: input width.
      n_outputs: number of outputs (the vocabulary size, or a layout's
        ``n_outputs``).
      n_classes: number of classes, in ``[1, n_outputs]``.
      dtype: float dtype of the parameters.

    Returns:
      ``HSoftmaxParams(W1 (n_in, n_classes), b1 (n_classes,),
      W2 (n_classes, n_in, n_outputs_per_class), b2 (n_classes, n_outputs_per_class))``.

    Raises:
      ValueError: a size that is not a positive whole number (``inf``, ``nan``,
        ``2.5``, ``0``) or ``n_classes`` outside ``[1, n_outputs]``.
      TypeError: a size that is not a number (or a bool), a non-float ``dtype``.

    Examples:
      >>> import jax
      >>> from blocksparse_jax import h_softmax_init
      >>> params = h_softmax_init(jax.random.key(0), 16, 1000)
      >>> [p.shape for p in params]
      [(16, 32), (32,), (32, 16, 32), (32, 32)]
    """
    n_in = check_count("n_in", n_in)
    n_outputs = check_count("n_outputs", n_outputs)
    if n_classes is None:
        n_classes = default_n_classes(n_outputs)
    n_classes = check_count("n_classes", n_classes)
    if n_classes > n_outputs:
        raise ValueError(
            f"n_classes must be an int in [1, n_outputs] = [1, {n_outputs}]; got {n_classes!r}"
        )
    try:
        dtype = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be a float dtype; got {dtype!r}") from e
    if dtype not in [jnp.dtype(d) for d in _checks.FLOAT_DTYPES]:
        raise TypeError(
            "dtype must be a float dtype (float16, bfloat16, float32 or float64) for trainable "
            f"weights; got {dtype}"
        )
    per_class = -(-n_outputs // n_classes)
    return _init(key, n_in, n_classes, per_class, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init(key, n_in, n_classes, per_class, dtype) -> HSoftmaxParams:
    k1, k2 = jax.random.split(key)
    scale = 1.0 / math.sqrt(n_in)
    W1 = (jax.random.normal(k1, (n_in, n_classes), jnp.float32) * scale).astype(dtype)
    W2 = (jax.random.normal(k2, (n_classes, n_in, per_class), jnp.float32) * scale).astype(dtype)
    return HSoftmaxParams(
        W1, jnp.zeros((n_classes,), dtype), W2, jnp.zeros((n_classes, per_class), dtype)
    )
