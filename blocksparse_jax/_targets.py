"""The targets, masks and reductions of the softmax losses (hierarchical and adaptive).

Targets are integer output ids, checked for their dtype and shape always and
for their values when they are concrete (:func:`check_target_range`); under
``jit`` :func:`normalize_target` turns an out-of-range target into a masked one
(which ``checkify.index_checks`` reports).  ``mask`` marks the examples that
count; :func:`reduce_nll` reduces their negative log-likelihoods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import _checks
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape

_I32 = np.iinfo(np.int32)


def _host_target(target):
    """A target that is not a JAX array, as NumPy (its true values), or ``None``.

    NumPy and Python integers are inspected before JAX converts them: with x64
    off JAX would wrap an int64 beyond the int32 range into a real output id,
    and a Python int beyond it raises an ``OverflowError`` naming nothing.
    """
    if isinstance(target, jax.Array):
        return None
    try:
        value = np.asarray(target)
    except (TypeError, ValueError):
        return None
    if value.dtype == object:  # Python ints beyond int64
        flat = value.ravel().tolist()
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            return None
        clipped = np.array([min(max(v, -1), int(_I32.max)) for v in flat], np.int64)
        return clipped.reshape(value.shape), value
    return value, value


def check_target(target, lead: tuple[int, ...]) -> tuple[jax.Array, np.ndarray | None]:
    """Validates ``target``'s dtype and shape against the leading dims ``lead`` of ``x``.

    Returns ``(target as (N,), its concrete values shaped lead, or None)``.  A concrete
    target's values are checked by :func:`check_target_values`.
    """
    host = _host_target(target)
    if host is not None:
        value, exact = host
        if value.dtype.kind not in "iu":
            raise TypeError(
                f"target must be an array of integer output ids; got dtype {value.dtype}. "
                "Cast it with target.astype(jnp.int32)."
            )
        # Every value JAX cannot hold is out of range anyway: clip (the checks see the exact values).
        arr = jnp.asarray(
            np.clip(value, max(-1, int(np.iinfo(value.dtype).min)), _I32.max).astype(np.int32)
        )
    else:
        arr = _as_array("target", target)
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(
                f"target must be an array of integer output ids; got dtype {arr.dtype}. "
                "Cast it with target.astype(jnp.int32)."
            )
        exact = _checks.concrete_value(arr)
    if arr.shape not in (lead, lead + (1,)):
        if lead == ():
            want = "be a scalar (or shape (1,)) for a 1-D x"
        elif len(lead) == 1:
            want = f"have shape (batch,) or (batch, 1) with batch={lead[0]} (x.shape[0])"
        else:
            want = f"have shape x.shape[:-1] = {_shape(lead)} (or that with a trailing 1)"
        raise ValueError(f"target must {want}; got shape {_shape(arr.shape)}")
    n = int(np.prod(lead, dtype=np.int64))
    return arr.reshape(n), (None if exact is None else np.asarray(exact).reshape(lead))


def check_target_range(value, n_outputs: int, keep=None) -> None:
    """Concrete targets outside ``[0, n_outputs)`` raise ``IndexError``.

    ``value`` holds the exact values (NumPy, possibly ``object`` for huge Python
    ints), or ``None`` for a traced target (not checked); entries where ``keep``
    is ``False`` (masked out) are not checked.
    """
    if value is None or value.size == 0:
        return
    keep = np.ones(value.shape, bool) if keep is None else np.asarray(keep, bool)
    bad = keep & ((value < 0) | (value >= n_outputs)).astype(bool)
    if bad.any():
        pos = _checks.first_position(bad)
        raise IndexError(
            f"target holds {int(value[pos])} at position {pos}, out of range for "
            f"n_outputs={n_outputs} (valid targets are 0 <= t < {n_outputs})"
        )


def normalize_target(target: jax.Array, n_outputs: int) -> tuple[jax.Array, jax.Array]:
    """``(int32 target in [0, n_outputs), valid mask)`` of a traced or concrete ``target``.

    Targets count from 0 only (a negative target is out of range).  An
    out-of-range entry comes back as 0 with ``valid == False``, and the
    ``fill``-mode probe gather of ``_checks`` makes ``checkify.index_checks``
    report it, with its value.
    """
    info = jnp.iinfo(target.dtype)
    lo, hi = max(int(info.min), int(_I32.min)), min(int(info.max), int(_I32.max))
    raw = jnp.clip(target, jnp.asarray(lo, target.dtype), jnp.asarray(hi, target.dtype))
    raw = raw.astype(jnp.int32)
    valid = _checks.probe_gather(n_outputs, raw)
    return jnp.where(valid, raw, jnp.zeros((), jnp.int32)), valid


def check_mask(mask, lead: tuple[int, ...]) -> jax.Array:
    """``mask`` (default all ``True``) as a bool array of shape ``lead``."""
    if mask is None:
        return jnp.ones(lead, jnp.bool_)
    mask = _as_array("mask", mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array; got dtype {mask.dtype}")
    if mask.shape != lead:
        desc = "()" if lead == () else "(batch,)" if len(lead) == 1 else "x.shape[:-1]"
        raise ValueError(
            f"mask must have shape {desc} = {_shape(lead)}, one entry per example of x; "
            f"got shape {_shape(mask.shape)}"
        )
    return mask


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def reduce_nll(logp: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
    """``-logp`` where ``mask``, reduced: mean over the unmasked entries (0 if none), sum, none."""
    nll = jnp.where(mask, -logp, jnp.zeros((), logp.dtype))
    if reduction == "none":
        return nll
    total = jnp.sum(nll)
    if reduction == "sum":
        return total
    count = jnp.sum(mask, dtype=jnp.int32).astype(total.dtype)
    return total / jnp.maximum(count, jnp.ones((), total.dtype))
