"""A tail cluster's log-probabilities for the examples whose target is in it, and only those.

The examples are sorted by the cluster of their target (a stable argsort of
``batch`` cluster ids), and each tail cluster walks its own examples in chunks
of a fixed number of rows: chunk ``j`` holds the cluster's examples ``j * rows
.. (j + 1) * rows - 1``, the last one padded.  The shapes are static (``ceil(batch
/ rows)`` chunks of ``rows``); a ``lax.while_loop`` visits only the chunks that
hold examples (a batch that fits in one chunk is evaluated without a loop).  So
an example whose target is in the shortlist costs no tail work at all, a
cluster's work is that of its examples rounded up to a whole chunk, and no
``(batch, cluster_size)`` array is built, forward or backward.  Under
``jax.vmap`` the loop runs as long as the longest of the mapped batches needs.

Two custom-VJP operations carry the gradient:

* ``_cluster_values(h, W, buckets) -> (log_probs, lse)``, whose backward pass is
* ``_cluster_grads(h, W, buckets, lse, a, c) -> (dh, dW)``: a second while loop
  that recomputes each chunk's logits instead of storing them and accumulates
  the cluster's weight gradient in place.

``lax.while_loop`` has no reverse mode, so the backward pass of
``_cluster_grads`` (reached at second order, ``jax.grad`` of ``jax.grad``)
differentiates ``_grads_differentiable`` instead: the same computation as a
``lax.scan`` over every chunk with a ``lax.cond`` that skips the empty ones.  It
is exact but keeps ``O(batch * cluster_size)`` residuals; only derivatives of
the gradient pay for it.  Forward mode (``jax.jvp``, hence ``jax.hessian``,
which is forward-over-reverse) is not supported by custom VJPs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from blocksparse_jax import _checks

# A chunk holds about this many logits (8 MiB in float32: larger chunks fall
# out of the caches, smaller ones read the cluster's weights more often) and
# at most this many rows.
_CHUNK_ELEMENTS = 1 << 21
_CHUNK_ROWS = 64


def rows_per_chunk(batch: int, cluster_size: int) -> int:
    """The static number of rows of a chunk for a cluster of ``cluster_size`` outputs."""
    return max(1, min(batch, _CHUNK_ROWS, round(_CHUNK_ELEMENTS / max(1, cluster_size))))


class Buckets(NamedTuple):
    """The examples of one tail cluster, in chunks of ``rows`` (padding slots invalid).

    Attributes:
      rows: ``(n_chunks, rows)`` int32 example ids (a padding slot holds some valid id).
      valid: ``(n_chunks, rows)`` bool, whether the slot holds an example of the cluster.
      target: ``(n_chunks, rows)`` int32 target within the cluster (0 in padding slots).
    """

    rows: jax.Array
    valid: jax.Array
    target: jax.Array


def sort_into_buckets(
    cluster: jax.Array, local_target: jax.Array, n_clusters: int, chunk_rows: tuple[int, ...]
) -> list[Buckets]:
    """Groups the examples by ``cluster`` (0 for the head, ``1 .. n_clusters`` for the tails).

    Args:
      cluster: ``(batch,)`` int32 cluster of each example.
      local_target: ``(batch,)`` int32 target within its cluster.
      n_clusters: number of tail clusters.
      chunk_rows: the rows of a chunk, one per tail cluster.

    Returns:
      One :class:`Buckets` per tail cluster.
    """
    batch = cluster.shape[0]
    order = jnp.argsort(cluster, stable=True).astype(jnp.int32)
    counts = jnp.sum(
        cluster[None, :] == jnp.arange(n_clusters + 1, dtype=jnp.int32)[:, None],
        axis=1,
        dtype=jnp.int32,
    )
    starts = jnp.cumsum(counts) - counts
    out = []
    for i, rows in enumerate(chunk_rows, start=1):
        n_chunks = -(-batch // rows)
        slot = jnp.arange(n_chunks * rows, dtype=jnp.int32)
        valid = slot < counts[i]
        ids = order[jnp.minimum(starts[i] + slot, batch - 1)]
        t = jnp.where(valid, local_target[ids], jnp.zeros((), jnp.int32))
        out.append(Buckets(*(a.reshape(n_chunks, rows) for a in (ids, valid, t))))
    return out


def _chunk_logits(h, W, rows, valid, acc):
    """``(hr, logits)`` of a chunk: ``hr = h[rows]`` with padding slots zeroed, ``hr @ W``."""
    hr = jnp.where(valid[:, None], h[rows], jnp.zeros((), h.dtype))
    return hr, jnp.dot(hr, W, preferred_element_type=acc)


def _logits_cotangent(logits, lse, target, a, c, valid):
    """The cotangent of a chunk's logits, given those of its log-probabilities and logsumexps.

    With ``p = softmax(logits)``, ``out = logits[target] - lse`` has cotangent
    ``a`` and ``lse`` has cotangent ``c``: ``G = a * onehot(target) + (c - a) * p``.
    """
    p = jnp.exp(logits - lse[:, None])
    G = (c - a)[:, None] * p
    G = G.at[jnp.arange(G.shape[0]), target].add(a)
    return jnp.where(valid[:, None], G, jnp.zeros((), G.dtype))


def _over_used_chunks(body, init, buckets: Buckets):
    """``state = body(j, state)`` for the chunks ``j`` that hold examples (they come first).

    A ``lax.while_loop``; with a single chunk, one unconditional call instead
    (a batch that fits one chunk is cheap either way, and compiles faster).
    """
    if buckets.rows.shape[0] == 0:  # an empty batch
        return init
    if buckets.rows.shape[0] == 1:
        return body(0, init)
    n_used = jnp.sum(buckets.valid[:, 0], dtype=jnp.int32)
    step = lambda s: (s[0] + 1, body(s[0], s[1]))
    return lax.while_loop(lambda s: s[0] < n_used, step, (jnp.zeros((), jnp.int32), init))[1]


def _values_loop(h, W, buckets: Buckets):
    """``(out (batch,), lse (n_chunks, rows))`` over the chunks in use."""
    acc = _checks.accumulation_dtype(h.dtype, W.dtype)
    n_chunks, rows = buckets.rows.shape

    def body(j, state):
        out, lse_all = state
        r, ok, t = buckets.rows[j], buckets.valid[j], buckets.target[j]
        _, logits = _chunk_logits(h, W, r, ok, acc)
        lse = jax.nn.logsumexp(logits, axis=1)
        picked = jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]
        # Every example is in at most one valid slot and out starts at 0; padding
        # slots add 0 to whichever example they point at (no out-of-range index,
        # which checkify would report).
        out = out.at[r].add(jnp.where(ok, picked - lse, jnp.zeros((), acc)))
        return out, lse_all.at[j].set(jnp.where(ok, lse, jnp.zeros((), acc)))

    init = (jnp.zeros((h.shape[0],), acc), jnp.zeros((n_chunks, rows), acc))
    return _over_used_chunks(body, init, buckets)


def _chunk_grads(h, W, r, ok, t, lse, a, c, dh, dW):
    """``(dh, dW)`` with one chunk's contributions added."""
    acc = dW.dtype
    hr, logits = _chunk_logits(h, W, r, ok, acc)
    G = _logits_cotangent(logits, lse, t, a, c, ok)
    dh = dh.at[r].add(jnp.dot(G, W.astype(acc).T))  # the padding rows of G are 0
    return dh, dW + jnp.dot(hr.astype(acc).T, G)


