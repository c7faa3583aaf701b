"""The softmax's per-example statistics without the logits: a custom VJP over chunks of outputs.

For ``x (batch, n_in)``, ``W (n_in, n_outputs)`` (or ``W (n_outputs, n_in)``
with ``Plan.rows``: read as its transpose), ``b (n_outputs,)`` and one
target per example, with ``z = x @ W + b`` (soft-capped to ``softcap *
tanh(z / softcap)`` when asked):

```
lse[n]          = logsumexp_j z[n, j]
target[n]       = z[n, target[n]]
total[n]        = sum_j z[n, j]                     (label smoothing only)
chunk_lse[n, k] = logsumexp_{j in chunk k} z[n, j]  (gradient filter only)
```

The outputs are walked in chunks of ``chunk`` columns, so that no ``(batch,
n_outputs)`` array exists in either pass:

* forward: each chunk's logits ``(batch, chunk)`` feed a running maximum and
  sum per example (an online log-sum-exp); the target's logit is a gather of
  ``batch`` columns of ``W``.  The saved residuals are the inputs and ``lse``.
* backward: each chunk's logits are recomputed and turned into their cotangent
  ``G = g_lse * softmax (+ g_total) (* the soft cap's derivative)``; ``G @ W_c^T``
  is added to ``dx``, ``x^T @ G`` is written into ``dW``'s chunk (each column
  is computed once: written, not accumulated) and ``sum(G)`` into ``db``'s.
  The target's ``g_target`` goes to its column by a scatter after the loop.

The matrix products run in the inputs' common dtype (bfloat16 stays bfloat16)
with float32 accumulation (float64 for float64 inputs); exponentials and
sums run in the accumulation dtype.

The last chunk is moved back to end at ``n_outputs`` when ``chunk`` does not
divide it; the columns it shares with the chunk before count in that chunk
only.  The backward pass walks the chunks last to first, so that the earlier
chunk's columns overwrite the shared ones in ``dW`` and ``db``.

With ``filter_eps`` (Cut Cross-Entropy's gradient filter, with a bound on what
it leaves out) the backward pass skips the chunks of least probability as long
as, for every example with a cotangent, the probability they hold together
stays at most ``filter_eps``: with ``mass[n, k] = exp(chunk_lse[n, k] -
lse[n])`` and ``worst[k] = max_n mass[n, k]``, the chunks in increasing order
of ``worst`` are skipped while the running sum of ``worst`` is at most
``filter_eps``.  Every skipped chunk's softmax is then below ``filter_eps``
for every example, and the terms left out of each example's gradient hold at
most ``filter_eps`` of its probability.  Such a chunk's columns of ``dW`` and
``db`` are zero and it adds nothing to ``dx``; the values are exact.  The
filtered backward pass loops over the kept chunks only (a ``while_loop`` of
as many steps as there are), so it is not differentiable again: without the
filter the backward pass is itself reverse-differentiable (reverse over
reverse), with it the gradient is first order only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax import _checks
from blocksparse_jax.blocksparse._carry import vary_over, varying_axes

# A chunk's logits hold about this many elements (4 MiB in float32), and a chunk is
# at least MIN_CHUNK and at most MAX_CHUNK columns wide: measured on CPU at width 64
# and 128, batches of 128 to 1,024 (benchmarks/README.md, "Output heads"), narrower
# chunks run their products below the machine's speed, and wider ones slow down once
# a tile outgrows the caches.
CHUNK_ELEMENTS = 1 << 20
MIN_CHUNK = 256
MAX_CHUNK = 4096


def chunk_size(batch: int, n_outputs: int, chunk: int | None = None) -> int:
    """The columns per chunk: ``chunk`` if given, else about ``CHUNK_ELEMENTS / batch``.

    The largest divisor of ``n_outputs`` between a quarter of the target width
    and the width is preferred, so that the chunks tile the outputs exactly
    (and the filtered gradient's blocks are whole chunks).
    """
    if chunk is not None:
        return min(int(chunk), n_outputs)
    width = CHUNK_ELEMENTS // max(1, batch)
    width = min(MAX_CHUNK, max(MIN_CHUNK, 1 << max(0, width.bit_length() - 1)))
    if width >= n_outputs:
        return n_outputs
    for c in range(width, width // 4, -1):
        if n_outputs % c == 0:
            return c
    return width


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static configuration of one call (a ``nondiff_argnums`` argument: hashable).

    Attributes:
      n_outputs: the number of outputs (columns of ``W``).
      chunk: the columns per chunk.
      softcap: the soft cap ``c`` of ``c * tanh(z / c)``, or ``None``.
      with_total: also compute ``total`` (the sum of the logits, for label smoothing).
      filter_eps: the probability the gradient filter may leave out per example, or
        ``None`` (exact gradient).
      rows: ``W`` is ``(n_outputs, n_in)``, one row per output
        (:class:`~blocksparse_jax.FullSoftmaxRowParams`).
    """

    n_outputs: int
    chunk: int
    softcap: float | None = None
    with_total: bool = False
    filter_eps: float | None = None
    rows: bool = False

    @property
    def out_axis(self) -> int:
        """``W``'s axis of outputs."""
        return 0 if self.rows else 1

    @property
    def n_chunks(self) -> int:
        return -(-self.n_outputs // self.chunk)

    @property
    def ragged(self) -> bool:
        """Whether the last chunk overlaps the one before it."""
        return self.n_outputs % self.chunk != 0

    def start(self, k):
        """The first column of chunk ``k``; the last chunk is moved back to end at ``n_outputs``."""
        return jnp.minimum(k * self.chunk, self.n_outputs - self.chunk)

    def fresh(self, k):
        """``(chunk,)`` bool: the columns of chunk ``k`` that no earlier chunk holds."""
        return self.start(k) + jnp.arange(self.chunk, dtype=jnp.int32) >= k * self.chunk


class Stats(NamedTuple):
    """The per-example statistics of the logits (see the module's docstring)."""

    lse: jax.Array  # (batch,)
    target: jax.Array  # (batch,)
    total: jax.Array | None  # (batch,), with_total only
    chunk_lse: jax.Array | None  # (batch, n_chunks), filter_eps only


def dtypes(x, W, b=None) -> tuple[np.dtype, np.dtype]:
    """``(dtype of the products' operands, accumulation dtype)``; ``b`` may be ``None``."""
    extra = () if b is None else (b.dtype,)
    return (
        _checks.common_float_dtype(x.dtype, W.dtype),
        _checks.accumulation_dtype(x.dtype, W.dtype, *extra),
    )


def cap(raw: jax.Array, softcap: float | None) -> jax.Array:
    """``softcap * tanh(raw / softcap)``, or ``raw``."""
    if softcap is None:
        return raw
    c = jnp.asarray(softcap, raw.dtype)
    return c * jnp.tanh(raw / c)


def cap_slope(z: jax.Array, softcap: float | None) -> jax.Array | None:
    """``d z / d raw`` at the capped logit ``z``: ``1 - (z / softcap)**2``, or ``None``."""
    if softcap is None:
        return None
    r = z / jnp.asarray(softcap, z.dtype)
    return 1 - r * r


def outputs_dot(x, Wc, rows: bool, acc) -> jax.Array:
    """``x @ Wc`` for ``Wc (n_in, k)``, ``x @ Wc.T`` for ``Wc (k, n_in)`` (``rows``)."""
    if rows:
        return lax.dot_general(x, Wc, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    return jnp.dot(x, Wc, preferred_element_type=acc)


def chunk_logits(x, W, b, k, plan: Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chunk ``k``'s ``(start, W's slice of its outputs, capped logits (batch, chunk))``.

    The slice is ``(n_in, chunk)``, or ``(chunk, n_in)`` with ``plan.rows``.
    """
    dt, acc = dtypes(x, W, b)
    start = plan.start(k)
    Wc = lax.dynamic_slice_in_dim(W, start, plan.chunk, axis=plan.out_axis).astype(dt)
    raw = outputs_dot(x.astype(dt), Wc, plan.rows, acc)
    if b is not None:
        raw = raw + lax.dynamic_slice_in_dim(b, start, plan.chunk).astype(acc)[None, :]
    return start, Wc, cap(raw, plan.softcap)


def output_weights(W, ids, rows: bool) -> jax.Array:
    """``(len(ids), n_in)``: the weights of outputs ``ids``, from ``W`` in either layout."""
    return jnp.take(W, ids, axis=0) if rows else jnp.take(W, ids, axis=1).T


def target_logits(x, W, b, target, plan: Plan) -> tuple[jax.Array, jax.Array]:
    """``(the targets' weights (batch, n_in), the targets' capped logits (batch,))``."""
    dt, acc = dtypes(x, W, b)
    Wt = output_weights(W, target, plan.rows).astype(dt)
    raw = jnp.einsum("nd,nd->n", x.astype(dt), Wt, preferred_element_type=acc)
    if b is not None:
        raw = raw + b[target].astype(acc)
    return Wt, cap(raw, plan.softcap)


def logits_cotangent(z, k, lse, g_lse, g_total, plan: Plan) -> jax.Array:
    """The cotangent of chunk ``k``'s raw logits ``(batch, chunk)`` from that of ``lse`` and ``total``.

    ``g_lse * softmax(z) + g_total``, times the soft cap's slope; zero on the
    columns an earlier chunk holds.  The target's ``g_target`` is not in it.
    """
    G = g_lse[:, None] * jnp.exp(z - lse[:, None])
    if g_total is not None:
        G = G + g_total[:, None]
    slope = cap_slope(z, plan.softcap)
    if slope is not None:
        G = G * slope
    if plan.ragged:
        G = jnp.where(plan.fresh(k)[None, :], G, jnp.zeros((), G.dtype))
    return G


def touched_chunks(chunk_lse, lse, g_lse, plan: Plan) -> jax.Array:
    """``(n_chunks,)`` bool: the chunks the gradient filter keeps (see the module's docstring).

    Only the examples with a non-zero cotangent count.
    """
    live = (g_lse != 0)[:, None]
    mass = jnp.where(live, jnp.exp(chunk_lse - lse[:, None]), jnp.zeros((), lse.dtype))
    worst = jnp.max(mass, axis=0)
    order = jnp.argsort(worst)
    skipped = jnp.cumsum(worst[order]) <= plan.filter_eps
    return jnp.ones(worst.shape, jnp.bool_).at[order].set(~skipped)


def carry(init, *refs):
    """``init`` (a pytree, ``None`` leaves allowed) cast to vary as ``refs`` do inside ``shard_map``.

    A loop's carry keeps one type from step to step; fresh zeros do not vary
    over the mesh axes that a body reading a sharded ``W`` makes them vary
    over.  Outside ``shard_map`` this is the identity.
    """
    axes = frozenset().union(*(varying_axes(r) for r in refs))
    return jax.tree.map(lambda a: vary_over(a, axes), init)


def loop(body, init, n: int):
    """``lax.fori_loop(0, n, body, init)``; one step runs without a loop."""
    if n == 1:
        return body(jnp.int32(0), init)
    return lax.fori_loop(0, n, body, init)


def _values(plan: Plan, x, W, b, target) -> Stats:
    _, acc = dtypes(x, W, b)
    batch = x.shape[0]
    zero = jnp.zeros((), acc)

    def body(k, state):
        m, s, total, chunk_lse = state
        _, _, z = chunk_logits(x, W, b, k, plan)
        if plan.ragged:
            z = jnp.where(plan.fresh(k)[None, :], z, jnp.full((), -jnp.inf, acc))
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s_k = jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        s = s * jnp.exp(m - m_new) + s_k
        if total is not None:
            total = total + jnp.sum(jnp.where(jnp.isneginf(z), zero, z), axis=1)
        if chunk_lse is not None:
            lse_k = (m_new + jnp.log(s_k))[:, None]
            chunk_lse = lax.dynamic_update_slice_in_dim(chunk_lse, lse_k, k, axis=1)
        return m_new, s, total, chunk_lse

    init = carry(
        (
            jnp.full((batch,), -jnp.inf, acc),
            jnp.zeros((batch,), acc),
            jnp.zeros((batch,), acc) if plan.with_total else None,
            jnp.zeros((batch, plan.n_chunks), acc) if plan.filter_eps is not None else None,
        ),
        x,
        W,
    )
    m, s, total, chunk_lse = loop(body, init, plan.n_chunks)
    _, picked = target_logits(x, W, b, target, plan)
    return Stats(m + jnp.log(s), picked, total, chunk_lse)


def grads(plan: Plan, x, W, b, target, lse, chunk_lse, cotangent: Stats):
    """``(dx, dW, db)`` for the cotangent of the statistics, a chunk at a time."""
    _, acc = dtypes(x, W, b)
    dt = _checks.common_float_dtype(x.dtype, W.dtype)
    g_lse = cotangent.lse.astype(acc)
    g_total = None if cotangent.total is None else cotangent.total.astype(acc)
    n = plan.n_chunks
    kept = None
    if plan.filter_eps is not None:
        kept = touched_chunks(chunk_lse, lse, g_lse, plan)

    # x transposed once, kept apart from the products (XLA:CPU multiplies a
    # row-major left operand faster than one it contracts along its first axis).
    xt = None if plan.rows else lax.optimization_barrier(x.astype(dt).T)

    def chunk_terms(k):
        start, Wc, z = chunk_logits(x, W, b, k, plan)
        G = logits_cotangent(z, k, lse, g_lse, g_total, plan).astype(dt)
        if plan.rows:
            dx_k = jnp.dot(G, Wc, preferred_element_type=acc)
            dW_k = jnp.dot(G.T, x.astype(dt), preferred_element_type=acc).astype(W.dtype)
        else:
            dx_k = jnp.dot(G, Wc.T, preferred_element_type=acc)
            dW_k = jnp.dot(xt, G, preferred_element_type=acc).astype(W.dtype)
        db_k = None if b is None else jnp.sum(G, axis=0, dtype=acc).astype(b.dtype)
        return start, dx_k, dW_k, db_k

    def body(i, state):
        dx, dW, db = state
        # Last to first (see the module's docstring); with the filter, the kept chunks only.
        k = n - 1 - i if kept is None else kept_order[i]
        start, dx_k, dW_k, db_k = chunk_terms(k)
        dW = lax.dynamic_update_slice_in_dim(dW, dW_k, start, axis=plan.out_axis)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_k, start, axis=0)
        return dx + dx_k, dW, db

    db = None if b is None else jnp.zeros(b.shape, b.dtype)
    init = carry((jnp.zeros(x.shape, acc), jnp.zeros(W.shape, W.dtype), db), x, W)
    if kept is None:
        dx, dW, db = loop(body, init, n)
    else:
        # The kept chunks first, last to first; a loop over as many as there are.
        ids = jnp.arange(n, dtype=jnp.int32)
        kept_order = jnp.argsort(jnp.where(kept, -ids, n)).astype(jnp.int32)
        dx, dW, db = lax.fori_loop(0, jnp.sum(kept, dtype=jnp.int32), body, init)
    # The targets' own term: g_target at each target's output.
    Wt, picked = target_logits(x, W, b, target, plan)
    g_t = cotangent.target.astype(acc)
    slope = cap_slope(picked, plan.softcap)
    if slope is not None:
        g_t = g_t * slope
    dx = dx + g_t[:, None] * Wt.astype(acc)
    if plan.rows:
        dW = dW.at[target].add((g_t[:, None] * x.astype(acc)).astype(W.dtype))
    else:
        dW = dW.at[:, target].add((g_t[None, :] * x.T.astype(acc)).astype(W.dtype))
    if db is not None:
        db = db.at[target].add(g_t.astype(b.dtype))
    return dx.astype(x.dtype), dW, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _logit_stats(plan: Plan, x, W, b, target) -> Stats:
    return _values(plan, x, W, b, target)


def _logit_stats_fwd(plan: Plan, x, W, b, target):
    stats = _values(plan, x, W, b, target)
    return stats, (x, W, b, target, stats.lse, stats.chunk_lse)


def _logit_stats_bwd(plan: Plan, residuals, cotangent: Stats):
    x, W, b, target, lse, chunk_lse = residuals
    dx, dW, db = grads(plan, x, W, b, target, lse, chunk_lse, cotangent)
    return dx, dW, db, None


_logit_stats.defvjp(_logit_stats_fwd, _logit_stats_bwd)


def logit_stats(x, W, b, target, plan: Plan) -> Stats:
    """The :class:`Stats` of ``cap(x @ W + b)``, differentiable in ``x``, ``W`` and ``b``.

    Args:
      x: ``(batch, n_in)`` floats.
      W: ``(n_in, n_outputs)`` floats (``(n_outputs, n_in)`` with ``plan.rows``).
      b: ``(n_outputs,)`` floats, or ``None`` (no bias; its cotangent is then ``None``).
      target: ``(batch,)`` int32 in ``[0, n_outputs)``.
      plan: the static :class:`Plan`.

    Returns:
      :class:`Stats` in the accumulation dtype; ``chunk_lse`` carries no gradient.
    """
    return _logit_stats(plan, x, W, b, target)
