"""Candidate samplers: distinct sampled classes and their expected counts, as TensorFlow's.

TensorFlow's ``*_candidate_sampler(unique=True)`` draws classes with
replacement from a distribution ``P`` until ``n_sampled`` distinct ones are
found, after ``num_tries`` draws, and reports for any class ``k`` its expected
count ``-expm1(num_tries * log1p(-P(k)))`` (the probability that ``num_tries``
draws hit it; ``n_sampled * P(k)`` when no draw was repeated).  The sampled
softmax subtracts the log of those counts from the logits.

:func:`sample_candidates` does the same under ``jit``: rounds of a fixed number
of draws (a ``while_loop``), each round keeping the new distinct classes in the
order drawn, until ``n_sampled`` are found; ``num_tries`` counts the draws up
to the one that completed the set.  The distributions (``P`` over ``[0,
n_outputs)``):

* ``"log_uniform"`` (Zipfian, ``log_uniform_candidate_sampler``):
  ``P(k) = (log(k + 2) - log(k + 1)) / log(n_outputs + 1)``, drawn as
  ``floor(exp(u * log(n_outputs + 1))) - 1``; for outputs sorted by
  decreasing frequency.
* ``"uniform"`` (``uniform_candidate_sampler``): ``P(k) = 1 / n_outputs``.
* an array of ``n_outputs`` non-negative counts (``fixed_unigram_candidate_sampler``):
  ``P(k) = counts[k] / sum(counts)``, drawn by inverting the cumulative sum.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from blocksparse_jax import _checks
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax._scope import named

# A round draws this many candidates per class still to find (at least _MIN_ROUND).
_ROUND_FACTOR = 2
_MIN_ROUND = 256
# After this many rounds the search stops (a unigram sampler whose counts hold fewer
# non-zero classes than n_sampled would never finish); unfound slots hold n_outputs.
_MAX_ROUNDS = 1000


class SampledValues(NamedTuple):
    """Sampled classes and expected counts: the ``sampled_values`` of TensorFlow's sampled losses.

    Attributes:
      ids: ``(n_sampled,)`` int32 distinct sampled classes.
      true_expected_count: ``target.shape`` expected count of each target class.
      sampled_expected_count: ``(n_sampled,)`` expected count of each sampled class.
    """

    ids: jax.Array
    true_expected_count: jax.Array
    sampled_expected_count: jax.Array


def _log_uniform_prob(k, n_outputs: int):
    kf = k.astype(jnp.float32)
    return jnp.log1p(1.0 / (kf + 1.0)) / np.float32(math.log(n_outputs + 1.0))


def _probabilities(sampler, n_outputs: int):
    """``P(ids)`` as a function of int32 ids, and ``draw(key, m)`` of ``m`` ids with replacement."""
    if isinstance(sampler, str) and sampler == "log_uniform":
        log_range = np.float32(math.log(n_outputs + 1.0))

        def draw(key, m):
            u = jax.random.uniform(key, (m,), jnp.float32)
            k = jnp.floor(jnp.exp(u * log_range)).astype(jnp.int32) - 1
            return jnp.clip(k, 0, n_outputs - 1)

        return (lambda k: _log_uniform_prob(k, n_outputs)), draw
    if isinstance(sampler, str) and sampler == "uniform":
        p = np.float32(1.0 / n_outputs)
        return (
            lambda k: jnp.full(k.shape, p, jnp.float32),
            lambda key, m: jax.random.randint(key, (m,), 0, n_outputs, jnp.int32),
        )
    counts = sampler.astype(jnp.float32)
    cdf = jnp.cumsum(counts)
    total = cdf[-1]

    def draw(key, m):
        u = jax.random.uniform(key, (m,), jnp.float32) * total
        return jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, n_outputs - 1).astype(jnp.int32)

    return (lambda k: counts[k] / total), draw


class _Search(NamedTuple):
    key: jax.Array
    ids: jax.Array  # (n_sampled,), n_outputs where not found yet
    found: jax.Array  # int32
    tries: jax.Array  # int32
    rounds: jax.Array  # int32


def _distinct_draws(key, draw, n_sampled: int, n_outputs: int):
    """``(ids (n_sampled,), num_tries)``: draws with replacement until ``n_sampled`` distinct ids."""
    per_round = max(_MIN_ROUND, _ROUND_FACTOR * n_sampled)

    def round_(s: _Search) -> _Search:
        key, sub = jax.random.split(s.key)
        cand = draw(sub, per_round)
        # The first draw of each id in the round (a stable sort keeps draw order among equals).
        order = jnp.argsort(cand, stable=True)
        sorted_cand = cand[order]
        first_sorted = jnp.concatenate([jnp.ones((1,), bool), sorted_cand[1:] != sorted_cand[:-1]])
        first = jnp.zeros((per_round,), bool).at[order].set(first_sorted)
        # ... and not found in an earlier round.
        known = jnp.sort(s.ids)
        pos = jnp.clip(jnp.searchsorted(known, cand), 0, n_sampled - 1)
        new = first & (known[pos] != cand)
        rank = jnp.cumsum(new.astype(jnp.int32))  # new ids up to and including each draw
        need = n_sampled - s.found
        take = new & (rank <= need)
        dest = jnp.where(take, s.found + rank - 1, n_sampled)
        ids = s.ids.at[dest].set(cand, mode="drop")
        done = rank[-1] >= need
        last = jnp.argmax(rank >= need).astype(jnp.int32)  # the draw that completed the set
        tries = s.tries + jnp.where(done, last + 1, jnp.int32(per_round))
        found = jnp.minimum(s.found + rank[-1], n_sampled)
        return _Search(key, ids, found, tries, s.rounds + 1)

    init = _Search(
        key,
        jnp.full((n_sampled,), n_outputs, jnp.int32),
        jnp.int32(0),
        jnp.int32(0),
        jnp.int32(0),
    )
    out = lax.while_loop(lambda s: (s.found < n_sampled) & (s.rounds < _MAX_ROUNDS), round_, init)
    return out.ids, out.tries


def expected_count(p: jax.Array, num_tries: jax.Array, n_sampled: int) -> jax.Array:
    """TensorFlow's expected count of a class of probability ``p`` after ``num_tries`` draws."""
    tries = num_tries.astype(jnp.float32)
    unique = -jnp.expm1(tries * jnp.log1p(-p))
    return jnp.where(num_tries == n_sampled, p * np.float32(n_sampled), unique)


