"""Cutoffs for the adaptive softmax from word counts (Grave et al.'s dynamic program)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax import _checks

_shape = _checks.shape_str

# Vocabularies up to this size are cut at any position; larger ones at every
# position up to it and at this many geometrically spaced positions beyond.
_EXACT_POSITIONS = 1024


class AdaptiveSoftmaxLayout(NamedTuple):
    """Words ordered by decreasing count, cut into a shortlist and tail clusters.

    Attributes:
      word_to_output: ``(n_words,)`` int32, the output id (frequency rank) of every word.
      output_to_word: ``(n_words,)`` int32, the word of every output id.
      cutoffs: the ``cutoffs`` argument of :func:`adaptive_softmax_init`.
    """

    word_to_output: np.ndarray
    output_to_word: np.ndarray
    cutoffs: tuple[int, ...]

    @property
    def n_outputs(self) -> int:
        """The number of outputs (words)."""
        return int(self.word_to_output.shape[0])


def adaptive_softmax_cutoffs(
    counts: ArrayLike,
    n_in: int,
    *,
    n_clusters: int = 3,
    div_value: float = 4.0,
    shortlist_mass: float = 0.0,
) -> AdaptiveSoftmaxLayout:
    r"""Proposes ``cutoffs`` for :func:`adaptive_softmax_init` from word counts.

    Words are ranked by decreasing count (the adaptive softmax needs output ids
    sorted by frequency) and cut into a shortlist and ``n_clusters`` tail
    clusters so as to minimise the expected work per example of
    :func:`adaptive_softmax_loss`, by dynamic programming over the cut
    positions (Grave et al., 2017, section 4).  With ``q_i`` the share of the
    counts in tail cluster ``i``, ``size_i`` its number of words and ``d_i =
    int(n_in // div_value**(i + 1))`` its width, the cost counted is:

    ```
    (shortlist + n_clusters) * (n_in + 1) + sum_i q_i * size_i * (d_i + 1)
    ```

    multiply-adds plus one exponential per output evaluated (the projections,
    the same for every cut, are left out).

    The model counts work, not accuracy.  Narrow tail clusters are cheap, so
    the cheapest shortlist is small (tens to hundreds of words at width 128),
    and every word outside it gets a narrow output vector.  Published
    adaptive-softmax language models keep most of the counts in the shortlist
    (around 80-95%); ``shortlist_mass`` asks for a shortlist that covers at
    least that share, and the clusters after it are then placed at least cost.

    Vocabularies of more than 1024 words are cut at one of the first 1024
    positions or at one of 1024 geometrically spaced positions beyond.

    Args:
      counts: ``(n_words,)`` non-negative word counts (or frequencies).
      n_in: the input width of the adaptive softmax.
      n_clusters: number of tail clusters, at least 1.
      div_value: as in :func:`adaptive_softmax_init`.
      shortlist_mass: the least share of the counts in the shortlist, in ``[0, 1]``
        (0: the cheapest cut).

    Returns:
      An :class:`AdaptiveSoftmaxLayout` (NumPy arrays, computed on the host):
      map word ids with ``word_to_output`` before the loss, back with
      ``output_to_word``.

    Raises:
      ValueError: ``counts`` not 1-D, negative or not finite; fewer than
        ``n_clusters + 1`` words; a last cluster of width 0 (``n_in //
        div_value**n_clusters == 0``); ``shortlist_mass`` outside ``[0, 1]``.

    Examples:
      >>> import numpy as np
      >>> from blocksparse_jax import adaptive_softmax_cutoffs
      >>> counts = 1e6 / np.arange(1, 50_001)           # Zipf's law over 50,000 words
      >>> layout = adaptive_softmax_cutoffs(counts, 128, n_clusters=2)
      >>> layout.cutoffs
      (76, 3215)
      >>> adaptive_softmax_cutoffs(counts, 128, n_clusters=2, shortlist_mass=0.8).cutoffs
      (5131, 11312)
      >>> layout = adaptive_softmax_cutoffs(np.array([3, 50, 7, 20, 1]), 16, n_clusters=1)
      >>> layout.word_to_output, layout.cutoffs
      (array([3, 0, 2, 1, 4], dtype=int32), (1,))
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D (n_words,); got shape {_shape(counts.shape)}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    if isinstance(n_clusters, bool) or int(n_clusters) != n_clusters or n_clusters < 1:
        raise ValueError(f"n_clusters must be an int >= 1; got {n_clusters!r}")
    if isinstance(n_in, bool) or int(n_in) != n_in or n_in < 1:
        raise ValueError(f"n_in must be a positive int; got {n_in!r}")
    if not (math.isfinite(div_value) and div_value > 0):
        raise ValueError(f"div_value must be a finite number > 0; got {div_value!r}")
    if not 0.0 <= shortlist_mass <= 1.0:
        raise ValueError(f"shortlist_mass must be in [0, 1]; got {shortlist_mass!r}")
    K, n = int(n_clusters), counts.size
    if n < K + 1:
        raise ValueError(
            f"counts must hold at least n_clusters + 1 = {K + 1} words (a shortlist word and "
            f"one per cluster); got {n}"
        )
    widths = [int(n_in // (div_value ** (i + 1))) for i in range(K)]
    if widths[-1] < 1:
        raise ValueError(
            f"the last tail cluster would have width n_in // div_value**n_clusters = "
            f"{n_in} // {div_value}**{K} = 0; use fewer clusters, a smaller div_value or a "
            "larger n_in"
        )
    if counts.sum() <= 0:
        counts = np.ones_like(counts)
    order = np.argsort(-counts, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum(counts[order])])
    cum /= cum[-1]
    if n <= _EXACT_POSITIONS:
        grid = np.arange(n + 1)
    else:
        far = np.geomspace(_EXACT_POSITIONS, n, _EXACT_POSITIONS).round().astype(np.int64)
        grid = np.unique(np.concatenate([np.arange(_EXACT_POSITIONS), far, [n]]))
    mass = cum[grid]
    # cost[p]: the cheapest head and clusters so far, the last one ending at grid[p].
    head_ok = (grid >= 1) & (grid <= n - K) & (mass >= shortlist_mass - 1e-12)
    if not head_ok.any():  # shortlist_mass within rounding of 1: the largest shortlist
        head_ok = grid == n - K
    cost = np.where(head_ok, (grid + K) * (n_in + 1.0), np.inf)
    back = []
    for d in widths:
        # step[p, q]: cluster from grid[p] to grid[q]
        size = grid[None, :] - grid[:, None]
        step = (mass[None, :] - mass[:, None]) * size * (d + 1.0)
        total = np.where(size >= 1, cost[:, None] + step, np.inf)
        arg = np.argmin(total, axis=0)
        cost = total[arg, np.arange(grid.size)]
        back.append(arg)
    q, ends = grid.size - 1, []
    for arg in reversed(back):
        q = int(arg[q])
        ends.append(int(grid[q]))
    word_to_output = np.empty(n, np.int32)
    word_to_output[order] = np.arange(n, dtype=np.int32)
    return AdaptiveSoftmaxLayout(word_to_output, order.astype(np.int32), tuple(reversed(ends)))
