"""Trace-time validation of shapes, dtypes and index arrays.

Static checks (ranks, shapes, dtypes) always run, before any tracing work, and
raise ``ValueError`` / ``TypeError`` naming the argument, the shape expected
(in the shape vocabulary of the docs) and the shape received.

Index values are checked only when they are concrete (an eager call): an
out-of-range value raises ``IndexError``.  Under ``jit`` the values are unknown
at trace time; :func:`normalize_index` then turns every out-of-range entry into
a *masked* entry (see the docstring of :mod:`blocksparse_jax.blocksparse`) through a
gather in ``fill`` mode, which is exactly what
``jax.experimental.checkify.index_checks`` instruments, so checkify reports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def as_array(name: str, x) -> jax.Array:
    """``x`` as a JAX array (a no-op for arrays and tracers); a clear error otherwise."""
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:  # None is a ValueError in jnp.asarray
        raise TypeError(f"{name} must be an array; got {type(x).__name__}") from e


def as_index_array(name: str, x) -> jax.Array:
    """An index array as a JAX array, refusing values its JAX dtype cannot hold.

    With ``jax_enable_x64`` off JAX stores integers as ``int32``/``uint32``, and
    converting a NumPy ``int64``/``uint64`` array or a Python int wraps values
    beyond that range (``2**32`` would become ``0``, a real block).  Such a value
    is out of range for any block count, so it raises ``IndexError`` here.
    JAX arrays and tracers are returned as they are.
    """
    if isinstance(x, jax.Array):
        return x
    try:
        value = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{name} must be an array of integer block indices; got {x!r}") from e
    if value.dtype == object and value.size:
        # Python ints beyond 64 bits (NumPy keeps them as objects).
        try:
            big = [int(v) for v in value.reshape(-1)]
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{name} must be an array of integer block indices; got {type(x).__name__}"
            ) from e
        pos = next(k for k, v in enumerate(big) if abs(v) >= 2**63)
        raise IndexError(
            f"{name} holds {big[pos]} at flat position {pos}, beyond the 64-bit integer range "
            f"(block indices must be below the number of blocks)"
        )
    if value.dtype.kind in "iu" and value.size:
        target = np.dtype(jax.dtypes.canonicalize_dtype(value.dtype))
        info = np.iinfo(target)
        bad = (value < info.min) | (value > info.max)
        if bad.any():
            pos = first_position(bad)
            raise IndexError(
                f"{name} holds {int(value[pos])} at position {pos}, beyond the range of {target} "
                f"that JAX stores it in (jax_enable_x64 is off); it is out of range for any "
                f"number of blocks"
            )
    return as_array(name, value)


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_float(name: str, x: jax.Array) -> None:
    if x.dtype not in [np.dtype(d) for d in FLOAT_DTYPES]:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got dtype {x.dtype}"
        )


def check_int(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an array of integer block indices; got dtype {x.dtype}. "
            f"Cast it with {name}.astype(jnp.int32)."
        )


def check_ndim(name: str, x: jax.Array, ndim: int, desc: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {desc}; got shape {shape_str(x.shape)}")


def check_dim(name: str, x: jax.Array, axis: int, expected: int, desc: str, source: str) -> None:
    """Checks ``x.shape[axis] == expected``; ``source`` says where ``expected`` came from."""
    if x.shape[axis] != expected:
        raise ValueError(
            f"{name} must have shape {desc} with {source}; got shape {shape_str(x.shape)}"
        )


def common_float_dtype(*dtypes) -> np.dtype:
    """The dtype mixed float operands are computed in (independent of promotion mode).

    Equal dtypes stay as they are; any float64 gives float64; any other mix
    (float16 with bfloat16, or either with float32) gives float32.
    """
    dts = {np.dtype(d) for d in dtypes}
    if len(dts) == 1:
        return dts.pop()
    if np.dtype(jnp.float64) in dts:
        return np.dtype(jnp.float64)
    return np.dtype(jnp.float32)


def accumulation_dtype(*dtypes) -> np.dtype:
    """float64 if any operand is float64, else float32 (low precision accumulates in float32)."""
    if np.dtype(jnp.float64) in {np.dtype(d) for d in dtypes}:
        return np.dtype(jnp.float64)
    return np.dtype(jnp.float32)


def concrete_value(x) -> np.ndarray | None:
    """``x`` as a NumPy array if its value is known now (not traced), else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def first_position(bad: np.ndarray) -> tuple[int, ...]:
    """The index of the first ``True`` entry of ``bad`` (row-major), as a tuple of ints."""
    return tuple(int(p) for p in np.argwhere(bad)[0])


