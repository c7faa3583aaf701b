"""``in_batch_softmax_loss``: the two-tower softmax whose negatives are the batch's other items."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _checks, _targets
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named
from blocksparse_jax.full._params import check_option


@functools.partial(jax.jit, static_argnames=("temperature", "reduction"))
def _in_batch_jit(query, candidates, log_q, ids, mask, *, temperature, reduction):
    with jax.named_scope("in_batch_softmax_loss"):
        dt = _checks.common_float_dtype(query.dtype, candidates.dtype)
        acc = _checks.accumulation_dtype(query.dtype, candidates.dtype)
        # Rows that take no part are zeros before any arithmetic (a NaN there reaches nothing).
        query = jnp.where(mask[:, None], query, jnp.zeros((), query.dtype)).astype(dt)
        candidates = jnp.where(mask[:, None], candidates, jnp.zeros((), candidates.dtype))
        logits = jnp.dot(query, candidates.astype(dt).T, preferred_element_type=acc)
        logits = logits / jnp.asarray(temperature, acc)
        if log_q is not None:
            logits = logits - log_q.astype(acc)[None, :]
        batch = logits.shape[0]
        own = jnp.eye(batch, dtype=jnp.bool_)
        negative = mask[None, :] & ~own
        if ids is not None:
            negative = negative & (ids[None, :] != ids[:, None])
        logits = jnp.where(negative | own, logits, jnp.full((), -jnp.inf, acc))
        logp = jnp.diagonal(logits) - jax.nn.logsumexp(logits, axis=1)
        return _targets.reduce_nll(logp, mask, reduction)


@named
def in_batch_softmax_loss(
    query: ArrayLike,
    candidates: ArrayLike,
    *,
    log_q: ArrayLike | None = None,
    candidate_ids: ArrayLike | None = None,
    temperature: float = 1.0,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Two-tower softmax loss with in-batch negatives and the log-Q correction.

    Example ``i``'s positive is ``candidates[i]``; the other rows' candidates
    are its negatives.  With ``log_q[j]`` the log of the probability that
    candidate ``j`` appears in a batch (its sampling probability; popular items
    are over-represented as negatives, and the correction removes that bias,
    Yi et al., 2019):

    ```
    logits[i, j] = query[i] . candidates[j] / temperature - log_q[j]
    loss[i]      = logsumexp_j logits[i, j] - logits[i, i]
    ```

    ``candidate_ids`` removes accidental hits: a row ``j != i`` holding the
    same item as ``i``'s positive is not a negative of ``i``.

    Args:
      query: ``(batch, d)`` query-tower embeddings.
      candidates: ``(batch, d)`` candidate-tower embeddings, row ``i`` the
        positive of ``query[i]``.
      log_q: optional ``(batch,)`` float log sampling probability of each
        candidate (e.g. ``log(count / total)`` of the item in the stream; a
        constant offset does not matter).
      candidate_ids: optional ``(batch,)`` integer item id of each candidate.
      temperature: positive float dividing the dot products.
      mask: optional ``(batch,)`` bool, ``False`` for padding rows: no loss,
        and not a negative of any other row.
      reduction: ``"mean"`` (over the unmasked rows), ``"sum"`` or ``"none"``.

    Returns:
      A scalar, or ``(batch,)`` for ``reduction="none"``; float32 (float64 if
      an input is float64).

    Raises:
      ValueError: shapes that do not match, an unknown ``reduction``, a
        ``temperature`` that is not positive.
      TypeError: non-float embeddings or ``log_q``, non-integer ids, a non-bool ``mask``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import in_batch_softmax_loss
      >>> q = jax.random.normal(jax.random.key(0), (4, 8))
      >>> c = q + 0.1 * jax.random.normal(jax.random.key(1), (4, 8))   # positives near their queries
      >>> ids = jnp.array([10, 11, 10, 12])                             # rows 0 and 2: the same item
      >>> loss = in_batch_softmax_loss(q, c, candidate_ids=ids, log_q=jnp.log(jnp.array([.5, .2, .5, .1])))
      >>> loss.shape, bool(loss > 0)
      ((), True)
    """
    _targets.check_reduction(reduction)
    query, candidates = _as_array("query", query), _as_array("candidates", candidates)
    for name, a in (("query", query), ("candidates", candidates)):
        _checks.check_float(name, a)
        _checks.check_ndim(name, a, 2, "(batch, d)")
    if candidates.shape != query.shape:
        raise ValueError(
            f"candidates must have the shape of query, (batch, d) = {_shape(query.shape)}; got "
            f"shape {_shape(candidates.shape)}"
        )
    batch = query.shape[0]
    if log_q is not None:
        log_q = _as_array("log_q", log_q)
        _checks.check_float("log_q", log_q)
        if log_q.shape != (batch,):
            raise ValueError(
                f"log_q must have shape (batch,) = {_shape((batch,))}; got shape "
                f"{_shape(log_q.shape)}"
            )
    if candidate_ids is not None:
        candidate_ids = _as_array("candidate_ids", candidate_ids)
        if not jnp.issubdtype(candidate_ids.dtype, jnp.integer):
            raise TypeError(
                f"candidate_ids must be an array of integer item ids; got dtype "
                f"{candidate_ids.dtype}"
            )
        if candidate_ids.shape != (batch,):
            raise ValueError(
                f"candidate_ids must have shape (batch,) = {_shape((batch,))}; got shape "
                f"{_shape(candidate_ids.shape)}"
            )
    temperature = check_option("temperature", temperature, low=0.0, open_low=True)
    mask = _targets.check_mask(mask, (batch,))
    return _in_batch_jit(
        query, candidates, log_q, candidate_ids, mask, temperature=temperature, reduction=reduction
    )
