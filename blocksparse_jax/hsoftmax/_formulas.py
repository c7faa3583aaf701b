"""The two-level softmax's formulas on arrays: logits, activations, masks, log-softmaxes.

Shape letters: ``batch``; ``n_in`` the input width; ``n_classes``;
``n_outputs_per_class``.  :class:`~blocksparse_jax.hsoftmax._problem.Problem`
combines them into log-probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from blocksparse_jax import _checks
from blocksparse_jax.blocksparse import sparse_block_dot


def dtypes(x, W1, b1, W2, b2):
    """``(common dtype, accumulation dtype)`` of the inputs."""
    dts = (x.dtype, W1.dtype, b1.dtype, W2.dtype, b2.dtype)
    return _checks.common_float_dtype(*dts), _checks.accumulation_dtype(*dts)


def class_logits(x, W1, b1, acc) -> jax.Array:
    """``x @ W1 + b1`` as ``(batch, n_classes)`` in ``acc``."""
    dt = _checks.common_float_dtype(x.dtype, W1.dtype)
    logits = jnp.dot(x.astype(dt), W1.astype(dt), preferred_element_type=acc)
    return logits + b1.astype(acc)[None, :]


def target_activations(x, W2, b2, classes, acc) -> jax.Array:
    """``x[b] @ W2[classes[b]] + b2[classes[b]]`` as ``(batch, n_outputs_per_class)``.

    Theano's ``sparse_block_dot(W2.dimshuffle('x', 0, 1, 2), x.dimshuffle(0, 'x', 1),
    zeros((batch, 1)), b2, classes.dimshuffle(0, 'x'))``: one input block, the
    class as the output block.  ``classes`` may also be ``(batch, m)`` for ``m``
    classes per example; the result is then ``(batch, m, n_outputs_per_class)``.
    """
    idx = classes if classes.ndim == 2 else classes[:, None]
    zeros = jnp.zeros((x.shape[0], 1), jnp.int32)
    out = sparse_block_dot(W2[None], x[:, None, :], zeros, b2.astype(acc), idx)
    return out if classes.ndim == 2 else out[:, 0, :]


def all_activations(x, W2, b2, acc) -> jax.Array:
    """Every class's second-level activations, ``(batch, n_classes, n_outputs_per_class)``."""
    dt = _checks.common_float_dtype(x.dtype, W2.dtype)
    act = jnp.einsum("bs,cst->bct", x.astype(dt), W2.astype(dt), preferred_element_type=acc)
    return act + b2.astype(acc)[None]


def class_valid(n_classes: int, per_class: int, n_outputs: int, class_sizes) -> jax.Array:
    """``(n_classes,)`` bool: does the class hold at least one output."""
    ok = jnp.arange(n_classes, dtype=jnp.int32) * per_class < n_outputs
    if class_sizes is not None:
        ok &= class_sizes > 0
    return ok


def masked_log_softmax(logits, valid) -> jax.Array:
    """``log_softmax`` over the last axis with the invalid entries at ``-inf``.

    A row with no valid entry (an empty class, whose own log-probability is
    ``-inf``) is left unmasked so that it stays finite instead of NaN.
    """
    keep = valid | ~jnp.any(valid, axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)


def neg_inf_where_invalid(logp, valid) -> jax.Array:
    return jnp.where(valid, logp, jnp.full((), -jnp.inf, logp.dtype))


def take_rows(a, idx):
    """``a[b, idx[b]]`` for ``a (batch, n)`` and ``idx (batch,)``."""
    return jnp.take_along_axis(a, idx[:, None], axis=1)[:, 0]


def select_rows(a, idx):
    """``a[b, idx[b]]`` as :func:`take_rows`, by selection over the row (no gather).

    For narrow rows; it keeps index checks out of the code it is in (checkify
    cannot combine a check after a ``shard_map`` with the checks inside it).
    """
    hit = lax.broadcasted_iota(idx.dtype, a.shape, 1) == idx[:, None]
    return jnp.sum(jnp.where(hit, a, jnp.zeros((), a.dtype)), axis=1)
