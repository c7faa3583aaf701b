"""What the Flax NNX and Equinox layers share: their computations on plain arrays.

:mod:`blocksparse_jax.flax` and :mod:`blocksparse_jax.equinox` hold the
parameters and the non-trainable state in each framework's idiom and call the
functions here, so both frameworks give the same values as the functional API.
Nothing here imports Flax or Equinox.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import _checks
from blocksparse_jax.adaptive import (
    adaptive_log_softmax,
    adaptive_softmax_predict,
    adaptive_softmax_top_k,
)
from blocksparse_jax.blocksparse import sparse_block_dot, sparse_block_gemv
from blocksparse_jax.hsoftmax import (
    HSoftmaxLayout,
    HSoftmaxParams,
    h_log_softmax,
    h_softmax_loss,
    h_softmax_sample,
    h_softmax_top_k,
)
from blocksparse_jax.hsoftmax._params import default_n_classes


class SoftmaxOutput(NamedTuple):
    """What a softmax layer's ``__call__(x, target)`` returns, as PyTorch's ``AdaptiveLogSoftmaxWithLoss``.

    Attributes:
      output: ``(batch,)`` the log-probability of each target (a scalar for a
        1-D ``x``).
      loss: the scalar negative mean of ``output``.
    """

    output: jax.Array
    loss: jax.Array


def scoped(fn):
    """Runs a layer method inside ``jax.named_scope("<module>.<Class>.<method>")``.

    ``__call__`` is named after the class alone, as Equinox names its layers.
    """
    method = "" if fn.__name__ == "__call__" else f".{fn.__name__}"

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        cls = type(self)
        with jax.named_scope(f"{cls.__module__}.{cls.__name__}{method}"):
            return fn(self, *args, **kwargs)

    return wrapper


def positive_int(name: str, value) -> int:
    """``value`` as an ``int`` if it is a positive integer; a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def cast(dtype, *arrays):
    """The arrays cast to ``dtype`` (``None`` leaves them as they are; ``None`` entries stay).

    An array already of ``dtype`` is returned as it is, the same object, so that
    :func:`~blocksparse_jax.value_and_sparse_grad` (which finds a layer's
    weights by identity) sees the weight the op is given as the one it tracks.
    """
    if dtype is None:
        return arrays
    dtype = jnp.dtype(dtype)
    return tuple(
        a if a is None or (isinstance(a, jax.Array) and a.dtype == dtype)
        else jnp.asarray(a).astype(dtype)
        for a in arrays
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Hierarchical softmax


class HSoftmaxConfig(NamedTuple):
    """The static sizes of an ``HSoftmax`` layer, resolved from its arguments.

    ``n_outputs`` is what users see (the words of a layout, else the outputs);
    ``n_grid`` is the functional API's ``n_outputs`` (``n_classes *
    n_outputs_per_class`` for a layout).
    """

    n_in: int
    n_outputs: int
    n_grid: int
    n_classes: int


def hsoftmax_config(n_in, n_outputs, layout, n_classes) -> HSoftmaxConfig:
    """Checks an ``HSoftmax`` layer's arguments against each other."""
    n_in = positive_int("n_in", n_in)
    if layout is None:
        if n_outputs is None:
            raise ValueError(
                "HSoftmax needs n_outputs (the number of outputs) or layout= (an HSoftmaxLayout "
                "from frequency_classes); got neither"
            )
        n_outputs = positive_int("n_outputs", n_outputs)
        if n_classes is None:
            n_classes = default_n_classes(n_outputs)
        if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
            raise ValueError(f"n_classes must be an int; got {n_classes!r}")
        if not 1 <= n_classes <= n_outputs:
            raise ValueError(
                f"n_classes must be an int in [1, n_outputs] = [1, {n_outputs}]; got {n_classes}"
            )
        return HSoftmaxConfig(n_in, n_outputs, n_outputs, int(n_classes))
    if not isinstance(layout, HSoftmaxLayout):
        raise TypeError(
            f"layout must be an HSoftmaxLayout (from frequency_classes); got {type(layout).__name__}"
        )
    n_words = int(np.shape(layout.word_to_output)[0])
    if n_outputs is not None and n_outputs != n_words:
        raise ValueError(
            f"n_outputs must be the layout's number of words, {n_words}, or None; got {n_outputs!r}"
        )
    if n_classes is not None and n_classes != layout.n_classes:
        raise ValueError(
            f"n_classes must be the layout's n_classes, {layout.n_classes}, or None; "
            f"got {n_classes!r}"
        )
    return HSoftmaxConfig(n_in, n_words, int(layout.n_outputs), int(layout.n_classes))


def layout_arrays(layout: HSoftmaxLayout | None):
    """``(word_to_output, output_to_word, class_sizes)`` as int32 JAX arrays (``None`` without a layout)."""
    if layout is None:
        return None, None, None
    return tuple(
        jnp.asarray(np.asarray(a), jnp.int32)
        for a in (layout.word_to_output, layout.output_to_word, layout.class_sizes)
    )


class HSoftmaxState(NamedTuple):
    """An ``HSoftmax`` layer's arrays and sizes, as the functions below take them."""

    params: HSoftmaxParams
    config: HSoftmaxConfig
    word_to_output: jax.Array | None
    output_to_word: jax.Array | None
    class_sizes: jax.Array | None
    dtype: object

    def prepared(self, x):
        """``x`` and the parameters cast to the computation dtype."""
        x, *params = cast(self.dtype, x, *self.params)
        return x, HSoftmaxParams(*params)

    def to_words(self, ids: jax.Array) -> jax.Array:
        """Word ids of output ids; ``-1`` (no output) stays ``-1``."""
        if self.output_to_word is None:
            return ids
        return self.output_to_word.at[ids].get(
            mode="fill", fill_value=-1, wrap_negative_indices=False
        )

    def check_k(self, k) -> int:
        """``k`` as an int in ``[1, n_outputs]`` (the words of a layout): never more than there are."""
        k = positive_int("k", k)
        if k > self.config.n_outputs:
            what = "words in the layout" if self.output_to_word is not None else "outputs"
            raise ValueError(
                f"k must be at most the number of {what}, {self.config.n_outputs}; got k={k}"
            )
        return k

    def kwargs(self):
        return {"n_outputs": self.config.n_grid, "class_sizes": self.class_sizes}


def hsoftmax_call(s: HSoftmaxState, x, target) -> SoftmaxOutput:
    """The targets' log-probabilities and their negative mean."""
    x, params = s.prepared(x)
    if s.word_to_output is not None:
        target = _checks.as_index_array("target", target)
        _checks.check_int("target", target)
        _checks.check_index_values("target", target, s.config.n_outputs, "n_words", from_end=False)
        # Under jit an out-of-range word (a negative padding id included) becomes
        # output -1: log-probability -inf, and no gradient.
        target = s.word_to_output.at[target].get(
            mode="fill", fill_value=-1, wrap_negative_indices=False
        )
    # h_softmax_loss (not h_log_softmax with a target: the same values) is the op
    # value_and_sparse_grad follows, so W2 and b2 can get a SparseBlockGrad.
    nll = h_softmax_loss(x, params, target, reduction="none", **s.kwargs())
    return SoftmaxOutput(-nll, jnp.mean(nll))


def hsoftmax_log_prob(s: HSoftmaxState, x) -> jax.Array:
    """``(batch, n_outputs)`` log-probabilities, in word order with a layout."""
    x, params = s.prepared(x)
    logp = h_log_softmax(x, params, **s.kwargs())
    return logp if s.word_to_output is None else logp[..., s.word_to_output]


def hsoftmax_top_k(s: HSoftmaxState, x, k: int) -> tuple[jax.Array, jax.Array]:
    """The exact ``k`` best outputs (words with a layout) and their log-probabilities."""
    k = s.check_k(k)
    x, params = s.prepared(x)
    logp, ids = h_softmax_top_k(x, params, k, **s.kwargs())
    return logp, s.to_words(ids)


def hsoftmax_sample(s: HSoftmaxState, x, key) -> jax.Array:
    """One exact sample per example (a word with a layout)."""
    x, params = s.prepared(x)
    return s.to_words(h_softmax_sample(key, x, params, **s.kwargs()))


# ---------------------------------------------------------------------------
# Block-sparse linear


def block_sparse_sizes(i_blocks, o_blocks, i_size, o_size) -> tuple[int, int, int, int]:
    return tuple(
        positive_int(n, v)
        for n, v in zip(
            ("i_blocks", "o_blocks", "i_size", "o_size"),
            (i_blocks, o_blocks, i_size, o_size),
            strict=True,
        )
    )


def block_sparse_init(key, sizes, dtype) -> jax.Array:
    """``W`` of shape ``(i_blocks, o_blocks, i_size, o_size)`` from ``N(0, 1 / i_size)``."""
    i_blocks, o_blocks, i_size, o_size = sizes
    w = jax.random.normal(key, (i_blocks, o_blocks, i_size, o_size), jnp.float32)
    return (w / np.sqrt(i_size).astype(np.float32)).astype(dtype)


def block_sparse_linear(W, b, h, input_idx, output_idx, dtype) -> jax.Array:
    """``sparse_block_dot`` with bias ``b``, or ``sparse_block_gemv`` from zeros without one."""
    W, b, h = cast(dtype, W, b, h)
    if b is not None:
        return sparse_block_dot(W, h, input_idx, b, output_idx)
    o = jnp.zeros((*jnp.shape(output_idx), W.shape[3]), W.dtype)
    return sparse_block_gemv(o, W, h, input_idx, output_idx)


# ---------------------------------------------------------------------------
# Adaptive softmax


def adaptive_prepared(params, x, dtype):
    """``x`` and the parameters cast to the computation dtype."""
    if dtype is None:
        return x, params
    return jnp.asarray(x).astype(dtype), jax.tree.map(lambda a: a.astype(dtype), params)


def adaptive_call(params, x, target, dtype) -> SoftmaxOutput:
    """The targets' log-probabilities and their negative mean."""
    x, params = adaptive_prepared(params, x, dtype)
    output = adaptive_log_softmax(x, params, target)
    return SoftmaxOutput(output, -jnp.mean(output))


def adaptive_log_prob(params, x, dtype) -> jax.Array:
    x, params = adaptive_prepared(params, x, dtype)
    return adaptive_log_softmax(x, params)


def adaptive_top_k(params, x, k, dtype) -> tuple[jax.Array, jax.Array]:
    x, params = adaptive_prepared(params, x, dtype)
    return adaptive_softmax_top_k(x, params, k)


def adaptive_predict(params, x, dtype) -> jax.Array:
    x, params = adaptive_prepared(params, x, dtype)
    return adaptive_softmax_predict(x, params)


def adaptive_sample(params, x, key, dtype) -> jax.Array:
    """One exact sample per example, drawn from all ``n_outputs`` log-probabilities."""
    x, params = adaptive_prepared(params, x, dtype)
    return jax.random.categorical(key, adaptive_log_softmax(x, params), axis=-1).astype(jnp.int32)
