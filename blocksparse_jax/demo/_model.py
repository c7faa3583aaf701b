"""The demo's language model: a fixed-window next-token predictor with any output head.

The previous ``context`` tokens are embedded, concatenated and passed through a
hidden layer; the output layer (the *head*) is one of :data:`KINDS`:

* ``"hsoftmax"``: the hierarchical softmax over a :func:`~blocksparse_jax.frequency_classes`
  layout (the head the demo is about);
* ``"full"``: the exact softmax over the whole vocabulary, logits-free
  (:func:`~blocksparse_jax.full_softmax_loss`; the baseline);
* ``"naive"``: the same exact softmax written as ``logsumexp(x @ W + b)``, which
  builds the ``(batch, vocab)`` logits;
* ``"filtered"``: the logits-free softmax with its gradient filter
  (``filter_eps``): exact loss, the gradient of the chunks of near-zero
  probability left out;
* ``"sampled"``: trained with :func:`~blocksparse_jax.sampled_softmax_loss`
  (classes drawn from the training counts), evaluated with the exact softmax;
* ``"adaptive"``: the adaptive softmax over :func:`~blocksparse_jax.adaptive_softmax_cutoffs`.

Everything else is shared, so the heads differ only in the output layer.
Word ids are the corpus's (``0`` is ``<unk>``, the others by decreasing
count); the hierarchical and adaptive softmaxes work in the output-id space
of their layouts, and the mapping happens here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import (
    AdaptiveSoftmaxLayout,
    AdaptiveSoftmaxParams,
    FullSoftmaxParams,
    HSoftmaxLayout,
    HSoftmaxParams,
    adaptive_log_softmax,
    adaptive_softmax_init,
    adaptive_softmax_loss,
    adaptive_softmax_top_k,
    full_softmax_init,
    full_softmax_loss,
    full_softmax_sample,
    full_softmax_top_k,
    h_softmax_init,
    h_softmax_loss,
    h_softmax_sample,
    h_softmax_top_k,
    sampled_softmax_loss,
)
from blocksparse_jax.optim import embedding_lookup

KINDS = ("hsoftmax", "full", "naive", "filtered", "sampled", "adaptive")

#: The heads whose parameters are a ``FullSoftmaxParams``.
EXACT_KINDS = ("full", "naive", "filtered", "sampled")

#: The gradient filter of ``"filtered"``: the probability it may leave out of each example.
FILTER_EPS = 1e-4

#: Classes the ``"sampled"`` head draws per step (at most a quarter of the vocabulary).
N_SAMPLED = 1024

#: The adaptive softmax's tail clusters, and the share of the counts its shortlist covers.
ADAPTIVE_CLUSTERS, ADAPTIVE_SHORTLIST_MASS = 2, 0.8


class ModelConfig(NamedTuple):
    """Static sizes of the model (they select the compiled programs)."""

    vocab_size: int
    context: int
    embed: int
    hidden: int


class Params(NamedTuple):
    """``embed (vocab_size, embed)``, ``W_h (context * embed, hidden)``, ``b_h (hidden,)``
    and the output layer (``HSoftmaxParams``, ``FullSoftmaxParams`` or ``AdaptiveSoftmaxParams``)."""

    embed: jax.Array
    W_h: jax.Array
    b_h: jax.Array
    out: HSoftmaxParams | FullSoftmaxParams | AdaptiveSoftmaxParams


class Output(NamedTuple):
    """What the loss needs besides the parameters: the head and its layout on the device."""

    kind: str
    word_to_output: jax.Array | None = None
    output_to_word: jax.Array | None = None
    class_sizes: jax.Array | None = None
    n_outputs: int = 0
    counts: jax.Array | None = None  # "sampled": the training counts it draws classes from

    @classmethod
    def hsoftmax(cls, layout: HSoftmaxLayout) -> Output:
        return cls(
            "hsoftmax",
            jnp.asarray(layout.word_to_output, jnp.int32),
            jnp.asarray(layout.output_to_word, jnp.int32),
            jnp.asarray(layout.class_sizes, jnp.int32),
            layout.n_outputs,
        )

    @classmethod
    def adaptive(cls, layout: AdaptiveSoftmaxLayout) -> Output:
        return cls(
            "adaptive",
            jnp.asarray(layout.word_to_output, jnp.int32),
            jnp.asarray(layout.output_to_word, jnp.int32),
            n_outputs=layout.n_outputs,
        )

    @classmethod
    def sampled(cls, counts: np.ndarray) -> Output:
        return cls("sampled", counts=jnp.asarray(counts, jnp.float32))


def adaptive_layout(counts: np.ndarray, hidden: int) -> AdaptiveSoftmaxLayout:
    """The ``"adaptive"`` head's clusters for the training ``counts``."""
    from blocksparse_jax import adaptive_softmax_cutoffs

    return adaptive_softmax_cutoffs(
        counts, hidden, n_clusters=ADAPTIVE_CLUSTERS, shortlist_mass=ADAPTIVE_SHORTLIST_MASS
    )


