"""Decoding: the exact (or approximate) top-k outputs and exact sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from blocksparse_jax._checks import static_int
from blocksparse_jax._scope import named
from blocksparse_jax.hsoftmax import _formulas as _f
from blocksparse_jax.hsoftmax import _problem as _p
from blocksparse_jax.hsoftmax._params import HSoftmaxParams

# The exact top-k search visits at most this many classes per step, and at
# most this many elements (batch * classes_per_step * n_outputs_per_class,
# 16 MiB in float32) per step.  Small steps stop the search early.
_TOP_K_CLASSES_PER_STEP = 16
_TOP_K_CHUNK_ELEMENTS = 1 << 22


@named
def h_softmax_top_k(
    x: ArrayLike,
    params: HSoftmaxParams,
    k: int,
    *,
    n_outputs: int | None = None,
    class_sizes: ArrayLike | None = None,
    approximate: bool = False,
    n_best_classes: int | None = None,
    classes_per_step: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""The ``k`` most probable outputs of each example, without materialising them all.

    Exact (default): a best-first search.  Classes are visited
    ``classes_per_step`` at a time in decreasing order of their best
    probability over the batch; each step computes ``log p`` for the outputs
    of those classes and merges them into a running top-k.  Because ``log p(o)
    <= log p(class(o))``, the search stops as soon as no example has an
    unvisited class more probable than its current k-th best output - after a
    few steps for a confident model, after all of them for a flat one.  Memory
    is ``O(batch * (k + classes_per_step * n_outputs_per_class))`` however
    large ``n_outputs`` is: ``(batch, n_outputs)`` is never materialised.

    Approximate (``approximate=True``): the ``n_best_classes`` most probable
    classes (default ``min(k, n_classes)``), then the best outputs within them
    (a ``sparse_block_dot`` over those classes), ``O(n_classes +
    n_best_classes * n_outputs_per_class)`` per example.  The log-probabilities
    returned are exact; an output is missed only if its class is not among the
    best.  If the chosen classes hold fewer than ``k`` outputs the last entries
    are ``-inf``.

    This is a search for decoding: its outputs carry no gradient (take
    :func:`h_log_softmax` at the returned ids for one).  Ties between equal
    log-probabilities may be broken either way.

    Args:
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`HSoftmaxParams`.
      k: number of outputs to return, in ``[1, number of real outputs]``; a
        Python int (static under ``jax.jit``: ``static_argnames="k"``).
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``;
        default ``n_classes * n_outputs_per_class`` from the parameters' shapes
        (a layout's ``n_outputs``).  A Python int: under ``jax.jit`` leave it
        out or mark it static (``static_argnames="n_outputs"``).
      class_sizes: optional ``(n_classes,)`` class sizes, as in :func:`h_log_softmax`.
      approximate: search only the best classes.
      n_best_classes: classes searched when ``approximate``.
      classes_per_step: classes per step of the exact search (default 16, fewer
        if a step's ``batch * classes_per_step * n_outputs_per_class`` block
        would exceed 4M elements).

    Returns:
      ``(log_probs, indices)``, both ``(..., k)`` (``...`` = ``x.shape[:-1]``),
      sorted by decreasing log-probability; ``indices`` int32 output ids.  An
      entry with no output behind it (fewer than ``k`` real outputs, possible
      with a traced ``class_sizes`` or ``approximate=True``) has
      log-probability ``-inf`` and index ``-1``.

    Raises:
      ValueError: ``k`` outside ``[1, n_outputs]`` (or larger than the number of
        non-padded outputs when ``class_sizes`` is concrete), ``n_best_classes``
        without ``approximate=True``, and everything :func:`h_log_softmax` raises.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_log_softmax, h_softmax_init, h_softmax_top_k
      >>> params = h_softmax_init(jax.random.key(0), 8, 50)
      >>> x = jax.random.normal(jax.random.key(1), (3, 8))
      >>> logp, idx = h_softmax_top_k(x, params, 5, n_outputs=50)
      >>> ref_logp, ref_idx = jax.lax.top_k(h_log_softmax(x, params, n_outputs=50), 5)
      >>> bool(jnp.all(idx == ref_idx)), bool(jnp.allclose(logp, ref_logp))
      (True, True)
    """
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    C, P = prob.W2.shape[0], prob.per_class
    k = static_int("k", k)
    n_real = _p.n_valid_outputs(prob)
    limit = prob.n_outputs if n_real is None else n_real
    if not 1 <= k <= limit:
        what = "n_outputs" if n_real is None or n_real == prob.n_outputs else "real outputs"
        raise ValueError(f"k must be in [1, {limit}] ({what}={limit}); got k={k}")
    if prob.x.shape[0] == 0:  # no example: nothing to search
        empty = prob.lead + (k,)
        return jnp.zeros(empty, prob.acc), jnp.zeros(empty, jnp.int32)
    if n_best_classes is not None and not approximate:
        raise ValueError("n_best_classes is used only with approximate=True")
    if approximate:
        m = min(k, C) if n_best_classes is None else static_int("n_best_classes", n_best_classes)
        if not 1 <= m <= C:
            raise ValueError(f"n_best_classes must be in [1, n_classes] = [1, {C}]; got {m}")
        return _p.run(_top_k_approximate, prob, k=k, m=m)
    if classes_per_step is None:
        cc = min(_TOP_K_CLASSES_PER_STEP, _TOP_K_CHUNK_ELEMENTS // max(1, prob.x.shape[0] * P))
    else:
        cc = static_int("classes_per_step", classes_per_step)
        if cc < 1:
            raise ValueError(f"classes_per_step must be >= 1; got {classes_per_step}")
    return _p.run(_top_k_exact, prob, k=k, cc=max(1, min(C, cc)))


def _top_k_exact(prob: _p.Problem, *, k: int, cc: int):
    """Best-first search over chunks of classes with a running top-k, stopping early.

    Classes are visited in decreasing order of their best probability over the
    batch, ``cc`` at a time; since ``log p(o) <= log p(class(o))``, the search
    stops as soon as no example has an unvisited class more probable than its
    current k-th best output.  A search, not a differentiable function: its
    inputs are ``stop_gradient``-ed (``lax.while_loop`` has no reverse mode).
    """
    x, W2, b2 = (lax.stop_gradient(a) for a in (prob.x, prob.W2, prob.b2))
    class_logp = lax.stop_gradient(prob.class_log_probs())  # (batch, C)
    batch = x.shape[0]
    C, P = W2.shape[0], prob.per_class
    n_steps = -(-C // cc)
    order = jnp.argsort(-jnp.max(class_logp, axis=0)).astype(jnp.int32)  # (C,)
    sorted_logp = class_logp[:, order]
    position = jnp.arange(C, dtype=jnp.int32)
    slots = jnp.arange(P, dtype=jnp.int32)

    def search_more(carry):
        i, vals, _ = carry
        unvisited = jnp.where(position[None, :] >= i * cc, sorted_logp, -jnp.inf)
        return (i < n_steps) & jnp.any(jnp.max(unvisited, axis=1) >= vals[:, k - 1])

    def step(carry):
        i, best_vals, best_idx = carry
        # The last chunk is shifted back to stay in bounds; classes seen before are masked.
        start = jnp.minimum(i * cc, C - cc)
        classes = lax.dynamic_slice_in_dim(order, start, cc)  # (cc,)
        fresh = start + jnp.arange(cc, dtype=jnp.int32) >= i * cc
        act = _f.all_activations(x, W2[classes], b2[classes], prob.acc)  # (batch, cc, P)
        slot_ok = prob.slot_valid(classes) & fresh[:, None]  # (cc, P)
        logp = class_logp[:, classes][:, :, None] + _f.masked_log_softmax(act, slot_ok[None])
        logp = _f.neg_inf_where_invalid(logp, slot_ok[None]).reshape(batch, cc * P)
        ids = (classes[:, None] * P + slots[None, :]).reshape(-1)
        vals = jnp.concatenate([best_vals, logp], axis=1)
        cand = jnp.concatenate([best_idx, jnp.broadcast_to(ids[None, :], logp.shape)], axis=1)
        vals, pos = lax.top_k(vals, k)
        return i + 1, vals, jnp.take_along_axis(cand, pos, axis=1)

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, k), -jnp.inf, prob.acc),
        jnp.zeros((batch, k), jnp.int32),
    )
    _, vals, idx = lax.while_loop(search_more, step, init)
    return vals, _no_output(vals, idx)


