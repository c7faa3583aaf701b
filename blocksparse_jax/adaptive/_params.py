"""The adaptive softmax's parameters: the pytree, its initialisation and its validation.

The configuration (the shortlist size, the cutoffs, the tail clusters' widths
and sizes) is read from the arrays' shapes, so nothing static travels beside
the pytree: ``jax.grad`` returns gradients of the same structure and optimizers
treat it like any other pytree.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax import _checks
from blocksparse_jax._checks import as_array as _as_array

_shape = _checks.shape_str


class AdaptiveSoftmaxParams(NamedTuple):
    """The weights of an adaptive softmax (a pytree), laid out as ``x @ W``.

    With ``shortlist = cutoffs[0]`` and ``n_clusters`` tail clusters, cluster
    ``i`` holding the outputs ``cutoffs[i] .. cutoffs[i + 1] - 1`` (the last one
    ending at ``n_outputs``):

    Attributes:
      head_W: ``(n_in, shortlist + n_clusters)`` head weights: one column per
        shortlist output, then one per tail cluster.
      head_b: ``(shortlist + n_clusters,)`` head bias, or ``None`` (PyTorch's
        default ``head_bias=False``).
      tail_proj: ``n_clusters`` projections, ``(n_in, d_i)`` each (``d_i =
        n_in // div_value**(i + 1)`` when made by :func:`adaptive_softmax_init`).
      tail_out: ``n_clusters`` output weights, ``(d_i, cluster_size_i)`` each.
    """

    head_W: jax.Array
    head_b: jax.Array | None
    tail_proj: tuple[jax.Array, ...]
    tail_out: tuple[jax.Array, ...]

    @property
    def n_in(self) -> int:
        """The input width."""
        return int(self.head_W.shape[0])

    @property
    def n_clusters(self) -> int:
        """The number of tail clusters."""
        return len(self.tail_out)

    @property
    def shortlist_size(self) -> int:
        """The number of outputs in the head (``cutoffs[0]``)."""
        return int(self.head_W.shape[1]) - len(self.tail_out)

    @property
    def cluster_sizes(self) -> tuple[int, ...]:
        """The number of outputs in each tail cluster."""
        return tuple(int(o.shape[1]) for o in self.tail_out)

    @property
    def cutoffs(self) -> tuple[int, ...]:
        """The cutoffs, as passed to :func:`adaptive_softmax_init` (without ``n_outputs``)."""
        ends = np.cumsum((self.shortlist_size, *self.cluster_sizes))
        return tuple(int(c) for c in ends[:-1])

    @property
    def n_outputs(self) -> int:
        """The number of outputs (the vocabulary size)."""
        return self.shortlist_size + sum(self.cluster_sizes)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_cutoffs(cutoffs, n_outputs: int) -> tuple[int, ...]:
    """``cutoffs`` as a tuple of ints, strictly increasing in ``[1, n_outputs - 1]``."""
    if isinstance(cutoffs, (str, bytes)) or not isinstance(cutoffs, (Sequence, np.ndarray)):
        raise TypeError(f"cutoffs must be a sequence of ints; got {type(cutoffs).__name__}")
    values = list(np.asarray(cutoffs).reshape(-1)) if isinstance(cutoffs, np.ndarray) else cutoffs
    if len(values) == 0:
        raise ValueError(
            "cutoffs must hold at least one value (the shortlist size); got an empty sequence"
        )
    if not all(_is_int(c) for c in values):
        raise TypeError(f"cutoffs must be ints; got {list(values)!r}")
    values = tuple(int(c) for c in values)
    increasing = all(a < b for a, b in itertools.pairwise(values))
    if not increasing or values[0] < 1 or values[-1] > n_outputs - 1:
        raise ValueError(
            "cutoffs must be strictly increasing ints in [1, n_outputs - 1] = "
            f"[1, {n_outputs - 1}] (n_outputs={n_outputs}); got {list(values)}"
        )
    return values


def adaptive_softmax_init(
    key: jax.Array,
    n_in: int,
    n_outputs: int,
    cutoffs: Sequence[int],
    *,
    div_value: float = 4.0,
    head_bias: bool = False,
    dtype=jnp.float32,
) -> AdaptiveSoftmaxParams:
    r"""Initial :class:`AdaptiveSoftmaxParams`, shaped as PyTorch's ``AdaptiveLogSoftmaxWithLoss``.

    The head maps ``n_in`` to the ``cutoffs[0]`` shortlist outputs plus one
    entry per tail cluster; tail cluster ``i`` (outputs ``cutoffs[i]`` to
    ``cutoffs[i + 1] - 1``, the last one ending at ``n_outputs - 1``) projects
    ``n_in`` to ``d_i = int(n_in // div_value**(i + 1))`` and then to its
    outputs.  Every weight (and the head bias) is drawn from
    ``U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))``, the distribution of PyTorch's
    ``nn.Linear``.

    Args:
      key: a PRNG key.
      n_in: input width.
      n_outputs: number of outputs (the vocabulary size; output ids must be
        sorted by decreasing frequency, see :func:`adaptive_softmax_cutoffs`).
      cutoffs: strictly increasing ints in ``[1, n_outputs - 1]``: the
        shortlist size, then the first output of each further tail cluster.
      div_value: the width divisor between successive clusters (> 0).
      head_bias: whether the head has a bias (``head_b``; ``None`` otherwise).
      dtype: float dtype of the parameters.

    Returns:
      ``AdaptiveSoftmaxParams(head_W (n_in, cutoffs[0] + n_clusters), head_b,
      tail_proj ((n_in, d_i), ...), tail_out ((d_i, cluster_size_i), ...))``.

    Raises:
      ValueError: a non-positive ``n_in`` or ``n_outputs``, bad ``cutoffs``, a
        non-positive ``div_value``.
      TypeError: ``cutoffs`` not a sequence of ints, a non-float ``dtype``.

    Examples:
      >>> import jax
      >>> from blocksparse_jax import adaptive_softmax_init
      >>> params = adaptive_softmax_init(jax.random.key(0), 64, 1000, [100, 400])
      >>> params.head_W.shape, [w.shape for w in params.tail_proj], [w.shape for w in params.tail_out]
      ((64, 102), [(64, 16), (64, 4)], [(16, 300), (4, 600)])
      >>> params.cutoffs, params.n_outputs, params.head_b is None
      ((100, 400), 1000, True)
    """
    for name, v in (("n_in", n_in), ("n_outputs", n_outputs)):
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    n_in, n_outputs = int(n_in), int(n_outputs)
    cutoffs = check_cutoffs(cutoffs, n_outputs)
    if isinstance(div_value, bool) or not isinstance(div_value, (int, float, np.number)):
        raise TypeError(f"div_value must be a number; got {type(div_value).__name__}")
    if not (math.isfinite(div_value) and div_value > 0):
        raise ValueError(f"div_value must be a finite number > 0; got {div_value!r}")
    dtype = jnp.dtype(dtype)
    _checks.check_float("dtype", jnp.zeros((), dtype))
    ends = (*cutoffs, n_outputs)
    widths = tuple(int(n_in // (div_value ** (i + 1))) for i in range(len(cutoffs)))
    sizes = tuple(b - a for a, b in itertools.pairwise(ends))
    return _init(key, n_in, cutoffs[0], widths, sizes, bool(head_bias), dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init(key, n_in, shortlist, widths, sizes, head_bias, dtype) -> AdaptiveSoftmaxParams:
    head_size = shortlist + len(sizes)
    # (shape, fan_in) of every array, drawn from one uniform sample (one random
    # number generator in the compiled program, whatever the number of clusters).
    specs = [((n_in, head_size), n_in)]
    specs += [((head_size,), n_in)] if head_bias else []
    specs += [((n_in, d), n_in) for d in widths]
    specs += [((d, s), d) for d, s in zip(widths, sizes, strict=True)]
    total = sum(math.prod(shape) for shape, _ in specs)
    u = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    arrays, start = [], 0
    for shape, fan_in in specs:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        n = math.prod(shape)
        arrays.append((bound * u[start : start + n]).reshape(shape).astype(dtype))
        start += n
    K = len(sizes)
    head_W = arrays.pop(0)
    head_b = arrays.pop(0) if head_bias else None
    return AdaptiveSoftmaxParams(head_W, head_b, tuple(arrays[:K]), tuple(arrays[K:]))


# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------


def check_params(params) -> AdaptiveSoftmaxParams:
    """Checks the arrays of ``params`` against each other; returns them as arrays."""
    if not isinstance(params, tuple) or len(params) != 4:
        raise TypeError(
            "params must be an AdaptiveSoftmaxParams(head_W, head_b, tail_proj, tail_out) "
            f"(or a 4-tuple in that order); got {type(params).__name__}. Create one with "
            "adaptive_softmax_init or adaptive_softmax_from_torch."
        )
    head_W, head_b, proj, out = params
    head_W = _as_array("head_W", head_W)
    _checks.check_float("head_W", head_W)
    _checks.check_ndim("head_W", head_W, 2, "(n_in, shortlist + n_clusters)")
    n_in, head_size = head_W.shape
    for name, seq in (("tail_proj", proj), ("tail_out", out)):
        if not isinstance(seq, (tuple, list)):
            raise TypeError(
                f"{name} must be a tuple of arrays, one per tail cluster; got {type(seq).__name__}"
            )
    if len(proj) != len(out):
        raise ValueError(
            f"tail_proj and tail_out must hold one array per tail cluster each; got "
            f"{len(proj)} and {len(out)}"
        )
    K = len(out)
    if K < 1:
        raise ValueError("the adaptive softmax needs at least one tail cluster; got none")
    if head_size - K < 1:
        raise ValueError(
            f"head_W must have shape (n_in, shortlist + n_clusters) with a shortlist of at "
            f"least 1 output and n_clusters={K} (len(tail_out)); got shape {_shape(head_W.shape)}"
        )
    if head_b is not None:
        head_b = _as_array("head_b", head_b)
        _checks.check_float("head_b", head_b)
        if head_b.shape != (head_size,):
            raise ValueError(
                f"head_b must have shape (shortlist + n_clusters,) = {_shape((head_size,))} "
                f"(head_W.shape[1]), or be None; got shape {_shape(head_b.shape)}"
            )
    proj_arrays, out_arrays = [], []
    for i, (p, o) in enumerate(zip(proj, out, strict=True)):
        p, o = _as_array(f"tail_proj[{i}]", p), _as_array(f"tail_out[{i}]", o)
        _checks.check_float(f"tail_proj[{i}]", p)
        _checks.check_float(f"tail_out[{i}]", o)
        if p.ndim != 2 or p.shape[0] != n_in:
            raise ValueError(
                f"tail_proj[{i}] must have shape (n_in, d_{i}) with n_in={n_in} "
                f"(head_W.shape[0]); got shape {_shape(p.shape)}"
            )
        if o.ndim != 2 or o.shape[0] != p.shape[1] or o.shape[1] < 1:
            raise ValueError(
                f"tail_out[{i}] must have shape (d_{i}, cluster_size_{i}) with "
                f"d_{i}={p.shape[1]} (tail_proj[{i}].shape[1]) and cluster_size_{i} >= 1; "
                f"got shape {_shape(o.shape)}"
            )
        proj_arrays.append(p)
        out_arrays.append(o)
    return AdaptiveSoftmaxParams(head_W, head_b, tuple(proj_arrays), tuple(out_arrays))


def check_x(x, n_in: int) -> jax.Array:
    """``x`` as ``(batch, n_in)`` or ``(n_in,)`` floats."""
    x = _as_array("x", x)
    _checks.check_float("x", x)
    if x.ndim not in (1, 2):
        raise ValueError(
            f"x must be 2-D (batch, n_in) or, for one example, 1-D (n_in,); got shape "
            f"{_shape(x.shape)}"
        )
    if x.shape[-1] != n_in:
        desc = "(batch, n_in)" if x.ndim == 2 else "(n_in,)"
        raise ValueError(
            f"x must have shape {desc} with n_in={n_in} (head_W.shape[0]); got shape "
            f"{_shape(x.shape)}"
        )
    return x


def dtypes(x: jax.Array, params: AdaptiveSoftmaxParams) -> tuple[np.dtype, np.dtype]:
    """``(common dtype, accumulation dtype)`` of ``x`` and every weight."""
    dts = [a.dtype for a in jax.tree.leaves((x, params))]
    return _checks.common_float_dtype(*dts), _checks.accumulation_dtype(*dts)


def prepare(x: ArrayLike, params) -> tuple[jax.Array, AdaptiveSoftmaxParams, bool, np.dtype]:
    """Validates ``x`` and ``params``; returns ``(x as (batch, n_in), params, batched, acc)``."""
    params = check_params(params)
    x = check_x(x, params.n_in)
    _, acc = dtypes(x, params)
    batched = x.ndim == 2
    return (x if batched else x[None]), params, batched, acc
