"""``embedding_lookup``: rows of a table, with a gradient that holds only the rows read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _checks, _sparse_trace
from blocksparse_jax._scope import named


def _lookup(table, ids):
    """``table[ids]``, a row of zeros for an id outside ``[0, n)``."""
    return jnp.take(table, ids, axis=0, mode="fill", fill_value=0)


@named
def embedding_lookup(table: ArrayLike, ids: ArrayLike) -> jax.Array:
    r"""The rows ``table[ids]`` of an embedding table.

    ::

        out[..., :] = table[ids[...], :]

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
      ``[0, n_rows)`` reads a row of zeros and gets no gradient.

    Raises:
      TypeError: a non-float ``table`` or non-integer ``ids``.
      ValueError: a ``table`` that is not 2-D.
      IndexError: a concrete (not traced) id outside ``[0, n_rows)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import embedding_lookup
      >>> table = jnp.arange(8.0).reshape(4, 2)
      >>> embedding_lookup(table, jnp.array([[3, 0]]))
      Array([[[6., 7.],
              [0., 1.]]], dtype=float32)
    """
    table = _checks.as_array("table", table)
    ids = _checks.as_array("ids", ids)
    _checks.check_float("table", table)
    _checks.check_ndim("table", table, 2, "(n_rows, dim)")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"ids must be an integer array of row indices; got dtype {ids.dtype}. "
            "Cast it with ids.astype(jnp.int32)."
        )
    _checks.check_index_values("ids", ids, table.shape[0], "n_rows", from_end=False)
    rec = _sparse_trace.claimant(table)
    if rec is not None:
        return rec.handle("embedding_lookup", table, ids)
    return _lookup(table, ids)
