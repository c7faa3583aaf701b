"""Flax NNX layers: the softmax heads, a block-sparse linear layer and a sparse embedding.

Imported only when used (``from blocksparse_jax.flax import HSoftmax``); needs
the ``[flax]`` extra.  The layers hold their weights as ``nnx.Param`` and a
layout's word/output mapping as :class:`LayoutState` (a non-trainable
``nnx.Variable``), take ``rngs=`` like Flax's own layers, and train with
``nnx.jit``, ``nnx.value_and_grad`` and ``nnx.Optimizer(model, tx,
wrt=nnx.Param)``.  Their values are those of the functional API
(:func:`blocksparse_jax.h_log_softmax`, :func:`blocksparse_jax.full_softmax_loss`,
:func:`blocksparse_jax.sparse_block_dot`, ...).

Sparse training: :func:`~blocksparse_jax.value_and_sparse_grad` over the
``nnx.Param`` state of ``nnx.split(model, nnx.Param, ...)`` (the loss
``nnx.merge``-s the model) returns ``HSoftmax``'s ``W2`` and ``b2``,
``SampledSoftmax``'s ``W`` and ``b``, ``FullSoftmax``'s ``W`` with
``filter_eps``, ``BlockSparseLinear``'s ``W`` and ``b`` and ``Embed``'s table
as :class:`~blocksparse_jax.SparseBlockGrad`, for the lazy optimizers of
:mod:`blocksparse_jax.optim` (the loop is in the layers guide).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from blocksparse_jax import _layers
from blocksparse_jax._layers import SoftmaxOutput
from blocksparse_jax.adaptive import AdaptiveSoftmaxParams, adaptive_softmax_init
from blocksparse_jax.full import FullSoftmaxParams, full_softmax_init
from blocksparse_jax.hsoftmax import HSoftmaxLayout, HSoftmaxParams, h_softmax_init

__all__ = [
    "AdaptiveSoftmax",
    "BlockSparseLinear",
    "Embed",
    "FullSoftmax",
    "HSoftmax",
    "LayoutState",
    "SampledSoftmax",
    "SoftmaxOutput",
]


class LayoutState(nnx.Variable):
    """Non-trainable integer arrays of a layer: a layout's word/output mapping and class sizes.

    Not an ``nnx.Param``: ``nnx.grad`` and ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)`` leave it alone, and it is saved and restored with the
    model's state.
    """


class HSoftmax(_layers.HSoftmaxMethods, nnx.Module):
    """A two-level hierarchical softmax layer with its loss, decoding and sampling.

    Given ``layout`` (an :class:`~blocksparse_jax.HSoftmaxLayout` from
    :func:`~blocksparse_jax.frequency_classes`) it takes and returns word ids:
    the layout's ``word_to_output``, ``output_to_word`` and ``class_sizes`` are
    held as :class:`LayoutState`.  Without one, outputs are ``0 ..
    n_outputs - 1`` on ``n_classes`` classes of equal size.

    ``x`` is ``(batch, n_in)``, with any leading batch dimensions (``(batch,
    time, n_in)``), or ``(n_in,)`` for one example; ``target`` is ``x.shape[:-1]``.

    Args:
      n_in: input width.
      n_outputs: number of outputs; with ``layout``, ``None`` or the layout's
        number of words.
      layout: an ``HSoftmaxLayout``, or ``None``.
      n_classes: number of classes (default ``ceil(sqrt(n_outputs))``); with
        ``layout``, ``None`` or the layout's.
      dtype: the computation dtype (``x`` and the weights are cast to it), or
        ``None`` to compute in the inputs' dtypes.
      param_dtype: the weights' dtype.
      rngs: the ``nnx.Rngs`` the weights are drawn from (``rngs.params()``).

    Attributes:
      W1: ``(n_in, n_classes)`` (``nnx.Param``), as in :class:`~blocksparse_jax.HSoftmaxParams`.
      b1: ``(n_classes,)`` (``nnx.Param``).
      W2: ``(n_classes, n_in, n_outputs_per_class)`` (``nnx.Param``).
      b2: ``(n_classes, n_outputs_per_class)`` (``nnx.Param``).
      word_to_output: ``(n_words,)`` the output of every word (:class:`LayoutState`), or ``None``.
      output_to_word: ``(n_classes * n_outputs_per_class,)`` the word of every
        output, ``-1`` for padding (:class:`LayoutState`), or ``None``.
      class_sizes: ``(n_classes,)`` (:class:`LayoutState`), or ``None``.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from blocksparse_jax import frequency_classes
      >>> from blocksparse_jax.flax import HSoftmax
      >>> layout = frequency_classes(np.arange(100, 0, -1))    # 100 words by count
      >>> layer = HSoftmax(16, layout=layout, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((4, 16))
      >>> out, loss = layer(x, jnp.array([0, 5, 42, 99]))      # word ids
      >>> out.shape, loss.shape, layer.log_prob(x).shape
      ((4,), (), (4, 100))
      >>> bool(jnp.all(layer.predict(x) == jnp.argmax(layer.log_prob(x), axis=-1)))
      True
    """

    def __init__(
        self,
        n_in: int,
        n_outputs: int | None = None,
        *,
        layout: HSoftmaxLayout | None = None,
        n_classes: int | None = None,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = _layers.hsoftmax_config(n_in, n_outputs, layout, n_classes)
        params = h_softmax_init(
            rngs.params(), config.n_in, config.n_grid, n_classes=config.n_classes, dtype=param_dtype
        )
        self.W1, self.b1, self.W2, self.b2 = (nnx.Param(p) for p in params)
        w2o, o2w, sizes = _layers.layout_arrays(layout)
        self.word_to_output = nnx.data(None) if w2o is None else LayoutState(w2o)
        self.output_to_word = nnx.data(None) if o2w is None else LayoutState(o2w)
        self.class_sizes = nnx.data(None) if sizes is None else LayoutState(sizes)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _state(self) -> _layers.HSoftmaxState:
        def value(v):
            return None if v is None else v[...]

        params = HSoftmaxParams(self.W1[...], self.b1[...], self.W2[...], self.b2[...])
        return _layers.HSoftmaxState(
            params,
            self.config,
            value(self.word_to_output),
            value(self.output_to_word),
            value(self.class_sizes),
            self.dtype,
        )


class AdaptiveSoftmax(_layers.AdaptiveSoftmaxMethods, nnx.Module):
    """The adaptive softmax (PyTorch's ``AdaptiveLogSoftmaxWithLoss``) as a layer.

    A head over the ``cutoffs[0]`` most frequent outputs plus one entry per
    tail cluster, and per cluster a projection to a narrower width
    (``n_in // div_value**(i + 1)``) and its outputs; see
    :func:`~blocksparse_jax.adaptive_log_softmax`.  Output ids must be sorted
    by decreasing frequency (:func:`~blocksparse_jax.adaptive_softmax_cutoffs`
    proposes cutoffs from counts).  ``x`` is ``(batch, n_in)`` (or ``(n_in,)``).

    Args:
      n_in: input width.
      n_outputs: number of outputs.
      cutoffs: strictly increasing ints in ``[1, n_outputs - 1]``: the
        shortlist size, then the first output of each further cluster.
      div_value: the width divisor between successive clusters.
      head_bias: whether the head has a bias.
      dtype: the computation dtype (``x`` and the weights are cast to it), or
        ``None`` to compute in the inputs' dtypes.
      param_dtype: the weights' dtype.
      rngs: the ``nnx.Rngs`` the weights are drawn from (``rngs.params()``).

    Attributes:
      head_W: ``(n_in, cutoffs[0] + n_clusters)`` (``nnx.Param``).
      head_b: ``(cutoffs[0] + n_clusters,)`` (``nnx.Param``), or ``None``.
      tail_proj: an ``nnx.List`` of ``(n_in, d_i)`` projections (``nnx.Param``).
      tail_out: an ``nnx.List`` of ``(d_i, cluster_size_i)`` output weights (``nnx.Param``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from blocksparse_jax.flax import AdaptiveSoftmax
      >>> layer = AdaptiveSoftmax(16, 100, [10, 40], rngs=nnx.Rngs(0))
      >>> x = jnp.ones((4, 16))
      >>> out, loss = layer(x, jnp.array([0, 5, 42, 99]))
      >>> out.shape, loss.shape, layer.log_prob(x).shape
      ((4,), (), (4, 100))
      >>> bool(jnp.all(layer.predict(x) == jnp.argmax(layer.log_prob(x), axis=-1)))
      True
    """

    def __init__(
        self,
        n_in: int,
        n_outputs: int,
        cutoffs: Sequence[int],
        *,
        div_value: float = 4.0,
        head_bias: bool = False,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = adaptive_softmax_init(
            rngs.params(),
            n_in,
            n_outputs,
            cutoffs,
            div_value=div_value,
            head_bias=head_bias,
            dtype=param_dtype,
        )
        self.head_W = nnx.Param(params.head_W)
        self.head_b = nnx.data(None) if params.head_b is None else nnx.Param(params.head_b)
        self.tail_proj = nnx.List([nnx.Param(w) for w in params.tail_proj])
        self.tail_out = nnx.List([nnx.Param(w) for w in params.tail_out])
        self.div_value = div_value
        self.dtype = dtype
        self.param_dtype = param_dtype

    @property
    def params(self) -> AdaptiveSoftmaxParams:
        """The weights as :class:`~blocksparse_jax.AdaptiveSoftmaxParams`, for the functional API."""
        return AdaptiveSoftmaxParams(
            self.head_W[...],
            None if self.head_b is None else self.head_b[...],
            tuple(w[...] for w in self.tail_proj),
            tuple(w[...] for w in self.tail_out),
        )


class FullSoftmax(_layers.FullSoftmaxMethods, nnx.Module):
    """The exact softmax over every output, as a layer that never builds its logits.

    ``x @ W + b`` over all ``n_outputs``, with the loss, decoding and sampling
    of :func:`~blocksparse_jax.full_softmax_loss`,
    :func:`~blocksparse_jax.full_softmax_top_k` and
    :func:`~blocksparse_jax.full_softmax_sample`: each walks the outputs a
    chunk of ``chunk_size`` columns at a time, so only :meth:`log_prob` builds
    the ``(batch, n_outputs)`` array.  ``x`` is ``(batch, n_in)``, with any
    leading batch dimensions, or ``(n_in,)`` for one example; ``target`` is
    ``x.shape[:-1]``.

    Args:
      n_in: input width.
      n_outputs: number of outputs.
      use_bias: whether the layer has the bias ``b``.
      label_smoothing: in ``[0, 1)``, the loss's label smoothing (PyTorch's).
      z_loss: ``>= 0``, the weight of the loss's ``logsumexp(z)**2`` penalty.
      softcap: optional positive float: logits soft-capped to
        ``softcap * tanh(z / softcap)``, in the loss and in every method.
      filter_eps: optional probability in ``(0, 1)``: the loss's gradient
        filter (the backward pass skips chunks holding at most that much
        probability); then ``W``'s gradient under
        :func:`~blocksparse_jax.value_and_sparse_grad` holds the kept chunks
        only.  Not with ``label_smoothing``.
      chunk_size: optional columns per chunk (default: chosen from the batch).
      layout: ``"columns"`` (``W (n_in, n_outputs)``) or ``"rows"`` (``W
        (n_outputs, n_in)``, :class:`~blocksparse_jax.FullSoftmaxRowParams`:
        the layout to train lazily with the sampled loss or the gradient filter).
      dtype: the computation dtype (``x`` and the weights are cast to it), or
        ``None`` to compute in the inputs' dtypes.
      param_dtype: the weights' dtype.
      rngs: the ``nnx.Rngs`` the weights are drawn from (``rngs.params()``):
        ``W`` from ``N(0, 1 / n_in)``, ``b`` zero.

    Attributes:
      W: ``(n_in, n_outputs)`` (``nnx.Param``), as in :class:`~blocksparse_jax.FullSoftmaxParams`
        (``(n_outputs, n_in)`` with ``layout="rows"``).
      b: ``(n_outputs,)`` (``nnx.Param``), or ``None``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from blocksparse_jax.flax import FullSoftmax
      >>> layer = FullSoftmax(16, 1000, z_loss=1e-4, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((4, 16))
      >>> out, loss = layer(x, jnp.array([0, 5, 42, 999]))
      >>> out.shape, loss.shape, layer.log_prob(x).shape
      ((4,), (), (4, 1000))
      >>> bool(jnp.all(layer.predict(x) == jnp.argmax(layer.log_prob(x), axis=-1)))
      True
    """

    def __init__(
        self,
        n_in: int,
        n_outputs: int,
        *,
        use_bias: bool = True,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        filter_eps: float | None = None,
        chunk_size: int | None = None,
        layout: str = "columns",
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        config = _layers.full_softmax_config(
            label_smoothing, z_loss, softcap, filter_eps, chunk_size, layout
        )
        params = full_softmax_init(
            rngs.params(), n_in, n_outputs, bias=use_bias, dtype=param_dtype, layout=layout
        )
        self.W = nnx.Param(params.W)
        self.b = nnx.data(None) if params.b is None else nnx.Param(params.b)
        self.config = config
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype

    @property
    def params(self) -> FullSoftmaxParams:
        """The weights for the functional API, in the layer's ``layout``."""
        return _layers.full_params(
            self.config.layout, self.W[...], None if self.b is None else self.b[...]
        )


class SampledSoftmax(_layers.SampledSoftmaxMethods, nnx.Module):
    """A softmax trained by sampling (TensorFlow's sampled softmax) and evaluated exactly.

    The weights of :class:`FullSoftmax` (``W`` and ``b``, the same layout):
    the call is :func:`~blocksparse_jax.sampled_softmax_loss`, each target
    against ``n_sampled`` classes drawn with the ``key`` it is given, which
    reads ``batch + n_sampled`` columns of ``W``; :meth:`exact`,
    :meth:`log_prob`, :meth:`predict`, :meth:`top_k` and :meth:`sample` are
    those of the exact softmax over all ``n_outputs`` on the same weights.
    ``x`` is ``(batch, n_in)``, with any leading batch dimensions, or
    ``(n_in,)`` for one example; ``target`` is ``x.shape[:-1]``.

    Args:
      n_in: input width.
      n_outputs: number of outputs.
      n_sampled: number of distinct classes drawn per call, in ``[1, n_outputs]``.
      sampler: ``"log_uniform"`` (default; Zipfian, for outputs sorted by
        decreasing frequency), ``"uniform"``, or ``n_outputs`` non-negative
        unigram counts (kept as static configuration, never trained), as in
        :func:`~blocksparse_jax.sample_candidates`.
      remove_accidental_hits: give a sampled class that is the example's own
        target the logit ``-FLT_MAX`` (TensorFlow's default).
      use_bias: whether the layer has the bias ``b``.
      chunk_size: optional columns per chunk of the exact methods.
      layout: ``"columns"`` (``W (n_in, n_outputs)``) or ``"rows"`` (``W
        (n_outputs, n_in)``, :class:`~blocksparse_jax.FullSoftmaxRowParams`:
        each class's weights one contiguous row, which the lazy update reads
        and writes fastest).
      dtype: the computation dtype (``x`` and the weights are cast to it), or
        ``None`` to compute in the inputs' dtypes.
      param_dtype: the weights' dtype.
      rngs: the ``nnx.Rngs`` the weights are drawn from (``rngs.params()``):
        ``W`` from ``N(0, 1 / n_in)``, ``b`` zero.

    Attributes:
      W: ``(n_in, n_outputs)`` (``nnx.Param``), as in :class:`~blocksparse_jax.FullSoftmaxParams`
        (``(n_outputs, n_in)`` with ``layout="rows"``).
      b: ``(n_outputs,)`` (``nnx.Param``), or ``None``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from blocksparse_jax.flax import SampledSoftmax
      >>> layer = SampledSoftmax(16, 1000, n_sampled=64, rngs=nnx.Rngs(0))
      >>> x, target = jnp.ones((4, 16)), jnp.array([0, 5, 42, 999])
      >>> out, loss = layer(x, target, key=jax.random.key(1))    # training: sampled
      >>> exact_out, exact_loss = layer.exact(x, target)          # evaluation: exact
      >>> out.shape, exact_out.shape, layer.top_k(x, 3)[1].shape
      ((4,), (4,), (4, 3))
    """

    def __init__(
        self,
        n_in: int,
        n_outputs: int,
        *,
        n_sampled: int,
        sampler: str | ArrayLike = "log_uniform",
        remove_accidental_hits: bool = True,
        use_bias: bool = True,
        chunk_size: int | None = None,
        layout: str = "columns",
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        params = full_softmax_init(
            rngs.params(), n_in, n_outputs, bias=use_bias, dtype=param_dtype, layout=layout
        )
        self.config = _layers.sampled_softmax_config(
            params.n_outputs, n_sampled, sampler, remove_accidental_hits, chunk_size, layout
        )
        self.W = nnx.Param(params.W)
        self.b = nnx.data(None) if params.b is None else nnx.Param(params.b)
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype

    @property
    def params(self) -> FullSoftmaxParams:
        """The weights for the functional API, in the layer's ``layout``."""
        return _layers.full_params(
            self.config.layout, self.W[...], None if self.b is None else self.b[...]
        )


class BlockSparseLinear(_layers.BlockSparseLinearMethods, nnx.Module):
    """A block-sparse linear layer: :func:`~blocksparse_jax.sparse_block_dot` with its own weights.

    ``W`` ``(i_blocks, o_blocks, i_size, o_size)`` is drawn from ``N(0, 1 /
    i_size)`` (the scale of a dense layer over one input block), ``b``
    ``(o_blocks, o_size)`` is zero.  Each call selects, per example, the input
    blocks ``input_idx`` and the output blocks ``output_idx``:

    ```
    out[b_, j] = b[output_idx[b_, j]] + sum_i h[b_, i] @ W[input_idx[b_, i], output_idx[b_, j]]
    ```

    Args:
      i_blocks: number of input blocks.
      o_blocks: number of output blocks.
      i_size: width of an input block.
      o_size: width of an output block.
      use_bias: add ``b`` (without it, :func:`~blocksparse_jax.sparse_block_gemv` from zeros).
      dtype: the computation dtype, or ``None`` for the inputs' dtypes.
      param_dtype: the weights' dtype.
      rngs: the ``nnx.Rngs`` the weights are drawn from (``rngs.params()``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from blocksparse_jax.flax import BlockSparseLinear
      >>> layer = BlockSparseLinear(8, 8, 16, 4, rngs=nnx.Rngs(0))
      >>> h = jnp.ones((2, 3, 16))                       # batch=2, i_win=3, i_size=16
      >>> out = layer(h, jnp.array([[0, 1, 2], [5, 6, 7]]), jnp.array([[1, 2], [3, 4]]))
      >>> out.shape                                      # (batch, o_win, o_size)
      (2, 2, 4)
    """

    def __init__(
        self,
        i_blocks: int,
        o_blocks: int,
        i_size: int,
        o_size: int,
        *,
        use_bias: bool = True,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = _layers.block_sparse_sizes(i_blocks, o_blocks, i_size, o_size)
        self.W = nnx.Param(_layers.block_sparse_init(rngs.params(), sizes, param_dtype))
        if use_bias:
            self.b = nnx.Param(jnp.zeros((sizes[1], sizes[3]), param_dtype))
        else:
            self.b = nnx.data(None)
        self.i_blocks, self.o_blocks, self.i_size, self.o_size = sizes
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _weights(self) -> tuple[jax.Array, jax.Array | None]:
        return self.W[...], None if self.b is None else self.b[...]


class Embed(_layers.EmbedMethods, nnx.Module):
    """An embedding table whose gradient, under sparse training, holds only the rows looked up.

    ``nnx.Embed``'s lookup through :func:`~blocksparse_jax.embedding_lookup`:
    :func:`~blocksparse_jax.value_and_sparse_grad` returns ``embedding``'s
    gradient as a :class:`~blocksparse_jax.SparseBlockGrad` of the rows a step
    read, and :func:`blocksparse_jax.optim.lazy` updates only those rows and
    their optimizer state (PyTorch's ``nn.Embedding(sparse=True)`` with
    ``SparseAdam``).  Under ``jax.grad`` the gradient is the usual dense one.

    Args:
      num_embeddings: number of rows.
      features: width of a row.
      dtype: the dtype of the rows returned, or ``None`` for ``param_dtype``.
      param_dtype: the table's dtype.
      rngs: the ``nnx.Rngs`` the table is drawn from (``rngs.params()``), ``N(0, 1 / features)``.

    Attributes:
      embedding: ``(num_embeddings, features)`` (``nnx.Param``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from blocksparse_jax.flax import Embed
      >>> layer = Embed(1000, 8, rngs=nnx.Rngs(0))
      >>> layer(jnp.array([[3, 7], [999, 0]])).shape
      (2, 2, 8)
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike = jnp.float32,
        rngs: nnx.Rngs,
    ):
        table = _layers.embed_init(rngs.params(), num_embeddings, features, param_dtype)
        self.embedding = nnx.Param(table)
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _table(self) -> jax.Array:
        return self.embedding[...]
