"""Mesh plumbing shared by the parallel functions: checks, placement, ``shard_map``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from blocksparse_jax import _checks
from blocksparse_jax.blocksparse import vary_over


def check_mesh(mesh, data_axis, model_axis) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((2, 4), ('data', 'model'))); "
            f"got {type(mesh).__name__}"
        )
    for kind, axis in (("data_axis", data_axis), ("model_axis", model_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(
                f"{kind}={axis!r} is not an axis of the mesh, whose axes are {mesh.axis_names}; "
                f"pass {kind}= one of them (or None to not split over it)"
            )
    if data_axis is not None and data_axis == model_axis:
        raise ValueError(f"data_axis and model_axis must differ; both are {data_axis!r}")


def size(mesh: Mesh, axis) -> int:
    return 1 if axis is None else mesh.shape[axis]


def check_divisible(what: str, n: int, mesh: Mesh, axis, fix: str) -> None:
    k = size(mesh, axis)
    if n % k:
        raise ValueError(
            f"{what}={n} is not divisible by the size {k} of mesh axis {axis!r}, over which it "
            f"is split; {fix}"
        )


def place(mesh: Mesh, x: jax.Array, spec: P) -> jax.Array:
    """On a mesh with ``Explicit`` axes, reshards ``x`` to ``spec`` (``shard_map`` does not)."""
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, NamedSharding(mesh, spec))
    return x


def vary(axes: tuple, *xs):
    """Marks each ``x`` as varying over all ``axes`` inside ``shard_map``.

    The core ops are ``custom_vjp`` functions, whose backward pass must return
    cotangents typed like the primal inputs; making every input vary over the
    axes the outputs vary over lets it.  The transpose of this cast is a
    ``psum``: for a weight shard that is the data-parallel reduction of its own
    blocks' gradient, for the activations the sum over the model shards.
    """
    out = tuple(vary_over(x, axes) for x in xs)
    return out[0] if len(out) == 1 else out


def shard_map(mesh, body, in_specs, out_specs, args):
    """``shard_map(body)(*args)``, jitted.

    The outer ``jit``: an eager ``shard_map`` would compile op by op.  The inner
    one: ``checkify`` instruments a ``shard_map`` whose body is a ``jit`` call
    (with the bare body, JAX 0.10's checkify rule for ``shard_map`` fails).
    """
    args = [place(mesh, a, s) for a, s in zip(args, in_specs, strict=True)]
    f = jax.shard_map(jax.jit(body), mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs)
    return jax.jit(f)(*args)


def local_index(
    safe: jax.Array, valid: jax.Array, n_local: int, model_axis
) -> tuple[jax.Array, jax.Array]:
    """Global block indices (normalised: ``safe, valid``) -> ``(local index, mine)`` on this shard.

    ``mine`` is ``False`` for an index another shard owns, or an invalid one;
    its local index is then 0, a valid block, and the caller zeroes that slot's
    contribution (an out-of-range sentinel would make checkify report every
    other shard's index).
    """
    local = safe if model_axis is None else safe - lax.axis_index(model_axis) * n_local
    mine = valid & (local >= 0) & (local < n_local)
    return jnp.where(mine, local, 0), mine


def validate_op(fn, args, index_checks) -> None:
    """The single-device op's own trace-time checks (same messages), then concrete index values.

    The op is traced on bare shapes and dtypes (no sharding), which runs its
    static checks and nothing else.
    """
    jax.eval_shape(fn, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    for name, idx, n, what in index_checks:
        _checks.check_index_values(name, idx, n, what)


def require_batched(name: str, x: jax.Array, desc: str) -> None:
    if x.ndim != 3:
        raise ValueError(
            f"{name} must be 3-D {desc} for the parallel ops (the batch axis is split over the "
            f"data axis); got shape {_checks.shape_str(x.shape)}. For one example, add a batch "
            f"axis of 1 and use data_axis=None."
        )
