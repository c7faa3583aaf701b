"""The first level's log-probability of each example's class, a chunk of classes at a time.

``class_log_prob(x, W1, b1, class_valid, classes)`` is:

```
logits = x @ W1 + b1                     (batch, n_classes), -inf for the empty classes
out[b] = logits[b, classes[b]] - logsumexp(logits[b])
```

as a custom-VJP operation that walks the classes in chunks of columns, so that
no array larger than a chunk's ``(batch, cols)`` logits is built, forward or
backward (differentiated by JAX, the formula holds the ``(batch, n_classes)``
logits, probabilities and cotangent at once):

* the forward pass keeps a running maximum and sum per example (an online
  log-sum-exp) and picks the target's logit from the chunk that holds it; only
  the ``(batch,)`` log-sum-exp is saved;
* the backward pass recomputes a chunk's logits, turns them into their
  cotangent ``g[b] * (onehot(classes[b]) - softmax(logits[b]))``, writes the
  chunk's columns of ``W1``'s and ``b1``'s gradients in place (each column is
  computed once, so nothing is accumulated there) and adds the chunk's term to
  ``x``'s gradient.

A chunk holds about ``_CHUNK_ELEMENTS`` logits, or as many as the caller
allows (``chunk_elements``); classes that fit one chunk are computed without a
loop, and when every class is valid (``all_valid``) without masks.  On CPU the
chunks are a ``lax.scan``; on GPU and TPU, where a loop's iterations run one
after another, the classes are one chunk (:func:`_per_platform`).  The last
chunk is moved back to end at the last class, and the classes it shares with
the chunk before are left out of its sums.  The backward pass is itself
reverse-differentiable: ``jax.jacrev`` of ``jax.jacrev`` works.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax import _checks

# A chunk holds about this many logits (512 KiB in float32), and at least
# _MIN_COLS classes; a caller may allow larger chunks (``chunk_elements``): fewer
# loop steps, larger temporaries.
_CHUNK_ELEMENTS = 1 << 17
_MIN_COLS = 128
_COL_MULTIPLE = 8


def chunking(
    batch: int, n_classes: int, *, whole: bool = False, elements: int | None = None
) -> tuple[int, int]:
    """``(n_chunks, cols)``: the static chunks of classes the first level is walked in.

    A chunk holds about ``max(_CHUNK_ELEMENTS, elements)`` logits; ``whole``: one
    chunk of every class.
    """
    if whole:
        return 1, n_classes
    budget = max(_CHUNK_ELEMENTS, elements or 0)
    widest = max(_MIN_COLS, budget // max(1, batch))
    n_chunks = max(1, -(-n_classes // widest))
    # Chunks of about equal width: rounding each up to _COL_MULTIPLE makes the last one
    # overlap the one before by fewer than _COL_MULTIPLE classes per chunk.
    cols = -(-n_classes // n_chunks)
    cols = min(n_classes, -(-cols // _COL_MULTIPLE) * _COL_MULTIPLE)
    return max(1, -(-n_classes // max(1, cols))), cols


def _chunk_start(j, cols: int, n_classes: int):
    """The first class of chunk ``j``: ``j * cols``, the last chunk moved back to end at ``n_classes``."""
    return jnp.minimum(j * cols, n_classes - cols)


class _Static(NamedTuple):
    """The static options of the custom VJP: accumulation dtype, chunk budget, all classes valid."""

    acc: np.dtype
    elements: int | None
    all_valid: bool


def _chunk(x, W1, b1, valid, j, cols, acc):
    """Chunk ``j``'s ``(start, ids, logits, ok, keep)``.

    ``ids`` ``(cols,)`` are the chunk's classes; ``logits`` is ``(batch, cols)``, not yet masked (each caller applies its
    masks in one fused pass); ``ok`` ``(cols,)`` marks the valid classes,
    ``keep`` ``(cols,)`` the classes no earlier chunk holds.
    """
    n_classes = W1.shape[1]
    start = _chunk_start(j, cols, n_classes)
    dt = _checks.common_float_dtype(x.dtype, W1.dtype)
    Wc = lax.dynamic_slice_in_dim(W1, start, cols, axis=1).astype(dt)
    logits = jnp.dot(x.astype(dt), Wc, preferred_element_type=acc)
    logits = logits + lax.dynamic_slice_in_dim(b1, start, cols).astype(acc)[None, :]
    ids = start + jnp.arange(cols, dtype=jnp.int32)
    ok = lax.dynamic_slice_in_dim(valid, start, cols)
    keep = ids >= j * cols
    return start, ids, logits, ok, keep


def _scan(chunk, init, n_chunks):
    """``lax.scan`` of ``chunk`` over the chunk numbers; one chunk runs without a loop."""
    if n_chunks == 1:
        return chunk(init, jnp.int32(0))[0]
    return lax.scan(chunk, init, jnp.arange(n_chunks, dtype=jnp.int32))[0]


def _values(x, W1, b1, valid, classes, st: _Static, whole):
    """``(out, lse)``, both ``(batch,)`` in ``acc``, a chunk of classes at a time.

    With one chunk of classes that are all valid the logits are used as the
    product leaves them: no masked copy of a ``(batch, n_classes)`` array.
    """
    acc = st.acc
    batch, n_classes = x.shape[0], W1.shape[1]
    n_chunks, cols = chunking(batch, n_classes, whole=whole, elements=st.elements)
    neg_inf, zero = jnp.full((), -jnp.inf, acc), jnp.zeros((), acc)

    def chunk(carry, j):
        m, s, picked = carry
        start, _, logits, ok, keep = _chunk(x, W1, b1, valid, j, cols, acc)
        if not (st.all_valid and n_chunks == 1):
            counted = keep if st.all_valid else ok & keep
            logits = jnp.where(counted[None, :], logits, neg_inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        shift = jnp.where(jnp.isneginf(m_new), zero, m_new)  # no class yet: nothing to shift
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(logits - shift[:, None]), axis=1)
        # The example's own logit, from the chunk that holds its class first.
        local = classes - start
        own = (classes >= j * cols) & (local < cols)
        mine = jnp.take_along_axis(logits, jnp.clip(local, 0, cols - 1)[:, None], axis=1)[:, 0]
        picked = picked + jnp.where(own, mine, zero)
        return (m_new, s, picked), None

    init = (jnp.full((batch,), -jnp.inf, acc), jnp.zeros((batch,), acc), jnp.zeros((batch,), acc))
    m, s, picked = _scan(chunk, init, n_chunks)
    lse = jnp.where(jnp.isneginf(m), zero, m) + jnp.log(s)
    # A row with no class at all gets lse 0, so that its log-probabilities are -inf, not NaN.
    lse = jnp.where(jnp.isneginf(lse), zero, lse)
    return jnp.where(valid[classes], picked - lse, neg_inf), lse


def _grads(x, W1, b1, valid, classes, lse, g, st: _Static, whole):
    """``(dx, dW1, db1)`` in ``acc`` for the cotangent ``g`` of the output, a chunk at a time.

    ``g`` is 0 for the examples of empty classes.
    """
    acc = st.acc
    batch, n_classes = x.shape[0], W1.shape[1]
    n_chunks, cols = chunking(batch, n_classes, whole=whole, elements=st.elements)
    zero = jnp.zeros((), acc)
    # x transposed once, kept apart from the product (XLA:CPU multiplies a
    # row-major left operand faster than one it contracts along its first axis).
    xt = lax.optimization_barrier(x.astype(acc).T)

    def chunk(carry, j):
        dx, dW1, db1 = carry
        start, ids, logits, ok, keep = _chunk(x, W1, b1, valid, j, cols, acc)
        p = jnp.exp(logits - lse[:, None])
        if not st.all_valid:
            p = jnp.where(ok[None, :], p, zero)
        hit = ids[None, :] == classes[:, None]  # an empty class's example has g = 0
        G = g[:, None] * (hit.astype(acc) - p)  # (batch, cols)
        # Every column of the chunk is (re)written whole; the sum into dx takes the kept ones.
        dW1 = lax.dynamic_update_slice_in_dim(
            dW1, jnp.dot(xt, G, preferred_element_type=acc), start, axis=1
        )
        db1 = lax.dynamic_update_slice_in_dim(db1, jnp.sum(G, axis=0), start, axis=0)
        Gk = G if n_chunks == 1 else jnp.where(keep[None, :], G, zero)
        Wc = lax.dynamic_slice_in_dim(W1, start, cols, axis=1).astype(acc)
        return (dx + jnp.dot(Gk, Wc.T, preferred_element_type=acc), dW1, db1), None

    init = (jnp.zeros(x.shape, acc), jnp.zeros(W1.shape, acc), jnp.zeros(b1.shape, acc))
    return _scan(chunk, init, n_chunks)


def _per_platform(fn, elements, *args):
    """``fn(whole)(*args)``: chunked (``whole=False``) on CPU, one chunk on GPU and TPU.

    On GPU and TPU a loop's iterations run one after another, so the classes
    are one chunk there.  The choice is made inside the custom VJP's rules, so
    that a ``jit`` or an export for one platform lowers that platform's branch
    only.
    """
    x, W1 = args[0], args[1]
    if chunking(x.shape[0], W1.shape[1], elements=elements)[0] == 1:
        return fn(False)(*args)
    return lax.platform_dependent(*args, cpu=fn(False), default=fn(True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _class_log_prob(x, W1, b1, valid, classes, st):
    values = lambda whole: lambda *a: _values(*a, st, whole)[0]
    return _per_platform(values, st.elements, x, W1, b1, valid, classes)


def _class_log_prob_fwd(x, W1, b1, valid, classes, st):
    values = lambda whole: lambda *a: _values(*a, st, whole)
    out, lse = _per_platform(values, st.elements, x, W1, b1, valid, classes)
    return out, (x, W1, b1, valid, classes, lse)


def _class_log_prob_bwd(st, res, g):
    x, W1, b1, valid, classes, lse = res
    acc = st.acc
    # An example of an empty class has the constant value -inf: no gradient.
    g = jnp.where(valid[classes], g.astype(acc), jnp.zeros((), acc))
    grads = lambda whole: lambda *a: _grads(*a, st, whole)
    dx, dW1, db1 = _per_platform(grads, st.elements, x, W1, b1, valid, classes, lse, g)
    return dx.astype(x.dtype), dW1.astype(W1.dtype), db1.astype(b1.dtype), None, None


_class_log_prob.defvjp(_class_log_prob_fwd, _class_log_prob_bwd)


def class_log_prob(
    x, W1, b1, class_valid, classes, acc, *, chunk_elements=None, all_valid=False
) -> jax.Array:
    """``log_softmax(x @ W1 + b1)[b, classes[b]]`` over the valid classes, in ``acc``.

    Args:
      x: ``(batch, n_in)``.
      W1: ``(n_in, n_classes)``.
      b1: ``(n_classes,)``.
      class_valid: ``(n_classes,)`` bool, ``False`` for the empty classes (logit ``-inf``).
      classes: ``(batch,)`` int32 class of each example, in ``[0, n_classes)``.
      acc: the accumulation dtype.
      chunk_elements: a static int: a chunk may hold this many logits when that is
        more than the default ``_CHUNK_ELEMENTS`` (the caller's memory allows it).
      all_valid: a static bool: ``True`` when every class is known to be valid
        (``class_valid`` all ``True``), so that no mask is applied.

    Returns:
      ``(batch,)`` in ``acc``; ``-inf`` for an example whose class is empty.
    """
    elements = None if chunk_elements is None else int(chunk_elements)
    st = _Static(np.dtype(acc), elements, bool(all_valid))
    return _class_log_prob(x, W1, b1, class_valid, classes.astype(jnp.int32), st)