@functools.partial(jax.jit, static_argnames=("n_outputs", "n_sampled", "kind"))
def _sample_jit(key, target, counts, *, n_outputs, n_sampled, kind):
    with jax.named_scope("sample_candidates"):
        sampler = kind if counts is None else counts
        prob, draw = _probabilities(sampler, n_outputs)
        ids, tries = _distinct_draws(key, draw, n_sampled, n_outputs)
        t = jnp.clip(target, 0, n_outputs - 1).astype(jnp.int32)
        safe_ids = jnp.clip(ids, 0, n_outputs - 1)
        return SampledValues(
            ids,
            expected_count(prob(t), tries, n_sampled),
            expected_count(prob(safe_ids), tries, n_sampled),
        )


def check_sampler(sampler, n_outputs: int) -> tuple[str | None, jax.Array | None]:
    """``(kind, counts)``: a sampler's name, or ``(None, counts)`` for unigram counts."""
    if isinstance(sampler, str):
        if sampler not in ("log_uniform", "uniform"):
            raise ValueError(
                f"sampler must be 'log_uniform', 'uniform' or an array of n_outputs counts "
                f"(unigram); got {sampler!r}"
            )
        return sampler, None
    counts = _as_array("sampler", sampler)
    if counts.shape != (n_outputs,):
        raise ValueError(
            f"sampler, as unigram counts, must have shape (n_outputs,) = {_shape((n_outputs,))}; "
            f"got shape {_shape(counts.shape)}"
        )
    if not (
        jnp.issubdtype(counts.dtype, jnp.integer) or jnp.issubdtype(counts.dtype, jnp.floating)
    ):
        raise TypeError(f"sampler, as unigram counts, must be numbers; got dtype {counts.dtype}")
    value = _checks.concrete_value(counts)
    if value is not None and (not np.all(np.isfinite(value)) or (value < 0).any()):
        raise ValueError("sampler, as unigram counts, must be finite and non-negative")
    return None, counts


