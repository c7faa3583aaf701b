"""Decoding with the adaptive softmax: the most probable output, and the exact top k.

Both are one best-first search.  The head gives every shortlist output's
log-probability and, for each tail cluster, a bound: no output of cluster
``i`` is more probable than the cluster itself, ``head[S + i]``.  The search
keeps a running top k per example (the shortlist's, to begin with) and
evaluates cluster ``i`` only for the examples whose bound beats their current
k-th best - for ``k = 1`` and an example whose head prefers a shortlist output,
none (PyTorch's ``predict`` trick).  A cluster is evaluated in blocks of at
most ``_CHUNK_ELEMENTS`` logits (rows of examples by columns of outputs, with a
running log-sum-exp and a running top k), so ``(batch, n_outputs)`` is never
built, however large a cluster is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from blocksparse_jax.adaptive._log_space import head_log_probs, projection
from blocksparse_jax.adaptive._params import AdaptiveSoftmaxParams, prepare

# A block of the search holds at most this many logits (16 MiB in float32).
_CHUNK_ELEMENTS = 1 << 22


def _cluster_top_k(hr, W, k: int, w: int, acc):
    """``(top log-softmax values, their columns)`` of ``hr @ W`` over ``W``'s columns, ``w`` at a time."""
    rows = hr.shape[0]
    size = W.shape[1]
    n_blocks = -(-size // w)
    kk = min(k, size)

    def block(m, carry):
        run_max, run_sum, top_v, top_i = carry
        # The last block is shifted back to stay in bounds; columns seen before are masked.
        start = jnp.minimum(m * w, size - w)
        cols = start + jnp.arange(w, dtype=jnp.int32)
        logits = jnp.dot(
            hr, lax.dynamic_slice_in_dim(W, start, w, axis=1), preferred_element_type=acc
        )
        logits = jnp.where((cols >= m * w)[None, :], logits, -jnp.inf)
        new_max = jnp.maximum(run_max, jnp.max(logits, axis=1))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=1
        )
        v, pos = lax.top_k(jnp.concatenate([top_v, logits], axis=1), kk)
        ids = jnp.concatenate([top_i, jnp.broadcast_to(cols, (rows, w))], axis=1)
        return new_max, run_sum, v, jnp.take_along_axis(ids, pos, axis=1)

    init = (
        jnp.full((rows,), -jnp.inf, acc),
        jnp.zeros((rows,), acc),
        jnp.full((rows, kk), -jnp.inf, acc),
        jnp.zeros((rows, kk), jnp.int32),
    )
    if n_blocks == 1:  # compiles faster than a loop of one step
        run_max, run_sum, top_v, top_i = block(0, init)
    else:
        run_max, run_sum, top_v, top_i = lax.fori_loop(0, n_blocks, block, init)
    return top_v - (run_max + jnp.log(run_sum))[:, None], top_i


