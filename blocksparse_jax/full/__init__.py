"""The exact softmax over every output, without its ``(batch, n_outputs)`` logits in memory."""

from blocksparse_jax.full._decode import full_softmax_sample, full_softmax_top_k
from blocksparse_jax.full._loss import full_log_softmax, full_softmax_loss
from blocksparse_jax.full._params import FullSoftmaxParams, FullSoftmaxRowParams, full_softmax_init

__all__ = [
    "FullSoftmaxParams",
    "FullSoftmaxRowParams",
    "full_log_softmax",
    "full_softmax_init",
    "full_softmax_loss",
    "full_softmax_sample",
    "full_softmax_top_k",
]