def _grads_loop(h, W, buckets: Buckets, lse, a, c):
    """``(dh, dW)`` for slot cotangents ``a`` (of the log-probabilities) and ``c`` (of ``lse``)."""
    acc = _checks.accumulation_dtype(h.dtype, W.dtype)

    def body(j, state):
        r, ok, t = buckets.rows[j], buckets.valid[j], buckets.target[j]
        return _chunk_grads(h, W, r, ok, t, lse[j], a[j], c[j], *state)

    init = (jnp.zeros(h.shape, acc), jnp.zeros(W.shape, acc))
    dh, dW = _over_used_chunks(body, init, buckets)
    return dh.astype(h.dtype), dW.astype(W.dtype)


def _grads_differentiable(h, W, buckets: Buckets, lse, a, c):
    """:func:`_grads_loop` as a ``lax.scan`` over every chunk (reverse-differentiable).

    Empty chunks are skipped by a ``lax.cond``; only the derivative of the
    gradient (second order) runs this.
    """
    acc = _checks.accumulation_dtype(h.dtype, W.dtype)
    init = (jnp.zeros(h.shape, acc), jnp.zeros(W.shape, acc))
    if buckets.rows.shape[0] == 0:  # an empty batch
        dh, dW = init
    elif buckets.rows.shape[0] == 1:
        dh, dW = _chunk_grads(h, W, *(v[0] for v in (*buckets, lse, a, c)), *init)
    else:

        def chunk(carry, xs):
            r, ok, t, lse_c, a_c, c_c = xs
            compute = lambda dh, dW: _chunk_grads(h, W, r, ok, t, lse_c, a_c, c_c, dh, dW)
            return lax.cond(ok[0], compute, lambda dh, dW: (dh, dW), *carry), None

        (dh, dW), _ = lax.scan(chunk, init, (*buckets, lse, a, c))
    return dh.astype(h.dtype), dW.astype(W.dtype)