def _visit_cluster(vals, idx, bound, h, W, first: int, acc):
    """Merges one tail cluster into the running top k of the examples that need it.

    ``bound`` ``(batch,)`` is the cluster's log-probability; ``h`` ``(batch, d)``
    the projections, ``W`` the cluster's output weights, ``first`` its first id.
    """
    batch, k = vals.shape
    size = W.shape[1]
    # Ties keep the lower id (the running top k comes first in every merge), so
    # an example needs the cluster only if the bound is strictly better.
    need = bound > vals[:, k - 1]
    order = jnp.argsort(~need, stable=True).astype(jnp.int32)
    count = jnp.sum(need, dtype=jnp.int32)
    rows = max(1, min(batch, _CHUNK_ELEMENTS // size))
    w = min(size, _CHUNK_ELEMENTS // rows)

    def chunk(state):
        j, vals, idx = state
        slot = j * rows + jnp.arange(rows, dtype=jnp.int32)
        ok = slot < count
        r = order[jnp.minimum(slot, batch - 1)]
        hr = jnp.where(ok[:, None], h[r], jnp.zeros((), h.dtype))
        cand_v, cand_i = _cluster_top_k(hr, W, k, w, acc)
        v, pos = lax.top_k(jnp.concatenate([vals[r], cand_v + bound[r][:, None]], axis=1), k)
        ids = jnp.take_along_axis(jnp.concatenate([idx[r], cand_i + first], axis=1), pos, 1)
        dest = jnp.where(ok, r, batch)  # padding slots write the spare last row
        return j + 1, vals.at[dest].set(v), idx.at[dest].set(ids)

    spare = lambda a: jnp.concatenate([a, a[:1]], axis=0)  # row ``batch``: padding writes
    init = (jnp.zeros((), jnp.int32), spare(vals), spare(idx))
    if rows == batch:  # one chunk: evaluated for every example, without a loop
        _, vals, idx = chunk(init)
    else:
        _, vals, idx = lax.while_loop(lambda s: s[0] * rows < count, chunk, init)
    return vals[:batch], idx[:batch]


def _search(x, params: AdaptiveSoftmaxParams, k: int, acc):
    """``(batch, k)`` best log-probabilities and output ids, in decreasing order."""
    x, params = lax.stop_gradient((x, params))
    S = params.shortlist_size
    head = head_log_probs(x, params, acc)
    k0 = min(k, S)
    vals, idx = lax.top_k(head[:, :S], k0)
    idx = idx.astype(jnp.int32)
    if x.shape[0] == 0:  # an empty batch
        return jnp.zeros((0, k), acc), jnp.zeros((0, k), jnp.int32)
    if k0 < k:  # filled by the clusters (every finite log-probability beats -inf)
        vals = jnp.pad(vals, ((0, 0), (0, k - k0)), constant_values=-jnp.inf)
        idx = jnp.pad(idx, ((0, 0), (0, k - k0)), constant_values=-1)
    for i, first in enumerate(params.cutoffs):
        h, W = projection(x, params, i, acc)
        vals, idx = _visit_cluster(vals, idx, head[:, S + i], h, W, first, acc)
    return vals, idx


@functools.partial(jax.jit, static_argnames=("k", "acc", "ids_only"))
def _search_jit(x, params, *, k, acc, ids_only):
    with jax.named_scope("adaptive_softmax_predict" if ids_only else "adaptive_softmax_top_k"):
        vals, idx = _search(x, params, k, acc)
        return idx[:, 0] if ids_only else (vals, idx)


def adaptive_softmax_top_k(
    x: ArrayLike, params: AdaptiveSoftmaxParams, k: int
) -> tuple[jax.Array, jax.Array]:
    r"""The ``k`` most probable outputs of each example, exactly, without materialising them all.

    A best-first search: the shortlist's top ``k`` come from the head, and
    tail cluster ``i`` is evaluated only for the examples whose cluster
    log-probability ``head[S + i]`` (a bound on every output in it) beats their
    current ``k``-th best.  A confident model rarely opens a cluster; a flat
    one opens them all.  Clusters are evaluated in blocks of at most 4M logits
    (a running log-sum-exp and top ``k`` over the columns), so memory is
    ``O(batch * k)`` plus one block, however large ``n_outputs`` is.

    This is a search for decoding: its outputs carry no gradient (take
    :func:`adaptive_log_softmax` at the returned ids for one).  Ties between
    equal log-probabilities go to the lower output id, as in ``lax.top_k``.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`AdaptiveSoftmaxParams`.
      k: number of outputs to return, in ``[1, n_outputs]``.

    Returns:
      ``(log_probs, indices)``, both ``(batch, k)`` (``(k,)`` for a 1-D ``x``),
      sorted by decreasing log-probability; ``log_probs`` float32 (float64 if
      any input is float64), ``indices`` int32 output ids.

    Raises:
      TypeError: a ``k`` that is not an int, and everything
        :func:`adaptive_log_softmax` raises.
      ValueError: ``k`` outside ``[1, n_outputs]``, bad shapes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import adaptive_log_softmax, adaptive_softmax_init, adaptive_softmax_top_k
      >>> params = adaptive_softmax_init(jax.random.key(0), 16, 200, [20, 80])
      >>> x = 3 * jax.random.normal(jax.random.key(1), (4, 16))
      >>> logp, idx = adaptive_softmax_top_k(x, params, 5)
      >>> ref_logp, ref_idx = jax.lax.top_k(adaptive_log_softmax(x, params), 5)
      >>> bool(jnp.all(idx == ref_idx)), bool(jnp.allclose(logp, ref_logp, atol=1e-5))
      (True, True)
    """
    x, params, batched, acc = prepare(x, params)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int; got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= params.n_outputs:
        raise ValueError(f"k must be in [1, n_outputs] = [1, {params.n_outputs}]; got k={k}")
    vals, idx = _search_jit(x, params, k=k, acc=acc, ids_only=False)
    return (vals, idx) if batched else (vals[0], idx[0])


def adaptive_softmax_predict(x: ArrayLike, params: AdaptiveSoftmaxParams) -> jax.Array:
    r"""The most probable output of each example (PyTorch's ``predict``), exactly.

    ``argmax_o log p(o | x)``, lower ids winning ties, as
    ``adaptive_log_softmax(x, params).argmax(-1)`` - but a tail cluster is
    evaluated only for the examples whose cluster is more probable than their
    best output so far: an example whose head prefers a shortlist output costs
    the head alone, and ``(batch, n_outputs)`` is never built.  The
    :func:`adaptive_softmax_top_k` search with ``k = 1``.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`AdaptiveSoftmaxParams`.

    Returns:
      ``(batch,)`` int32 output ids (a scalar for a 1-D ``x``).

    Raises:
      TypeError, ValueError: as :func:`adaptive_log_softmax`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import adaptive_log_softmax, adaptive_softmax_init, adaptive_softmax_predict
      >>> params = adaptive_softmax_init(jax.random.key(0), 16, 200, [20, 80])
      >>> x = 3 * jax.random.normal(jax.random.key(1), (6, 16))
      >>> ids = adaptive_softmax_predict(x, params)
      >>> ids.dtype, bool(jnp.all(ids == adaptive_log_softmax(x, params).argmax(-1)))
      (dtype('int32'), True)
    """
    x, params, batched, acc = prepare(x, params)
    ids = _search_jit(x, params, k=1, acc=acc, ids_only=True)
    return ids if batched else ids[0]
