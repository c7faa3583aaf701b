"""What the Flax NNX and Equinox layers share: their methods, checks and computations.

Each layer is a mixin here (``HSoftmaxMethods``, ``AdaptiveSoftmaxMethods``,
``FullSoftmaxMethods``, ``SampledSoftmaxMethods``, ``BlockSparseLinearMethods``,
``EmbedMethods``) holding the layer's methods and their
docstrings, written once on plain arrays.  :mod:`blocksparse_jax.flax` and
:mod:`blocksparse_jax.equinox` subclass each mixin with the framework's module
class, create the weights in ``__init__`` (in the framework's idiom: an
``nnx.Param`` or an array field) and give the mixin the arrays through one
accessor (``_state()`` or ``params``), so both frameworks give the values of
the functional API.  Nothing here imports Flax or Equinox.

A new layer is a mixin here, one class of a few lines in each framework's
module, and a row in the layer tests' table of layers.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from blocksparse_jax import _checks
from blocksparse_jax.adaptive import (
    AdaptiveSoftmaxParams,
    adaptive_log_softmax,
    adaptive_softmax_predict,
    adaptive_softmax_top_k,
)
from blocksparse_jax.blocksparse import sparse_block_dot, sparse_block_gemv
from blocksparse_jax.full import (
    FullSoftmaxParams,
    FullSoftmaxRowParams,
    full_log_softmax,
    full_softmax_sample,
    full_softmax_top_k,
)
from blocksparse_jax.full._loss import check_softcap, losses_and_log_probs
from blocksparse_jax.full._params import check_chunk_size, check_option
from blocksparse_jax.hsoftmax import (
    HSoftmaxLayout,
    HSoftmaxParams,
    h_log_softmax,
    h_softmax_loss,
    h_softmax_sample,
    h_softmax_top_k,
)
from blocksparse_jax.hsoftmax._params import default_n_classes
from blocksparse_jax.optim import embedding_lookup
from blocksparse_jax.sampled import sampled_softmax_loss
from blocksparse_jax.sampled._samplers import check_n_sampled, check_sampler


class SoftmaxOutput(NamedTuple):
    """What a softmax layer's ``__call__(x, target)`` returns, as PyTorch's ``AdaptiveLogSoftmaxWithLoss``.

    Attributes:
      output: ``(batch,)`` the log-probability of each target (a scalar for a
        1-D ``x``); ``SampledSoftmax``'s is that of the sampled softmax.
      loss: the scalar negative mean of ``output`` (``FullSoftmax``'s holds
        its ``z_loss`` and ``label_smoothing`` terms as well).
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
        a
        if a is None or (isinstance(a, jax.Array) and a.dtype == dtype)
        else jnp.asarray(a).astype(dtype)
        for a in arrays
    )


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


class HSoftmaxMethods:
    """The methods of the ``HSoftmax`` layers; a framework's class provides :meth:`_state`."""

    config: HSoftmaxConfig

    def _state(self) -> HSoftmaxState:
        raise NotImplementedError

    @property
    def params(self) -> HSoftmaxParams:
        """The weights as :class:`~blocksparse_jax.HSoftmaxParams`, for the functional API."""
        return self._state().params

    @property
    def n_in(self) -> int:
        """Input width."""
        return self.config.n_in

    @property
    def n_outputs(self) -> int:
        """Number of outputs (the layout's words)."""
        return self.config.n_outputs

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return self.config.n_classes

    @scoped
    def __call__(self, x: ArrayLike, target: ArrayLike) -> SoftmaxOutput:
        """The targets' log-probabilities and the loss.

        Args:
          x: ``(batch, n_in)`` inputs.
          target: ``(batch,)`` integer targets (word ids with a layout).

        Returns:
          :class:`SoftmaxOutput` ``(output, loss)``: ``output`` the ``(batch,)``
          log-probability of each target, ``loss`` its negative mean.

        Raises:
          IndexError: a concrete target outside ``[0, n_outputs)``; under
            ``jit`` such a target gets log-probability ``-inf``.
        """
        s = self._state()
        x, params = s.prepared(x)
        if s.word_to_output is not None:
            target = _checks.as_index_array("target", target)
            _checks.check_int("target", target)
            _checks.check_index_values(
                "target", target, s.config.n_outputs, "n_words", from_end=False
            )
            # Under jit an out-of-range word (a negative padding id included) becomes
            # output -1: log-probability -inf, and no gradient.
            target = s.word_to_output.at[target].get(
                mode="fill", fill_value=-1, wrap_negative_indices=False
            )
        # h_softmax_loss (not h_log_softmax with a target: the same values) is the op
        # value_and_sparse_grad follows, so W2 and b2 can get a SparseBlockGrad.
        nll = h_softmax_loss(x, params, target, reduction="none", **s.kwargs())
        return SoftmaxOutput(-nll, jnp.mean(nll))

    @scoped
    def log_prob(self, x: ArrayLike) -> jax.Array:
        """Log-probabilities of all outputs, ``(batch, n_outputs)`` (in word order with a layout)."""
        s = self._state()
        x, params = s.prepared(x)
        logp = h_log_softmax(x, params, **s.kwargs())
        return logp if s.word_to_output is None else logp[..., s.word_to_output]

    @scoped
    def predict(self, x: ArrayLike) -> jax.Array:
        """The most probable output of each example, ``(batch,)`` int32 (exact)."""
        return self.top_k(x, 1)[1][..., 0]

    @scoped
    def top_k(self, x: ArrayLike, k: int) -> tuple[jax.Array, jax.Array]:
        """The exact ``k`` most probable outputs: ``(log_probs, ids)``, both ``(batch, k)``, sorted."""
        s = self._state()
        k = s.check_k(k)
        x, params = s.prepared(x)
        logp, ids = h_softmax_top_k(x, params, k, **s.kwargs())
        return logp, s.to_words(ids)

    @scoped
    def sample(self, x: ArrayLike, key: jax.Array) -> jax.Array:
        """One exact sample per example from the layer's distribution, ``(batch,)`` int32."""
        s = self._state()
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


