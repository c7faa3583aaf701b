"""The adaptive softmax (Grave et al., 2017; PyTorch's ``AdaptiveLogSoftmaxWithLoss``)."""

from blocksparse_jax.adaptive._cutoffs import AdaptiveSoftmaxLayout, adaptive_softmax_cutoffs
from blocksparse_jax.adaptive._decode import adaptive_softmax_predict, adaptive_softmax_top_k
from blocksparse_jax.adaptive._log_space import adaptive_log_softmax, adaptive_softmax_loss
from blocksparse_jax.adaptive._params import AdaptiveSoftmaxParams, adaptive_softmax_init
from blocksparse_jax.adaptive._torch import adaptive_softmax_from_torch, adaptive_softmax_to_torch

__all__ = [
    "AdaptiveSoftmaxLayout",
    "AdaptiveSoftmaxParams",
    "adaptive_log_softmax",
    "adaptive_softmax_cutoffs",
    "adaptive_softmax_from_torch",
    "adaptive_softmax_init",
    "adaptive_softmax_loss",
    "adaptive_softmax_predict",
    "adaptive_softmax_to_torch",
    "adaptive_softmax_top_k",
]
