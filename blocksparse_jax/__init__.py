"""blocksparse_jax: block-sparse dot products and large-vocabulary softmaxes for JAX."""

from blocksparse_jax import optim
from blocksparse_jax.adaptive import (
    AdaptiveSoftmaxLayout,
    AdaptiveSoftmaxParams,
    adaptive_log_softmax,
    adaptive_softmax_cutoffs,
    adaptive_softmax_from_torch,
    adaptive_softmax_init,
    adaptive_softmax_loss,
    adaptive_softmax_predict,
    adaptive_softmax_to_torch,
    adaptive_softmax_top_k,
)
from blocksparse_jax.blocksparse import (
    sparse_block_dot,
    sparse_block_gemv,
    sparse_block_outer,
)
from blocksparse_jax.full import (
    FullSoftmaxParams,
    full_log_softmax,
    full_softmax_init,
    full_softmax_loss,
    full_softmax_sample,
    full_softmax_top_k,
)
from blocksparse_jax.hsoftmax import (
    HSoftmaxLayout,
    HSoftmaxParams,
    frequency_classes,
    h_log_softmax,
    h_softmax,
    h_softmax_init,
    h_softmax_loss,
    h_softmax_sample,
    h_softmax_sgd_step,
    h_softmax_top_k,
)
from blocksparse_jax.optim import SparseBlockGrad, embedding_lookup, value_and_sparse_grad
from blocksparse_jax.sampled import (
    SampledValues,
    in_batch_softmax_loss,
    sample_candidates,
    sampled_softmax_loss,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptiveSoftmaxLayout",
    "AdaptiveSoftmaxParams",
    "FullSoftmaxParams",
    "HSoftmaxLayout",
    "HSoftmaxParams",
    "SampledValues",
    "SparseBlockGrad",
    "adaptive_log_softmax",
    "adaptive_softmax_cutoffs",
    "adaptive_softmax_from_torch",
    "adaptive_softmax_init",
    "adaptive_softmax_loss",
    "adaptive_softmax_predict",
    "adaptive_softmax_to_torch",
    "adaptive_softmax_top_k",
    "embedding_lookup",
    "frequency_classes",
    "full_log_softmax",
    "full_softmax_init",
    "full_softmax_loss",
    "full_softmax_sample",
    "full_softmax_top_k",
    "h_log_softmax",
    "h_softmax",
    "h_softmax_init",
    "h_softmax_loss",
    "h_softmax_sample",
    "h_softmax_sgd_step",
    "h_softmax_top_k",
    "in_batch_softmax_loss",
    "optim",
    "sample_candidates",
    "sampled_softmax_loss",
    "sparse_block_dot",
    "sparse_block_gemv",
    "sparse_block_outer",
    "value_and_sparse_grad",
]