class BlockSparseLinearMethods:
    """The call of the ``BlockSparseLinear`` layers; a framework's class provides :meth:`_weights`."""

    dtype: object

    def _weights(self) -> tuple[jax.Array, jax.Array | None]:
        """``(W, b)``, ``b`` ``None`` without a bias."""
        raise NotImplementedError

    @scoped
    def __call__(self, h: ArrayLike, input_idx: ArrayLike, output_idx: ArrayLike) -> jax.Array:
        """The selected output blocks.

        Args:
          h: ``(batch, i_win, i_size)`` input blocks (or ``(i_win, i_size)``).
          input_idx: ``(batch, i_win)`` integer indices of the input blocks.
          output_idx: ``(batch, o_win)`` integer indices of the output blocks.

        Returns:
          ``(batch, o_win, o_size)``.
        """
        W, b, h = cast(self.dtype, *self._weights(), h)
        if b is not None:
            return sparse_block_dot(W, h, input_idx, b, output_idx)
        o = jnp.zeros((*jnp.shape(output_idx), W.shape[3]), W.dtype)
        return sparse_block_gemv(o, W, h, input_idx, output_idx)


# ---------------------------------------------------------------------------
# Adaptive softmax


class AdaptiveSoftmaxMethods:
    """The methods of the ``AdaptiveSoftmax`` layers; a framework's class provides :attr:`params`."""

    dtype: object

    @property
    def params(self) -> AdaptiveSoftmaxParams:
        """The weights as :class:`~blocksparse_jax.AdaptiveSoftmaxParams`, for the functional API."""
        raise NotImplementedError

    @property
    def n_in(self) -> int:
        """Input width."""
        return self.params.n_in

    @property
    def n_outputs(self) -> int:
        """Number of outputs."""
        return self.params.n_outputs

    @property
    def cutoffs(self) -> tuple[int, ...]:
        """The cutoffs: the shortlist size, then the first output of each further cluster."""
        return self.params.cutoffs

    def _prepared(self, x):
        """``x`` and the parameters cast to the computation dtype."""
        params = self.params
        if self.dtype is None:
            return x, params
        return jnp.asarray(x).astype(self.dtype), jax.tree.map(
            lambda a: a.astype(self.dtype), params
        )

    @scoped
    def __call__(self, x: ArrayLike, target: ArrayLike) -> SoftmaxOutput:
        """The targets' log-probabilities and the loss.

        Args:
          x: ``(batch, n_in)`` inputs.
          target: ``(batch,)`` integer targets in ``[0, n_outputs)``.

        Returns:
          :class:`SoftmaxOutput` ``(output, loss)``: ``output`` the ``(batch,)``
          log-probability of each target, ``loss`` its negative mean.
        """
        x, params = self._prepared(x)
        output = adaptive_log_softmax(x, params, target)
        return SoftmaxOutput(output, -jnp.mean(output))

    @scoped
    def log_prob(self, x: ArrayLike) -> jax.Array:
        """Log-probabilities of all outputs, ``(batch, n_outputs)``."""
        return adaptive_log_softmax(*self._prepared(x))

    @scoped
    def predict(self, x: ArrayLike) -> jax.Array:
        """The most probable output of each example, ``(batch,)`` int32 (exact)."""
        return adaptive_softmax_predict(*self._prepared(x))

    @scoped
    def top_k(self, x: ArrayLike, k: int) -> tuple[jax.Array, jax.Array]:
        """The exact ``k`` most probable outputs: ``(log_probs, ids)``, both ``(batch, k)``, sorted."""
        return adaptive_softmax_top_k(*self._prepared(x), k)

    @scoped
    def sample(self, x: ArrayLike, key: jax.Array) -> jax.Array:
        """One exact sample per example, ``(batch,)`` int32 (from all log-probabilities, as :meth:`log_prob`)."""
        logp = adaptive_log_softmax(*self._prepared(x))
        return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Full and sampled softmax


