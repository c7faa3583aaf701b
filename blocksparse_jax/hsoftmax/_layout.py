"""Class layouts: words assigned to classes by frequency."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax.hsoftmax._params import default_n_classes


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

    Usage::

        layout = frequency_classes(counts)
        params = h_softmax_init(key, n_in, layout.n_outputs, n_classes=layout.n_classes)
        out_ids = layout.word_to_output[word_ids]
        loss = h_softmax_loss(x, params, out_ids, n_outputs=layout.n_outputs,
                              class_sizes=layout.class_sizes)
        words = layout.output_to_word[h_softmax_sample(key, x, params, ...)]

    Args:
      counts: ``(n_words,)`` non-negative word counts (or frequencies).
      n_classes: number of classes, default ``ceil(sqrt(n_words))``.
      max_class_size: the largest class allowed, at least
        ``ceil(n_words / n_classes)``; default ``4 * ceil(n_words / n_classes)``,
        which bounds the second level's cost and ``W2``'s size at 4 times those
        of an even split.

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
      (array([1, 1, 6], dtype=int32), 6)
      >>> layout.word_to_output
      array([ 0,  6, 12, 13, 14, 15, 16, 17], dtype=int32)
      >>> layout.output_to_word[layout.word_to_output]
      array([0, 1, 2, 3, 4, 5, 6, 7], dtype=int32)
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be 1-D (n_words,); got shape {_shape(counts.shape)}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    n_words = counts.size
    if n_classes is None:
        n_classes = default_n_classes(n_words)
    if int(n_classes) != n_classes or not 1 <= n_classes <= n_words:
        raise ValueError(
            f"n_classes must be an int in [1, n_words] = [1, {n_words}]; got {n_classes!r}"
        )
    C = int(n_classes)
    even = -(-n_words // C)
    cap = 4 * even if max_class_size is None else int(max_class_size)
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
