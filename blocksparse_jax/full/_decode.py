"""Decoding with the exact softmax: the top k and samples, a chunk of outputs at a time.

Both walk the outputs in the chunks of the loss (:mod:`._core`), keeping per
example a running log-sum-exp and either a running top ``k`` or a running
Gumbel-max, so ``(batch, n_outputs)`` is never built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from blocksparse_jax._scope import named
from blocksparse_jax.full import _core
from blocksparse_jax.full._loss import make_plan
from blocksparse_jax.full._params import FullSoftmaxParams, prepare


def _masked_chunk(x, W, b, k, plan: _core.Plan):
    """Chunk ``k``'s ``(column ids, logits)``, ``-inf`` on the columns an earlier chunk holds."""
    start, _, z = _core.chunk_logits(x, W, b, k, plan)
    cols = start + jnp.arange(plan.chunk, dtype=jnp.int32)
    if plan.ragged:
        z = jnp.where(plan.fresh(k)[None, :], z, jnp.full((), -jnp.inf, z.dtype))
    return cols, z


def _online_lse(m, s, z):
    """The running ``(max, sum)`` of ``exp`` updated with the logits ``z``."""
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    return m_new, s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)


def _top_k(x, W, b, k: int, plan: _core.Plan):
    """``(batch, k)`` best log-probabilities and their ids, in decreasing order."""
    _, acc = _core.dtypes(x, W, b)
    batch = x.shape[0]

    def body(j, state):
        m, s, vals, ids = state
        cols, z = _masked_chunk(x, W, b, j, plan)
        m, s = _online_lse(m, s, z)
        # The running top k comes first: ties keep the lower id.
        vals, pos = lax.top_k(jnp.concatenate([vals, z], axis=1), k)
        ids = jnp.take_along_axis(
            jnp.concatenate([ids, jnp.broadcast_to(cols, (batch, plan.chunk))], axis=1), pos, 1
        )
        return m, s, vals, ids

    init = _core.carry(
        (
            jnp.full((batch,), -jnp.inf, acc),
            jnp.zeros((batch,), acc),
            jnp.full((batch, k), -jnp.inf, acc),
            jnp.zeros((batch, k), jnp.int32),
        ),
        x,
        W,
    )
    m, s, vals, ids = _core.loop(body, init, plan.n_chunks)
    return vals - (m + jnp.log(s))[:, None], ids


def _sample(key, x, W, b, plan: _core.Plan):
    """``(batch,)`` ids drawn by Gumbel-max: ``argmax_o z[o] + g[o]``, ``g`` Gumbel noise."""
    _, acc = _core.dtypes(x, W, b)
    batch = x.shape[0]

    def body(j, state):
        best, best_id = state
        cols, z = _masked_chunk(x, W, b, j, plan)
        noise = jax.random.gumbel(jax.random.fold_in(key, j), z.shape, acc)
        score = z + noise
        pos = jnp.argmax(score, axis=1)
        top = jnp.take_along_axis(score, pos[:, None], axis=1)[:, 0]
        better = top > best
        return jnp.where(better, top, best), jnp.where(better, cols[pos], best_id)

    init = _core.carry((jnp.full((batch,), -jnp.inf, acc), jnp.zeros((batch,), jnp.int32)), x, W)
    return _core.loop(body, init, plan.n_chunks)[1]


@functools.partial(jax.jit, static_argnames=("k", "plan"))
def _top_k_jit(x, W, b, *, k, plan):
    with jax.named_scope("full_softmax_top_k"):
        x, W, b = lax.stop_gradient((x, W, b))
        return _top_k(x, W, b, k, plan)


@functools.partial(jax.jit, static_argnames=("plan",))
def _sample_jit(key, x, W, b, *, plan):
    with jax.named_scope("full_softmax_sample"):
        x, W, b = lax.stop_gradient((x, W, b))
        return _sample(key, x, W, b, plan)