def init_params(key: jax.Array, cfg: ModelConfig, kind: str, layout=None) -> Params:
    """Float32 parameters; the shared layers are drawn identically for every head.

    ``layout`` is the ``HSoftmaxLayout`` of ``"hsoftmax"`` or the
    ``AdaptiveSoftmaxLayout`` of ``"adaptive"`` (unused by the other heads).
    """
    k_emb, k_h, k_out = jax.random.split(key, 3)
    n_cat = cfg.context * cfg.embed
    embed = jax.random.normal(k_emb, (cfg.vocab_size, cfg.embed), jnp.float32) * np.float32(0.1)
    W_h = jax.random.normal(k_h, (n_cat, cfg.hidden), jnp.float32) * np.float32(
        1.0 / math.sqrt(n_cat)
    )
    b_h = jnp.zeros((cfg.hidden,), jnp.float32)
    if kind == "hsoftmax":
        out = h_softmax_init(
            k_out, cfg.hidden, layout.n_outputs, n_classes=layout.n_classes, dtype=jnp.float32
        )
    elif kind == "adaptive":
        out = adaptive_softmax_init(k_out, cfg.hidden, cfg.vocab_size, layout.cutoffs)
    else:
        out = full_softmax_init(k_out, cfg.hidden, cfg.vocab_size)
    return Params(embed, W_h, b_h, out)


def features(params: Params, contexts: jax.Array) -> jax.Array:
    """``(batch, context)`` word ids -> ``(batch, hidden)`` hidden activations."""
    # (batch, context, embed); under value_and_sparse_grad the table's gradient is sparse
    e = embedding_lookup(params.embed, contexts)
    e = e.reshape(e.shape[0], -1)
    return jnp.tanh(e @ params.W_h + params.b_h[None, :])


def _naive_nll(x, out: FullSoftmaxParams, targets):
    logits = x @ out.W + out.b[None, :]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def nll(params: Params, output: Output, contexts: jax.Array, targets: jax.Array) -> jax.Array:
    """``(batch,)`` negative log-likelihoods (nats) of the target word ids, exact for every head."""
    x = features(params, contexts)
    if output.kind == "hsoftmax":
        return h_softmax_loss(
            x,
            params.out,
            output.word_to_output[targets],
            n_outputs=output.n_outputs,
            class_sizes=output.class_sizes,
            reduction="none",
        )
    if output.kind == "adaptive":
        return adaptive_softmax_loss(
            x, params.out, output.word_to_output[targets], reduction="none"
        )
    if output.kind == "naive":
        return _naive_nll(x, params.out, targets)
    return full_softmax_loss(x, params.out, targets, reduction="none")


def train_loss(
    params: Params, output: Output, contexts: jax.Array, targets: jax.Array, key: jax.Array
) -> jax.Array:
    """The training objective: the mean NLL, or the head's own training loss.

    ``"sampled"`` trains with the sampled softmax loss (``key`` draws the
    classes), ``"filtered"`` with the filtered gradient; the others with
    :func:`nll`.
    """
    if output.kind == "sampled":
        x = features(params, contexts)
        n_sampled = min(N_SAMPLED, max(1, output.counts.shape[0] // 4))
        return sampled_softmax_loss(
            key, x, params.out, targets, n_sampled=n_sampled, sampler=output.counts
        )
    if output.kind == "filtered":
        x = features(params, contexts)
        return full_softmax_loss(x, params.out, targets, filter_eps=FILTER_EPS)
    return mean_nll(params, output, contexts, targets)


def mean_nll(params: Params, output: Output, contexts: jax.Array, targets: jax.Array):
    return jnp.mean(nll(params, output, contexts, targets))


def top_k(params: Params, output: Output, contexts: jax.Array, k: int):
    """``(batch, k)`` log-probabilities and word ids of the most probable next tokens."""
    x = features(params, contexts)
    if output.kind == "hsoftmax":
        logp, out_ids = h_softmax_top_k(
            x, params.out, k, n_outputs=output.n_outputs, class_sizes=output.class_sizes
        )
        return logp, output.output_to_word[out_ids]
    if output.kind == "adaptive":
        logp, out_ids = adaptive_softmax_top_k(x, params.out, k)
        return logp, output.output_to_word[out_ids]
    return full_softmax_top_k(x, params.out, k)


def sample(key: jax.Array, params: Params, output: Output, contexts: jax.Array) -> jax.Array:
    """``(batch,)`` next word ids drawn exactly from the model's distribution."""
    x = features(params, contexts)
    if output.kind == "hsoftmax":
        out_ids = h_softmax_sample(
            key, x, params.out, n_outputs=output.n_outputs, class_sizes=output.class_sizes
        )
        return output.output_to_word[out_ids]
    if output.kind == "adaptive":
        out_ids = jax.random.categorical(key, adaptive_log_softmax(x, params.out), axis=-1)
        return output.output_to_word[out_ids.astype(jnp.int32)]
    return full_softmax_sample(key, x, params.out)


def gather_windows(tokens: jax.Array, positions: jax.Array, context: int):
    """``(batch, context)`` preceding tokens and ``(batch,)`` tokens at ``positions``."""
    offsets = jnp.arange(-context, 0, dtype=jnp.int32)
    return tokens[positions[:, None] + offsets[None, :]], tokens[positions]
