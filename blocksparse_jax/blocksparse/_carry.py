"""Loop carries inside ``shard_map``: keep a carry's type as the loop body makes it vary.

Inside ``shard_map`` every value has a set of mesh axes it varies over, and a
loop carry must keep one type from iteration to iteration.  A fresh ``zeros``
is invariant while a body that reads a sharded ``W`` makes it vary, so the
loops of the strategies (and the parallel ops) cast their carries first.
Outside ``shard_map`` all of this is a no-op.
"""

from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_over(x, axes):
    """``x`` cast to vary over every ``shard_map`` mesh axis in ``axes`` (a no-op for none)."""
    missing = tuple(sorted(frozenset(axes) - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def carry(init, *refs):
    """``init`` (a tuple) cast to vary over the ``shard_map`` axes that ``refs`` vary over."""
    axes = frozenset().union(*(varying_axes(r) for r in refs))
    return tuple(vary_over(x, axes) for x in init)