@named
def full_softmax_top_k(
    x: ArrayLike,
    params: FullSoftmaxParams,
    k: int,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""The ``k`` most probable outputs of each example, exactly, without the logits in memory.

    The outputs are walked in chunks of ``chunk_size`` columns with a running
    log-sum-exp and a running top ``k`` (``lax.top_k`` of the best so far and
    the chunk's logits), so memory is ``O(batch * (k + chunk_size))``.  Ties
    between equal log-probabilities go to the lower output id.

    This is a search for decoding: its outputs carry no gradient (take
    :func:`full_log_softmax` at the returned ids for one).

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`FullSoftmaxParams` or :class:`FullSoftmaxRowParams`.
      k: number of outputs to return, in ``[1, n_outputs]``.
      softcap: optional positive float, as in :func:`full_log_softmax`.
      chunk_size: optional columns per chunk, as in :func:`full_log_softmax`.

    Returns:
      ``(log_probs, indices)``, both ``x.shape[:-1] + (k,)``, sorted by
      decreasing log-probability; ``log_probs`` float32 (float64 if any input
      is float64), ``indices`` int32 output ids.

    Raises:
      TypeError: a ``k`` that is not an int, and everything
        :func:`full_log_softmax` raises.
      ValueError: ``k`` outside ``[1, n_outputs]``, bad shapes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import full_log_softmax, full_softmax_init, full_softmax_top_k
      >>> params = full_softmax_init(jax.random.key(0), 16, 1000)
      >>> x = 3 * jax.random.normal(jax.random.key(1), (4, 16))
      >>> logp, idx = full_softmax_top_k(x, params, 5, chunk_size=256)
      >>> ref_logp, ref_idx = jax.lax.top_k(full_log_softmax(x, params), 5)
      >>> bool(jnp.all(idx == ref_idx)), bool(jnp.allclose(logp, ref_logp, atol=1e-5))
      (True, True)
    """
    x, params, lead = prepare(x, params)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int; got {type(k).__name__} {k!r}")
    k = int(k)
    if not 1 <= k <= params.n_outputs:
        raise ValueError(f"k must be in [1, n_outputs] = [1, {params.n_outputs}]; got k={k}")
    plan = make_plan(x.shape[0], params.n_outputs, chunk_size, softcap, rows=params.rows)
    vals, ids = _top_k_jit(x, params.W, params.b, k=k, plan=plan)
    return vals.reshape(lead + (k,)), ids.reshape(lead + (k,))


@named
def full_softmax_sample(
    key: jax.Array,
    x: ArrayLike,
    params: FullSoftmaxParams,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    r"""Exact samples from the softmax over every output, one per example.

    Gumbel-max over the chunks: ``argmax_o z[o] + g[o]`` with independent
    Gumbel noise ``g``, which is distributed as ``softmax(z)``.  Each chunk of
    ``chunk_size`` columns draws its own noise (from ``fold_in(key, chunk)``)
    and updates a running best, so ``(batch, n_outputs)`` is never built; the
    same key and ``chunk_size`` give the same samples.

    Args:
      key: a PRNG key.
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`FullSoftmaxParams` or :class:`FullSoftmaxRowParams`.
      softcap: optional positive float, as in :func:`full_log_softmax`.
      chunk_size: optional columns per chunk, as in :func:`full_log_softmax`.

    Returns:
      ``x.shape[:-1]`` int32 output ids.

    Raises:
      TypeError, ValueError: as :func:`full_log_softmax`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import full_softmax_init, full_softmax_sample
      >>> params = full_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (5, 8))
      >>> ids = full_softmax_sample(jax.random.key(2), x, params)
      >>> ids.shape, ids.dtype, bool(jnp.all((ids >= 0) & (ids < 100)))
      ((5,), dtype('int32'), True)
    """
    x, params, lead = prepare(x, params)
    plan = make_plan(x.shape[0], params.n_outputs, chunk_size, softcap, rows=params.rows)
    return _sample_jit(key, x, params.W, params.b, plan=plan).reshape(lead)