def _no_output(vals, idx):
    """``-1`` for an entry with no output behind it (log-probability ``-inf``)."""
    return jnp.where(jnp.isneginf(vals), jnp.int32(-1), idx)


def _top_k_approximate(prob: _p.Problem, *, k: int, m: int):
    batch, P = prob.x.shape[0], prob.per_class
    cl, best = lax.top_k(prob.class_log_probs(), m)  # (batch, m)
    act = _f.target_activations(prob.x, prob.W2, prob.b2, best, prob.acc)  # (batch, m, P)
    slot_ok = prob.slot_valid(best)
    logp = _f.neg_inf_where_invalid(cl[:, :, None] + _f.masked_log_softmax(act, slot_ok), slot_ok)
    ids = best[:, :, None] * P + lax.broadcasted_iota(jnp.int32, (batch, m, P), 2)
    k_eff = min(k, m * P)
    vals, pos = lax.top_k(logp.reshape(batch, m * P), k_eff)
    idx = jnp.take_along_axis(ids.reshape(batch, m * P), pos, axis=1)
    if k_eff < k:
        vals = jnp.pad(vals, ((0, 0), (0, k - k_eff)), constant_values=-jnp.inf)
        idx = jnp.pad(idx, ((0, 0), (0, k - k_eff)))
    return lax.stop_gradient(vals), _no_output(vals, idx)