class FullSoftmaxConfig(NamedTuple):
    """A ``FullSoftmax`` layer's options, checked (see the layer's arguments)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    filter_eps: float | None = None
    chunk_size: int | None = None
    layout: str = "columns"


def check_layout(layout) -> str:
    """``"columns"`` or ``"rows"``: the layer's ``W``, as :func:`~blocksparse_jax.full_softmax_init`'s."""
    if layout not in ("columns", "rows"):
        raise ValueError(f'layout must be "columns" or "rows"; got {layout!r}')
    return layout


def full_params(layout: str, W, b) -> FullSoftmaxParams:
    """The layer's weights as the functional API's parameters of its ``layout``."""
    return (FullSoftmaxRowParams if layout == "rows" else FullSoftmaxParams)(W, b)


def full_softmax_config(label_smoothing, z_loss, softcap, filter_eps, chunk_size, layout):
    """Checks a ``FullSoftmax`` layer's options as :func:`~blocksparse_jax.full_softmax_loss` does."""
    label_smoothing = check_option("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = check_option("z_loss", z_loss, low=0.0)
    if filter_eps is not None:
        filter_eps = check_option("filter_eps", filter_eps, low=0.0, high=1.0, open_low=True)
        if label_smoothing:
            raise ValueError(
                f"filter_eps={filter_eps} cannot be used with label_smoothing={label_smoothing}: "
                "label smoothing gives every output a gradient, which the filter would drop. "
                "Leave one out."
            )
    return FullSoftmaxConfig(
        label_smoothing,
        z_loss,
        check_softcap(softcap),
        filter_eps,
        check_chunk_size(chunk_size),
        check_layout(layout),
    )


class StaticCounts:
    """A sampler's unigram counts, held as static configuration rather than as a weight.

    A float array field would be taken for a trainable weight (by
    ``eqx.is_inexact_array``, by an optimizer over the model's arrays), so the
    counts are kept as a read-only NumPy copy in an object that is no array
    and no pytree: a static field of the Equinox layer, part of the Flax
    layer's graph definition.  ``jit`` hashes those on every call: the hash is
    of the contents, computed once, and equality is identity first.
    """

    __slots__ = ("array", "_hash")

    def __init__(self, counts):
        array = np.array(counts)
        array.setflags(write=False)
        self.array = array
        self._hash = hash((array.shape, array.dtype.str, array.tobytes()))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if not isinstance(other, StaticCounts) or self._hash != other._hash:
            return False
        return self.array.dtype == other.array.dtype and np.array_equal(self.array, other.array)

    def __repr__(self) -> str:
        return f"StaticCounts(shape={self.array.shape}, dtype={self.array.dtype})"


class SampledSoftmaxConfig(NamedTuple):
    """A ``SampledSoftmax`` layer's options, checked (see the layer's arguments)."""

    n_sampled: int
    sampler: str | StaticCounts
    remove_accidental_hits: bool
    chunk_size: int | None
    layout: str = "columns"

    @property
    def softcap(self) -> None:
        """No soft cap: the sampled loss has none, so neither has the exact evaluation."""
        return None


def sampled_softmax_config(
    n_outputs, n_sampled, sampler, remove_accidental_hits, chunk_size, layout
):
    """Checks a ``SampledSoftmax`` layer's options as :func:`~blocksparse_jax.sampled_softmax_loss` does."""
    kind, counts = check_sampler(sampler, n_outputs)
    n_sampled = check_n_sampled(n_sampled, n_outputs, counts)
    if not isinstance(remove_accidental_hits, (bool, np.bool_)):
        raise TypeError(
            f"remove_accidental_hits must be a bool; got {type(remove_accidental_hits).__name__}"
        )
    sampler = kind if counts is None else StaticCounts(counts)
    return SampledSoftmaxConfig(
        n_sampled,
        sampler,
        bool(remove_accidental_hits),
        check_chunk_size(chunk_size),
        check_layout(layout),
    )


class ExactSoftmaxMethods:
    """What ``FullSoftmax`` and ``SampledSoftmax`` share: the exact softmax on ``x @ W + b``.

    A framework's class provides :attr:`params`; the subclass's ``config``
    gives ``softcap`` and ``chunk_size``.
    """

    config: FullSoftmaxConfig | SampledSoftmaxConfig
    dtype: object

    @property
    def params(self) -> FullSoftmaxParams:
        """The weights as :class:`~blocksparse_jax.FullSoftmaxParams`, for the functional API."""
        raise NotImplementedError

    @property
    def n_in(self) -> int:
        """Input width."""
        return self.params.n_in

    @property
    def n_outputs(self) -> int:
        """Number of outputs."""
        return self.params.n_outputs

    def _prepared(self, x) -> tuple[jax.Array, FullSoftmaxParams]:
        """``x`` and the parameters cast to the computation dtype."""
        x, W, b = cast(self.dtype, x, *self.params)
        return x, full_params(self.config.layout, W, b)

    def _options(self) -> dict:
        return {"softcap": self.config.softcap, "chunk_size": self.config.chunk_size}

    def _exact(self, x, target, **loss_options) -> SoftmaxOutput:
        x, params = self._prepared(x)
        losses, logp = losses_and_log_probs(x, params, target, **self._options(), **loss_options)
        return SoftmaxOutput(logp, jnp.mean(losses))

    @scoped
    def log_prob(self, x: ArrayLike) -> jax.Array:
        """Log-probabilities of all outputs, ``(batch, n_outputs)``.

        This builds the ``(batch, n_outputs)`` logits, which :meth:`predict`,
        :meth:`top_k` and :meth:`sample` never do.
        """
        x, params = self._prepared(x)
        return full_log_softmax(x, params, **self._options())

    @scoped
    def predict(self, x: ArrayLike) -> jax.Array:
        """The most probable output of each example, ``(batch,)`` int32 (exact)."""
        return self.top_k(x, 1)[1][..., 0]

    @scoped
    def top_k(self, x: ArrayLike, k: int) -> tuple[jax.Array, jax.Array]:
        """The exact ``k`` most probable outputs: ``(log_probs, ids)``, both ``(batch, k)``, sorted.

        The outputs are walked a chunk of ``chunk_size`` columns at a time
        (:func:`~blocksparse_jax.full_softmax_top_k`), without the logits.
        """
        x, params = self._prepared(x)
        return full_softmax_top_k(x, params, k, **self._options())

    @scoped
    def sample(self, x: ArrayLike, key: jax.Array) -> jax.Array:
        """One exact sample per example, ``(batch,)`` int32, without the logits (Gumbel-max by chunk)."""
        x, params = self._prepared(x)
        return full_softmax_sample(key, x, params, **self._options())


class FullSoftmaxMethods(ExactSoftmaxMethods):
    """The call of the ``FullSoftmax`` layers; a framework's class provides :attr:`params`."""

    config: FullSoftmaxConfig

    @scoped
    def __call__(self, x: ArrayLike, target: ArrayLike) -> SoftmaxOutput:
        """The targets' log-probabilities and the loss, without the ``(batch, n_outputs)`` logits.

        One pass over the outputs, a chunk of ``chunk_size`` columns at a time
        (:func:`~blocksparse_jax.full_softmax_loss`, whose backward pass
        recomputes each chunk's logits).

        Args:
          x: ``(batch, n_in)`` inputs.
          target: ``(batch,)`` integer targets in ``[0, n_outputs)``.

        Returns:
          :class:`SoftmaxOutput` ``(output, loss)``: ``output`` the ``(batch,)``
          log-probability of each target; ``loss`` the mean of
          :func:`~blocksparse_jax.full_softmax_loss`'s per-example losses,
          which is ``-mean(output)`` plus the layer's ``z_loss`` and
          ``label_smoothing`` terms when it has them.

        Raises:
          IndexError: a concrete target outside ``[0, n_outputs)``; under
            ``jit`` such a target gets log-probability ``-inf`` (and an
            infinite loss).
        """
        c = self.config
        return self._exact(
            x, target, label_smoothing=c.label_smoothing, z_loss=c.z_loss, filter_eps=c.filter_eps
        )


class SampledSoftmaxMethods(ExactSoftmaxMethods):
    """The methods of the ``SampledSoftmax`` layers; a framework's class provides :attr:`params`."""

    config: SampledSoftmaxConfig

    @property
    def n_sampled(self) -> int:
        """Number of distinct classes sampled per call."""
        return self.config.n_sampled

    @scoped
    def __call__(self, x: ArrayLike, target: ArrayLike, *, key: jax.Array) -> SoftmaxOutput:
        """The sampled softmax's loss: each target against ``n_sampled`` classes drawn with ``key``.

        :func:`~blocksparse_jax.sampled_softmax_loss`: the classes are drawn
        once for the batch, and the call reads ``batch + n_sampled`` columns
        of ``W`` (and entries of ``b``) instead of ``n_outputs``.

        Args:
          x: ``(batch, n_in)`` inputs.
          target: ``(batch,)`` integer targets in ``[0, n_outputs)``.
          key: the PRNG key the sampled classes are drawn with (a new one per
            step).

        Returns:
          :class:`SoftmaxOutput` ``(output, loss)``: ``output`` the ``(batch,)``
          log-probability of each target in the *sampled* softmax (over the
          target and the sampled classes, each logit less the log of its
          expected count), an estimate of the exact log-probability that is
          biased upwards; ``loss`` its negative mean.  :meth:`exact` gives the
          exact values.

        Raises:
          IndexError: a concrete target outside ``[0, n_outputs)``; under
            ``jit`` such a target gets ``-inf`` (and an infinite loss).
        """
        c = self.config
        x, params = self._prepared(x)
        sampler = c.sampler.array if isinstance(c.sampler, StaticCounts) else c.sampler
        losses = sampled_softmax_loss(
            key,
            x,
            params,
            target,
            n_sampled=c.n_sampled,
            sampler=sampler,
            remove_accidental_hits=c.remove_accidental_hits,
            reduction="none",
        )
        return SoftmaxOutput(-losses, jnp.mean(losses))

    @scoped
    def exact(self, x: ArrayLike, target: ArrayLike) -> SoftmaxOutput:
        """The exact softmax's ``(output, loss)`` on the same weights, for evaluation.

        What ``FullSoftmax``'s call gives: ``output`` the ``(batch,)`` exact
        log-probability of each target, ``loss`` its negative mean, in one pass
        over all ``n_outputs`` columns without the logits
        (:func:`~blocksparse_jax.full_softmax_loss`).
        """
        return self._exact(x, target)


# ---------------------------------------------------------------------------
# Embedding


def embed_init(key, n_rows, dim, dtype) -> jax.Array:
    """``(n_rows, dim)`` drawn from ``N(0, 1 / dim)`` (the scale of Flax's ``nnx.Embed``)."""
    n_rows, dim = positive_int("num_embeddings", n_rows), positive_int("features", dim)
    table = jax.random.normal(key, (n_rows, dim), jnp.float32) * np.float32(dim**-0.5)
    return table.astype(dtype)


class EmbedMethods:
    """The call of the ``Embed`` layers; a framework's class provides :meth:`_table`."""

    dtype: object

    def _table(self) -> jax.Array:
        """The ``(num_embeddings, features)`` table."""
        raise NotImplementedError

    @property
    def num_embeddings(self) -> int:
        """Number of rows."""
        return self._table().shape[0]

    @property
    def features(self) -> int:
        """Width of a row."""
        return self._table().shape[1]

    @scoped
    def __call__(self, ids: ArrayLike) -> jax.Array:
        """The rows of ``ids`` (any integer shape): ``(*ids.shape, features)``.

        The table is read by :func:`~blocksparse_jax.embedding_lookup` as it is
        (the rows are cast to ``dtype`` afterwards), so that
        :func:`~blocksparse_jax.value_and_sparse_grad` gives it a gradient of
        the rows read only.  Under ``jit`` an id outside ``[0,
        num_embeddings)`` (a ``-1`` padding id) reads zeros and trains nothing;
        a concrete one raises ``IndexError``.
        """
        rows = embedding_lookup(self._table(), ids)
        return rows if self.dtype is None else rows.astype(self.dtype)
