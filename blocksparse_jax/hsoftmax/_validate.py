"""Validation of the hierarchical softmax's own arguments: ``x``, ``n_outputs``, ``class_sizes``.

The checks shared with the other softmaxes (targets, masks, reductions) are in
:mod:`blocksparse_jax._targets`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import _checks
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape


def check_x(x, n_in: int, *, theano: bool = False) -> jax.Array:
    """``x`` of shape ``(..., n_in)`` (``(batch, n_in)`` for Theano's ``h_softmax``)."""
    x = _as_array("x", x)
    _checks.check_float("x", x)
    if theano and x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, n_in); got shape {_shape(x.shape)}")
    if x.ndim == 0:
        raise ValueError(
            "x must have shape (..., n_in): any leading batch dimensions, then n_in; got a scalar"
        )
    if x.shape[-1] != n_in:
        desc = {1: "(n_in,)", 2: "(batch, n_in)"}.get(x.ndim, "(..., n_in)")
        raise ValueError(
            f"x must have shape {desc} with n_in={n_in} (W1.shape[0]); got shape {_shape(x.shape)}"
        )
    return x


_N_OUTPUTS_HINT = (
    ", or leave n_outputs out: it defaults to n_classes * n_outputs_per_class "
    "(the layout's n_outputs)."
)


def check_n_outputs(n_outputs, n_classes: int, per_class: int) -> int:
    """``n_outputs`` (default ``n_classes * n_outputs_per_class``) as a checked Python int."""
    if n_outputs is None:
        return n_classes * per_class
    n_outputs = _checks.static_int("n_outputs", n_outputs, hint=_N_OUTPUTS_HINT)
    if not 1 <= n_outputs <= n_classes * per_class:
        raise ValueError(
            f"n_outputs must be in [1, n_classes * n_outputs_per_class] = "
            f"[1, {n_classes * per_class}] (n_classes={n_classes}, "
            f"n_outputs_per_class={per_class}); got n_outputs={n_outputs}"
        )
    return n_outputs


def check_class_sizes(
    class_sizes, n_classes: int, per_class: int, source: str = "W1.shape[1]"
) -> jax.Array | None:
    """``class_sizes`` as ``(n_classes,)`` int32, clipped to ``[0, n_outputs_per_class]``.

    Concrete values outside that range raise; traced ones are clipped (a
    negative size is an empty class, a size above ``n_outputs_per_class`` a
    full one).
    """
    if class_sizes is None:
        return None
    class_sizes = _as_array("class_sizes", class_sizes)
    if not jnp.issubdtype(class_sizes.dtype, jnp.integer):
        raise TypeError(
            f"class_sizes must be an integer array (the number of outputs in each class); "
            f"got dtype {class_sizes.dtype}. Cast it with class_sizes.astype(jnp.int32)."
        )
    if class_sizes.shape != (n_classes,):
        raise ValueError(
            f"class_sizes must have shape (n_classes,) = {_shape((n_classes,))} with "
            f"n_classes={n_classes} ({source}); got shape {_shape(class_sizes.shape)}"
        )
    value = _checks.concrete_value(class_sizes)
    if value is not None and ((value < 0) | (value > per_class)).any():
        raise ValueError(
            f"class_sizes must lie in [0, n_outputs_per_class] = [0, {per_class}]; "
            f"got {value.tolist()}"
        )
    dt = class_sizes.dtype
    hi = min(per_class, int(np.iinfo(dt).max))
    return jnp.clip(class_sizes, jnp.zeros((), dt), jnp.asarray(hi, dt)).astype(jnp.int32)


def check_padded_targets(value, class_sizes, per_class: int, keep=None) -> None:
    """Concrete targets on a padded slot of a concrete ``class_sizes`` raise ``IndexError``.

    ``value`` holds the exact targets, already known to be in range (see
    :func:`~blocksparse_jax._targets.check_target_range`), or ``None``; entries
    where ``keep`` is ``False`` (masked out) are not checked.
    """
    if value is None or value.size == 0:
        return
    sv = None if class_sizes is None else _checks.concrete_value(class_sizes)
    if sv is None:
        return
    keep = np.ones(value.shape, bool) if keep is None else np.asarray(keep, bool)
    tv = np.where(keep, value, 0).astype(np.int64)
    bad = keep & ((tv % per_class) >= sv[tv // per_class])
    if bad.any():
        pos = _checks.first_position(bad)
        c = int(tv[pos]) // per_class
        held = f"slots 0..{int(sv[c]) - 1}" if sv[c] > 0 else "no slot"
        raise IndexError(
            f"target holds {int(tv[pos])} at position {pos}, a padded slot: class {c} holds "
            f"class_sizes[{c}]={int(sv[c])} outputs ({held})"
        )