@named
def h_softmax_sample(
    key: jax.Array,
    x: ArrayLike,
    params: HSoftmaxParams,
    *,
    n_outputs: int | None = None,
    class_sizes: ArrayLike | None = None,
) -> jax.Array:
    r"""Exact samples from the hierarchical distribution, one per example.

    First a class ``c ~ softmax(x @ W1 + b1)``, then a slot ``s ~ softmax(x @
    W2[c] + b2[c])`` over the class's real slots (a ``sparse_block_dot`` on the
    sampled class), both with ``jax.random.categorical``; the output is ``c *
    n_outputs_per_class + s``.  ``O(n_in * (n_classes + n_outputs_per_class))``
    work per example; padded slots are never drawn.

    Args:
      key: a PRNG key.
      x: ``(..., n_in)`` inputs: any leading batch dimensions, ``(n_in,)`` for
        one example.
      params: :class:`HSoftmaxParams`.
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``;
        default ``n_classes * n_outputs_per_class`` from the parameters' shapes
        (a layout's ``n_outputs``).  A Python int: under ``jax.jit`` leave it
        out or mark it static (``static_argnames="n_outputs"``).
      class_sizes: optional ``(n_classes,)`` class sizes, as in :func:`h_log_softmax`.

    Returns:
      ``x.shape[:-1]`` int32 output ids; ``-1`` where there is no output to
      draw (a traced ``class_sizes`` of all zeros).

    Raises:
      TypeError, ValueError: as :func:`h_log_softmax`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax_init, h_softmax_sample
      >>> params = h_softmax_init(jax.random.key(0), 8, 10)
      >>> x = jax.random.normal(jax.random.key(1), (5, 8))
      >>> ids = h_softmax_sample(jax.random.key(2), x, params, n_outputs=10)
      >>> ids.shape, ids.dtype, bool(jnp.all((ids >= 0) & (ids < 10)))
      ((5,), dtype('int32'), True)
    """
    prob = _p.prepare(x, params, n_outputs, class_sizes)
    return _p.run(_sample, prob, key)


def _sample(prob: _p.Problem, key) -> jax.Array:
    k_class, k_slot = jax.random.split(key)
    classes = jax.random.categorical(k_class, prob.class_log_probs(), axis=-1).astype(jnp.int32)
    act = _f.target_activations(prob.x, prob.W2, prob.b2, classes, prob.acc)
    act = jnp.where(prob.slot_valid(classes), act, -jnp.inf)
    slots = jax.random.categorical(k_slot, act, axis=-1).astype(jnp.int32)
    # With every class empty (a traced all-zero class_sizes) there is no output to draw.
    drawn = _f.take_rows(prob.slot_valid(classes), slots) & prob.class_valid[classes]
    return jnp.where(drawn, classes * prob.per_class + slots, jnp.int32(-1))
