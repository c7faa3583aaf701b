"""Class layouts: words assigned to classes by frequency."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax.hsoftmax._params import check_count, default_n_classes


class HSoftmaxLayout(NamedTuple):
    """An assignment of words to (class, slot), as made by :func:`frequency_classes`.

    Output ``o = class * n_outputs_per_class + slot``; class ``c`` holds the
    outputs in slots ``0 .. class_sizes[c] - 1``, the rest of its slots are
    padding.

    Attributes:
      word_to_output: ``(n_words,)`` int32, the output id of every word.
      output_to_word: ``(n_outputs,)`` int32, the word of every output id, ``-1``
        for a padded slot.
      class_sizes: ``(n_classes,)`` int32, the number of words in each class;
        pass it as ``class_sizes=`` to the log-space functions.
      n_classes: the number of classes.
      n_outputs_per_class: slots per class (the largest class size).
    """

    word_to_output: np.ndarray
    output_to_word: np.ndarray
    class_sizes: np.ndarray
    n_classes: int
    n_outputs_per_class: int

    @property
    def n_outputs(self) -> int:
        """``n_classes * n_outputs_per_class``: the ``n_outputs=`` of the log-space API."""
        return self.n_classes * self.n_outputs_per_class

    def to_output(self, word_ids: ArrayLike) -> jax.Array:
        """The output id of every word id (any shape), ``-1`` for an id outside ``[0, n_words)``.

        Works eagerly and under ``jax.jit`` (the table is a constant).  A ``-1``
        output is out of range for the log-space functions: mask it
        (``mask=word_ids >= 0``) when ``-1`` is a padding id.
        """
        return _lookup(self.word_to_output, "word_ids", word_ids)

    def to_word(self, output_ids: ArrayLike) -> jax.Array:
        """The word id of every output id (any shape), ``-1`` for a padded slot or an id out of range.

        Works eagerly and under ``jax.jit``; ``layout.to_word(h_softmax_sample(...))``
        gives words.
        """
        return _lookup(self.output_to_word, "output_ids", output_ids)


def _lookup(table: np.ndarray, name: str, ids) -> jax.Array:
    """``table[ids]`` with ``-1`` where ``ids`` is outside ``[0, len(table))``, selection only."""
    if not isinstance(ids, jax.Array):
        host = np.asarray(ids)
        # Looked up on the host: JAX would wrap an int64 beyond int32 (x64 off).
        if host.dtype == object and all(type(v) is int for v in host.ravel().tolist()):
            host = np.array([v if 0 <= v < table.shape[0] else -1 for v in host.ravel()])
            host = host.reshape(np.shape(ids))
        if host.dtype.kind in "iu":
            v = host.astype(np.int64)  # a uint64 beyond int64 turns negative: out of range
            ok = (v >= 0) & (v < table.shape[0])
            return jnp.asarray(np.where(ok, table[np.where(ok, v, 0)], -1).astype(np.int32))
    ids = _as_array(name, ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array; got dtype {ids.dtype}. "
            f"Cast it with {name}.astype(jnp.int32)."
        )
    n = table.shape[0]
    ok = (ids >= 0) & (ids < jnp.asarray(min(n, int(jnp.iinfo(ids.dtype).max)), ids.dtype))
    if n > jnp.iinfo(ids.dtype).max:
        ok = ids >= 0
    safe = jnp.where(ok, ids, jnp.zeros((), ids.dtype))
    return jnp.where(ok, jnp.asarray(table)[safe], jnp.int32(-1))


def frequency_classes(
    counts: ArrayLike,
    n_classes: int | None = None,
    *,
    max_class_size: int | None = None,
) -> HSoftmaxLayout:
    r"""Assigns words to classes of roughly equal probability mass (frequency binning).

    Words are sorted by decreasing count and cut into ``n_classes`` consecutive
    runs, each class taking as close as it can to an equal share of the mass
    not yet assigned - as class-based language models do (frequent words get
    small classes, rare words large ones) - subject to every class holding
    between 1 and ``max_class_size`` words.  Within a
    class, slots follow decreasing count.  Class sizes differ; the layout pads
    every class to ``n_outputs_per_class`` (the largest size) and
    ``class_sizes=`` tells the log-space functions which slots are padding.

    Usage (``n_outputs`` defaults to the layout's ``n_outputs``, the
    parameters' ``n_classes * n_outputs_per_class``):

    ```
    layout = frequency_classes(counts)
    params = h_softmax_init(key, n_in, layout.n_outputs, n_classes=layout.n_classes)

    @jax.jit
    def loss_fn(params, x, word_ids):
        out_ids = layout.to_output(word_ids)       # a jnp lookup: works under jit
        return h_softmax_loss(x, params, out_ids, class_sizes=layout.class_sizes)

    words = layout.to_word(h_softmax_sample(key, x, params, class_sizes=layout.class_sizes))
    ```

    Uneven classes cost memory and time: the second level of every example
    costs ``n_outputs_per_class`` (the largest class) and ``W2`` holds
    ``n_classes * n_outputs_per_class`` slots.  The default cap,
    ``max_class_size = ceil(1.25 * ceil(n_words / n_classes))``, keeps ``W2``
    within 1.25 times the vocabulary; a cap of 1 forces an even split, which
    puts the most frequent words together in a class of large mass (the
    hierarchical softmax guide compares caps on Zipf counts).

    Args:
      counts: ``(n_words,)`` non-negative word counts (or frequencies).
      n_classes: number of classes, default ``ceil(sqrt(n_words))``.
      max_class_size: the largest class allowed, at least
        ``ceil(n_words / n_classes)``; default ``ceil(1.25 * ceil(n_words /
        n_classes))``, which bounds the second level's cost and ``W2``'s size
        at 1.25 times those of an even split.

    Returns:
      An :class:`HSoftmaxLayout` (NumPy arrays, computed on the host).

    Raises:
      ValueError: ``counts`` not 1-D, negative or not finite, ``n_classes``
        outside ``[1, n_words]``, ``max_class_size`` too small.

    Examples:
      >>> import numpy as np
      >>> from blocksparse_jax import frequency_classes
      >>> layout = frequency_classes(np.array([50, 20, 10, 8, 5, 4, 2, 1]), n_classes=3)
      >>> layout.class_sizes, layout.n_outputs_per_class
      (array([1, 3, 4], dtype=int32), 4)
      >>> layout.word_to_output
      array([ 0,  4,  5,  6,  8,  9, 10, 11], dtype=int32)
      >>> layout.output_to_word[layout.word_to_output]
      array([0, 1, 2, 3, 4, 5, 6, 7], dtype=int32)
      >>> import jax, jax.numpy as jnp
      >>> jax.jit(layout.to_output)(jnp.array([0, 7, -1]))   # -1: not a word
      Array([ 0, 11, -1], dtype=int32)
      >>> layout.to_word(jnp.array([8, 2]))                   # 2 is a padded slot
      Array([ 4, -1], dtype=int32)
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be 1-D (n_words,); got shape {_shape(counts.shape)}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    n_words = counts.size
    if n_classes is None:
        n_classes = default_n_classes(n_words)
    n_classes = check_count("n_classes", n_classes)
    if not 1 <= n_classes <= n_words:
        raise ValueError(
            f"n_classes must be an int in [1, n_words] = [1, {n_words}]; got {n_classes!r}"
        )
    C = int(n_classes)
    even = -(-n_words // C)
    if max_class_size is None:
        cap = -(-5 * even // 4)
    else:
        cap = check_count("max_class_size", max_class_size)
    if cap < even:
        raise ValueError(
            f"max_class_size must be at least ceil(n_words / n_classes) = {even} for "
            f"{n_words} words in {C} classes; got {max_class_size}"
        )
    if counts.sum() <= 0:
        counts = np.ones_like(counts)
    order = np.argsort(-counts, kind="stable")
    cum = np.cumsum(counts[order])
    total = cum[-1]
    sizes = np.zeros(C, np.int64)
    pos = 0
    for c in range(C):
        remaining, later = n_words - pos, C - c - 1
        lo = max(1, remaining - later * cap)
        hi = min(cap, remaining - later)
        # An equal share of the mass not yet assigned (frequent words that fill
        # a class alone may take more than 1 / n_classes).
        done = cum[pos - 1] if pos else 0.0
        goal = done + (total - done) / (C - c)
        # The end (exclusive) whose cumulative count is closest to the goal.
        end = int(np.searchsorted(cum, goal, side="left"))
        if end < n_words and (end == 0 or cum[end] - goal < goal - cum[end - 1]):
            end += 1
        sizes[c] = min(max(end - pos, lo), hi)
        pos += sizes[c]
    P = int(sizes.max())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    word_class = np.repeat(np.arange(C), sizes)
    word_slot = np.arange(n_words) - starts[word_class]
    word_to_output = np.empty(n_words, np.int32)
    word_to_output[order] = word_class * P + word_slot
    output_to_word = np.full(C * P, -1, np.int32)
    output_to_word[word_to_output] = np.arange(n_words, dtype=np.int32)
    return HSoftmaxLayout(word_to_output, output_to_word, sizes.astype(np.int32), C, P)
