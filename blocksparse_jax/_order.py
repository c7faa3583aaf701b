"""Ordering an in-place update after the reads of the buffer it overwrites."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def after(idx: jax.Array, *deps: jax.Array) -> jax.Array:
    """``idx`` (an integer array) unchanged, computed from ``deps`` so that its users run after them.

    XLA keeps an in-place update of a donated buffer in place only when every
    other read of that buffer is ordered before the update by data dependence
    (XLA:CPU drops ``lax.optimization_barrier`` before that decision).  Adding
    to the update's indices a zero derived from the bits of each dependency
    (which XLA does not fold) makes that order explicit.
    """
    for dep in deps:
        if jnp.size(dep) == 0:  # nothing reads it
            continue
        first = jnp.asarray(dep).reshape(-1)[:1].astype(jnp.float32)
        bits = lax.bitcast_convert_type(first, jnp.int32)
        sign = lax.shift_right_logical(bits, jnp.full_like(bits, 31))  # 0 or 1
        zero = lax.shift_right_logical(sign, jnp.ones_like(sign))  # always 0
        idx = idx + zero[0].astype(idx.dtype)
    return idx
