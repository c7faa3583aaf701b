"""Sampled softmaxes: TensorFlow's sampled softmax loss, its candidate samplers, in-batch negatives."""

from blocksparse_jax.sampled._in_batch import in_batch_softmax_loss
from blocksparse_jax.sampled._loss import sampled_softmax_loss
from blocksparse_jax.sampled._samplers import SampledValues, sample_candidates

__all__ = [
    "SampledValues",
    "in_batch_softmax_loss",
    "sample_candidates",
    "sampled_softmax_loss",
]