def check_index_values(name: str, idx, n: int, what: str, *, from_end: bool = True) -> None:
    """Raises ``IndexError`` if a concrete ``idx`` holds a value outside its range.

    The range is ``[-n, n)`` (negative values count from the end) or, with
    ``from_end=False``, ``[0, n)``.  A traced ``idx`` is not checked.
    """
    value = concrete_value(idx)
    if value is None or value.size == 0:
        return
    lo = -n if from_end else 0
    bad = (value < lo) | (value >= n)
    if bad.any():
        pos = first_position(bad)
        raise IndexError(
            f"{name} holds {int(value[pos])} at position {pos}, out of range for "
            f"{what}={n} (valid values are {lo} <= {name} < {n})"
        )


def take(table: jax.Array, idx: jax.Array, **kwargs) -> jax.Array:
    """``table[idx]`` (along axis 0); on an ``Explicit`` mesh sharded like ``idx``.

    ``kwargs`` go to ``.at[idx].get`` (``mode``, ``fill_value``).
    """
    sharding = getattr(jax.typeof(idx), "sharding", None)
    spec = tuple(getattr(sharding, "spec", ()))
    if any(s is not None for s in spec):
        out = P(*spec, *([None] * (idx.ndim - len(spec))), *([None] * (table.ndim - 1)))
        kwargs["out_sharding"] = NamedSharding(sharding.mesh, out)
    return table.at[idx].get(**kwargs)


def probe_gather(n: int, probe: jax.Array) -> jax.Array:
    """``valid[k] = 0 <= probe[k] < n`` as a ``fill``-mode gather that checkify instruments.

    With ``n == 0`` (no blocks) every entry is invalid and there is nothing to
    gather from: all ``False``, which checkify does not report.
    """
    if n == 0:
        return jnp.zeros(probe.shape, jnp.bool_)
    ones = jnp.ones((n,), jnp.bool_)
    return take(ones, probe, mode="fill", fill_value=False, wrap_negative_indices=False)


def normalize_index(idx: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Maps block indices of any integer dtype to ``(int32 index in [0, n), valid mask)``.

    Negative entries count from the end.  Entries outside ``[-n, n)`` come back
    as index 0 with ``valid == False``; the caller masks their contribution.
    """
    info = jnp.iinfo(idx.dtype)
    ok = jnp.ones(idx.shape, jnp.bool_)
    if n <= info.max:
        ok &= idx < n
    if info.min < 0 and -n >= info.min:
        ok &= idx >= -n
    # Every valid entry fits in int32 now; invalid ones are parked at 0.
    safe = jnp.where(ok, idx, jnp.zeros((), idx.dtype)).astype(jnp.int32)
    safe = jnp.where(safe < 0, safe + n, safe)
    # The probe carries the offending raw value (clipped to int32) so that
    # checkify's message shows it.
    i32 = jnp.iinfo(jnp.int32)
    lo = max(int(info.min), int(i32.min))
    hi = min(int(info.max), int(i32.max))
    raw = jnp.clip(idx, jnp.asarray(lo, idx.dtype), jnp.asarray(hi, idx.dtype)).astype(jnp.int32)
    raw = jnp.where((raw >= 0) & (raw < n), jnp.int32(-1), raw)  # a wrapped value stays invalid
    valid = probe_gather(n, jnp.where(ok, safe, raw))
    return safe, valid


def static_int(name: str, value, *, hint: str = "") -> int:
    """``value`` as a Python int fixed at trace time; a traced value says how to mark it static."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python int, fixed at trace time; got a traced value "
            f"({type(value).__name__}). Under jax.jit mark it static, e.g. "
            f"jax.jit(f, static_argnames={name!r}){hint}"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int; got {type(value).__name__} {value!r}")
    return int(value)
