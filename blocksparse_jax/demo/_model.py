"""The demo's language model: a fixed-window next-token predictor.

The previous ``context`` tokens are embedded, concatenated and passed through a
hidden layer; the output layer is either the hierarchical softmax of
``blocksparse_jax`` (``"hsoftmax"``) or an exact softmax over the whole
vocabulary (``"full"``, the baseline).  Everything else is shared, so the two
differ only in the output layer's cost.

Word ids are the corpus's (``0`` is ``<unk>``); the hierarchical softmax works
in the output-id space of a :func:`~blocksparse_jax.frequency_classes` layout,
and the mapping happens here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import (
    HSoftmaxLayout,
    HSoftmaxParams,
    h_softmax_init,
    h_softmax_loss,
    h_softmax_sample,
    h_softmax_top_k,
)
from blocksparse_jax.optim import embedding_lookup

KINDS = ("hsoftmax", "full")


class ModelConfig(NamedTuple):
    """Static sizes of the model (they select the compiled programs)."""

    vocab_size: int
    context: int
    embed: int
    hidden: int


class FullSoftmaxParams(NamedTuple):
    """The baseline's output layer: ``W (hidden, vocab_size)``, ``b (vocab_size,)``."""

    W: jax.Array
    b: jax.Array


class Params(NamedTuple):
    """``embed (vocab_size, embed)``, ``W_h (context * embed, hidden)``, ``b_h (hidden,)``
    and the output layer (``HSoftmaxParams`` or ``FullSoftmaxParams``)."""

    embed: jax.Array
    W_h: jax.Array
    b_h: jax.Array
    out: HSoftmaxParams | FullSoftmaxParams


class Output(NamedTuple):
    """What the loss needs besides the parameters: the h_softmax layout on the device."""

    kind: str
    word_to_output: jax.Array | None = None
    output_to_word: jax.Array | None = None
    class_sizes: jax.Array | None = None
    n_outputs: int = 0

    @classmethod
    def hsoftmax(cls, layout: HSoftmaxLayout) -> Output:
        return cls(
            "hsoftmax",
            jnp.asarray(layout.word_to_output, jnp.int32),
            jnp.asarray(layout.output_to_word, jnp.int32),
            jnp.asarray(layout.class_sizes, jnp.int32),
            layout.n_outputs,
        )


def init_params(key: jax.Array, cfg: ModelConfig, kind: str, layout: HSoftmaxLayout | None):
    """Float32 parameters; the shared layers are drawn identically for both kinds."""
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
    else:
        W = jax.random.normal(k_out, (cfg.hidden, cfg.vocab_size), jnp.float32) * np.float32(
            1.0 / math.sqrt(cfg.hidden)
        )
        out = FullSoftmaxParams(W, jnp.zeros((cfg.vocab_size,), jnp.float32))
    return Params(embed, W_h, b_h, out)


def features(params: Params, contexts: jax.Array) -> jax.Array:
    """``(batch, context)`` word ids -> ``(batch, hidden)`` hidden activations."""
    # (batch, context, embed); under value_and_sparse_grad the table's gradient is sparse
    e = embedding_lookup(params.embed, contexts)
    e = e.reshape(e.shape[0], -1)
    return jnp.tanh(e @ params.W_h + params.b_h[None, :])


def nll(params: Params, output: Output, contexts: jax.Array, targets: jax.Array) -> jax.Array:
    """``(batch,)`` negative log-likelihoods (nats) of the target word ids."""
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
    logits = x @ params.out.W + params.out.b[None, :]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def mean_nll(params: Params, output: Output, contexts: jax.Array, targets: jax.Array):
    return jnp.mean(nll(params, output, contexts, targets))


def top_k(params: Params, output: Output, contexts: jax.Array, k: int):
    """``(batch, k)`` log-probabilities and word ids of the most probable next tokens."""
    logp, out_ids = h_softmax_top_k(
        features(params, contexts),
        params.out,
        k,
        n_outputs=output.n_outputs,
        class_sizes=output.class_sizes,
    )
    return logp, output.output_to_word[out_ids]


def sample(key: jax.Array, params: Params, output: Output, contexts: jax.Array) -> jax.Array:
    """``(batch,)`` next word ids drawn exactly from the model's distribution."""
    out_ids = h_softmax_sample(
        key,
        features(params, contexts),
        params.out,
        n_outputs=output.n_outputs,
        class_sizes=output.class_sizes,
    )
    return output.output_to_word[out_ids]


def gather_windows(tokens: jax.Array, positions: jax.Array, context: int):
    """``(batch, context)`` preceding tokens and ``(batch,)`` tokens at ``positions``."""
    offsets = jnp.arange(-context, 0, dtype=jnp.int32)
    return tokens[positions[:, None] + offsets[None, :]], tokens[positions]
