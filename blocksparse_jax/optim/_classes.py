"""The class count of a hierarchical softmax trained with lazy (touched-blocks-only) updates."""

from __future__ import annotations

import math

from blocksparse_jax.hsoftmax import _first_level, _problem


def _touched(n_classes: int, batch: int) -> float:
    """Expected number of distinct classes among ``batch`` uniformly drawn targets."""
    return n_classes * -math.expm1(batch * math.log1p(-1.0 / n_classes)) if n_classes > 1 else 1.0


def _one_chunk(n_outputs: int, n_classes: int, n_in: int, batch: int) -> bool:
    """Does the first level of a lazy step run as one chunk of classes (see ``_first_level``)?"""
    P = -(-n_outputs // n_classes)
    elements = _problem.first_level_chunk_elements(n_in * n_classes * P)
    return _first_level.chunking(batch, n_classes, elements=elements)[0] == 1


def training_step_cost(
    n_outputs: int,
    n_classes: int,
    *,
    n_in: int,
    batch: int,
    pair_cost: float = 24.0,
    update_cost: float = 16.0,
    chunked_cost: float = 3.0,
) -> float:
    r"""Modelled cost of one lazy training step of the hierarchical softmax.

    With :func:`~blocksparse_jax.value_and_sparse_grad` and
    :func:`~blocksparse_jax.optim.lazy`, a step with ``C = n_classes`` classes
    of ``P = ceil(n_outputs / C)`` slots costs, in units of one multiply-add
    of a dense matrix product:

    ```
    batch * n_in * C * f                       first level (dense products over
                                               all classes); f = 1 when it runs
                                               as one chunk, else chunked_cost
    + update_cost * n_in * C                   the dense update of W1
    + pair_cost * batch * n_in * P             second level: one block per
                                               example (block-sparse products)
    + update_cost * u(C) * n_in * P            the lazy update of the touched
                                               blocks of W2
    ```

    where ``u(C) = C * (1 - (1 - 1/C) ** batch)`` is the expected number of
    distinct classes among ``batch`` uniformly drawn targets (an upper bound
    for a Zipf-distributed vocabulary).  The first level runs as one chunk
    when its ``(batch, C)`` logits number at most ``W2``'s elements over 64
    (or the default chunk); past that it walks the classes in chunks, a loop
    whose products run on one core.  The default constants were fitted to
    lazy Adam steps measured on a 2-core CPU
    (``benchmarks/bench_sparse_training.py`` sweeps the class count); refit
    them for another machine.  The dense step (``jax.grad`` + ``optax.adam``)
    instead pays ``update_cost * n_in * C * P`` for all of ``W2``, and its
    optimum is near ``sqrt(n_outputs)``; the lazy step's second level shrinks
    with ``P`` while the first level grows with ``C``, so its optimum has
    several times more classes.

    Args:
      n_outputs: vocabulary size.
      n_classes: class count ``C``.
      n_in: input width.
      batch: examples per step.
      pair_cost: cost of the second level per example and weight, relative to a
        dense multiply-add.
      update_cost: optimizer cost per updated weight, relative to a dense multiply-add.
      chunked_cost: the first level's cost per multiply-add when it runs in chunks.

    Returns:
      The modelled cost (a float; compare values, not units).
    """
    C = int(n_classes)
    P = -(-int(n_outputs) // C)
    u = _touched(C, int(batch))
    f = 1.0 if _one_chunk(int(n_outputs), C, int(n_in), int(batch)) else chunked_cost
    return (
        batch * n_in * C * f
        + update_cost * n_in * C
        + pair_cost * batch * n_in * P
        + update_cost * u * n_in * P
    )


def training_classes(
    n_outputs: int,
    *,
    n_in: int,
    batch: int,
    pair_cost: float = 24.0,
    update_cost: float = 16.0,
    chunked_cost: float = 3.0,
    multiple: int = 8,
) -> int:
    r"""The class count that minimises a lazy training step's cost (:func:`training_step_cost`).

    For the default ``ceil(sqrt(n_outputs))`` classes a lazy step still
    updates a ``(n_in, sqrt(n_outputs))`` block of ``W2`` per distinct target
    class; more, smaller classes make each touched block cheaper at the price
    of a wider first level.  Use the result as ``h_softmax_init(...,
    n_classes=training_classes(...))`` (or as the class count of
    :func:`~blocksparse_jax.frequency_classes`).  Decoding cost
    (``h_softmax_top_k``) grows with ``n_outputs_per_class``, so the training
    optimum is also cheap to decode.

    Args:
      n_outputs: vocabulary size.
      n_in: input width.
      batch: examples per step.
      pair_cost: as in :func:`training_step_cost`.
      update_cost: as in :func:`training_step_cost`.
      chunked_cost: as in :func:`training_step_cost`.
      multiple: the slots per class are rounded to a multiple of this (SIMD-friendly
        blocks), except for vocabularies smaller than it.

    Returns:
      ``n_classes`` in ``[1, n_outputs]``.

    Raises:
      ValueError: a non-positive size.

    Examples:
      >>> from blocksparse_jax.optim import training_classes
      >>> n = training_classes(589_824, n_in=128, batch=256)
      >>> n, -(-589_824 // n)                    # classes, slots per class
      (4608, 128)
      >>> training_classes(589_824, n_in=128, batch=256) > 768     # more than sqrt(V)
      True
    """
    for name, v in (("n_outputs", n_outputs), ("n_in", n_in), ("batch", batch)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    if multiple < 1:
        raise ValueError(f"multiple must be a positive int; got {multiple!r}")
    V = int(n_outputs)
    best, best_cost = 1, math.inf
    per_class = 1
    while per_class <= V:
        P = per_class if V < multiple else max(multiple, per_class // multiple * multiple)
        C = -(-V // P)
        cost = training_step_cost(
            V,
            C,
            n_in=n_in,
            batch=batch,
            pair_cost=pair_cost,
            update_cost=update_cost,
            chunked_cost=chunked_cost,
        )
        if cost < best_cost:
            best, best_cost = C, cost
        per_class = max(per_class + 1, int(per_class * 1.05))
    return best