def check_n_sampled(n_sampled, n_outputs: int, counts) -> int:
    n_sampled = _checks.static_int("n_sampled", n_sampled)
    if not 1 <= n_sampled <= n_outputs:
        raise ValueError(
            f"n_sampled must be in [1, n_outputs] = [1, {n_outputs}] (distinct classes are "
            f"drawn); got n_sampled={n_sampled}"
        )
    value = None if counts is None else _checks.concrete_value(counts)
    if value is not None and int(np.count_nonzero(value)) < n_sampled:
        raise ValueError(
            f"n_sampled={n_sampled} distinct classes cannot be drawn from unigram counts with "
            f"{int(np.count_nonzero(value))} non-zero entries"
        )
    return n_sampled


@named
def sample_candidates(
    key: jax.Array,
    target: ArrayLike,
    *,
    n_outputs: int,
    n_sampled: int,
    sampler: str | ArrayLike = "log_uniform",
) -> SampledValues:
    r"""``n_sampled`` distinct classes and the expected counts of them and of the targets.

    TensorFlow's candidate samplers with ``unique=True``: classes are drawn
    with replacement from ``P`` until ``n_sampled`` distinct ones are found,
    after ``num_tries`` draws, and the expected count of a class ``k`` is:

    ```
    -expm1(num_tries * log1p(-P(k)))         (n_sampled * P(k) if num_tries == n_sampled)
    ```

    Pass the result as ``sampled=`` to :func:`sampled_softmax_loss` (as
    TensorFlow's ``sampled_values``), e.g. to share one draw between losses.

    Args:
      key: a PRNG key.
      target: integer target classes, any shape (their expected counts are
        returned in that shape; values outside ``[0, n_outputs)`` are clipped).
      n_outputs: number of classes.
      n_sampled: number of distinct classes to draw, in ``[1, n_outputs]``.
      sampler: ``"log_uniform"`` (default; Zipfian, for classes sorted by
        decreasing frequency), ``"uniform"``, or an array of ``n_outputs``
        non-negative counts (unigram: ``P(k)`` proportional to ``counts[k]``).

    Returns:
      :class:`SampledValues` ``(ids (n_sampled,) int32, true_expected_count
      target.shape, sampled_expected_count (n_sampled,))``, the counts float32.

    Raises:
      ValueError: an unknown ``sampler``, counts of the wrong shape or
        negative, ``n_sampled`` out of range (or above the number of non-zero
        counts).
      TypeError: a non-integer ``target``, a traced ``n_outputs`` or ``n_sampled``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import sample_candidates
      >>> s = sample_candidates(jax.random.key(0), jnp.array([3, 7]), n_outputs=1000, n_sampled=64)
      >>> s.ids.shape, len(set(s.ids.tolist())), s.true_expected_count.shape
      ((64,), 64, (2,))
      >>> bool(s.true_expected_count[0] > s.true_expected_count[1])   # class 3 is more frequent
      True
    """
    n_outputs = _checks.static_int("n_outputs", n_outputs)
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be a positive int; got {n_outputs}")
    kind, counts = check_sampler(sampler, n_outputs)
    n_sampled = check_n_sampled(n_sampled, n_outputs, counts)
    target = _as_array("target", target)
    if not jnp.issubdtype(target.dtype, jnp.integer):
        raise TypeError(
            f"target must be an array of integer class ids; got dtype {target.dtype}. "
            "Cast it with target.astype(jnp.int32)."
        )
    return _sample_jit(key, target, counts, n_outputs=n_outputs, n_sampled=n_sampled, kind=kind)