# The two custom-VJP operations.  Their forward passes are while loops over the
# chunks in use; the backward pass of the first is the second, and the second's
# backward pass (second order) differentiates the scan of _grads_differentiable.


@jax.custom_vjp
def _cluster_values(h, W, buckets: Buckets):
    return _values_loop(h, W, buckets)


def _cluster_values_fwd(h, W, buckets):
    # Through the operation itself, so that a derivative of this (second order) uses its VJP.
    out, lse = _cluster_values(h, W, buckets)
    return (out, lse), (h, W, buckets, lse)


def _cluster_values_bwd(res, cts):
    h, W, buckets, lse = res
    g_out, g_lse = cts
    acc = lse.dtype
    zero = jnp.zeros((), acc)
    a = jnp.where(buckets.valid, g_out[buckets.rows].astype(acc), zero)
    c = jnp.where(buckets.valid, g_lse.astype(acc), zero)
    dh, dW = _cluster_grads(h, W, buckets, lse, a, c)
    return dh, dW, None


_cluster_values.defvjp(_cluster_values_fwd, _cluster_values_bwd)


@jax.custom_vjp
def _cluster_grads(h, W, buckets: Buckets, lse, a, c):
    return _grads_loop(h, W, buckets, lse, a, c)


def _cluster_grads_fwd(h, W, buckets, lse, a, c):
    return _cluster_grads(h, W, buckets, lse, a, c), (h, W, buckets, lse, a, c)


def _cluster_grads_bwd(res, cts):
    h, W, buckets, lse, a, c = res
    f = lambda h, W, lse, a, c: _grads_differentiable(h, W, buckets, lse, a, c)
    dh, dW, dlse, da, dc = jax.vjp(f, h, W, lse, a, c)[1](cts)
    return dh, dW, None, dlse, da, dc


_cluster_grads.defvjp(_cluster_grads_fwd, _cluster_grads_bwd)


def tail_log_probs(h: jax.Array, W: jax.Array, buckets: Buckets) -> jax.Array:
    """``log_softmax(h[b] @ W)[target]`` for the examples ``b`` of ``buckets``, 0 elsewhere.

    Args:
      h: ``(batch, d)`` the examples' projections into the cluster's width.
      W: ``(d, cluster_size)`` the cluster's output weights, in ``h``'s dtype.
      buckets: the cluster's examples (:func:`sort_into_buckets`).

    Returns:
      ``(batch,)`` in the accumulation dtype of ``h`` and ``W``.
    """
    return _cluster_values(h, W, buckets)[0]
