"""``embedding_lookup``: rows of a table, with a gradient that holds only the rows read."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _checks
from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax._scope import named


@dataclasses.dataclass(frozen=True)
class RowsRule(sites.SparseRule):
    """The table's gradient: the cotangent of each looked-up row, added to that row."""

    def layout(self, weight_shape):
        return sites.BlockLayout.leading(weight_shape, 1)

    def pairs(self, cotangent, ids, valid):
        rows = jnp.where(valid, ids, -1).reshape(-1)  # -1: no row
        return sites.BlockPairs(rows, None, cotangent.reshape(rows.shape[0], -1))


def lookup_rows(table, ids, valid) -> jax.Array:
    """``table[ids]`` where ``valid``, zeros (by selection) elsewhere; ``ids`` in range.

    From a table sharded over an ``Explicit`` mesh the rows come out sharded
    like ``ids`` (each device gathers the rows it holds; XLA sums them).
    """
    kw = {}
    if _explicit_spec(table) is not None:
        ids_spec = _explicit_spec(ids) or ()
        ids_spec += (None,) * (ids.ndim - len(ids_spec))
        kw["out_sharding"] = jax.sharding.NamedSharding(
            jax.typeof(table).sharding.mesh, jax.sharding.PartitionSpec(*ids_spec, None)
        )
    rows = table.at[ids].get(mode="clip", **kw)
    return jnp.where(valid[..., None], rows, jnp.zeros((), rows.dtype))


def _explicit_spec(x) -> tuple | None:
    """The partition spec of ``x``'s type if it is sharded over an ``Explicit`` mesh, else ``None``."""
    spec = tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", ()))
    return spec if any(s is not None for s in spec) else None


def valid_ids(ids: jax.Array, n_rows: int) -> tuple[jax.Array, jax.Array]:
    """``(ids as int32 in [0, n_rows), valid)``: an id outside ``[0, n_rows)`` is parked at 0, invalid."""
    info = jnp.iinfo(ids.dtype)
    valid = ids >= 0 if info.min < 0 else jnp.ones(ids.shape, jnp.bool_)
    if n_rows <= info.max:
        valid &= ids < n_rows
    safe = jnp.where(valid, ids, jnp.zeros((), ids.dtype)).astype(jnp.int32)
    return safe, valid


@named
def embedding_lookup(table: ArrayLike, ids: ArrayLike) -> jax.Array:
    r"""The rows ``table[ids]`` of an embedding table.

    ```
    out[..., :] = table[ids[...], :]
    ```

    Under :func:`~blocksparse_jax.value_and_sparse_grad` the gradient of
    ``table`` is a :class:`~blocksparse_jax.SparseBlockGrad` of the rows read
    (one block per row), so that :func:`blocksparse_jax.optim.lazy` updates
    only those rows, as ``torch.nn.Embedding(sparse=True)`` with
    ``torch.optim.SparseAdam``.  Under ``jax.grad`` the gradient is the usual
    dense one.

    Args:
      table: ``(n_rows, dim)`` float table.
      ids: integer array of any shape, entries in ``[0, n_rows)``.

    Returns:
      ``(*ids.shape, dim)`` in ``table``'s dtype.  Under ``jit`` an id outside
      ``[0, n_rows)`` (a negative padding id such as ``-1`` included) reads a
      row of zeros and gives no row a gradient.

    Raises:
      TypeError: a non-float ``table`` or non-integer ``ids``.
      ValueError: a ``table`` that is not 2-D.
      IndexError: a concrete (not traced) id outside ``[0, n_rows)``, or a
        NumPy / Python id beyond the int32 range JAX would store it in.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import embedding_lookup
      >>> table = jnp.arange(8.0).reshape(4, 2)
      >>> embedding_lookup(table, jnp.array([[3, 0]]))
      Array([[[6., 7.],
              [0., 1.]]], dtype=float32)
      >>> jax.jit(embedding_lookup)(table, jnp.array([-1, 2]))   # -1: padding
      Array([[0., 0.],
             [4., 5.]], dtype=float32)
    """
    table = _checks.as_array("table", table)
    ids = _checks.as_index_array("ids", ids)
    _checks.check_float("table", table)
    _checks.check_ndim("table", table, 2, "(n_rows, dim)")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"ids must be an integer array of row indices; got dtype {ids.dtype}. "
            "Cast it with ids.astype(jnp.int32)."
        )
    _checks.check_index_values("ids", ids, table.shape[0], "n_rows", from_end=False)
    safe, valid = valid_ids(ids, table.shape[0])
    w = sites.mark_weight(table)
    return sites.mark_use(lookup_rows(w, safe, valid), w, (safe, valid), RowsRule())
