"""blocksparse_jax: block-sparse dot products and large-vocabulary softmaxes for JAX.

The functional API is re-exported here.  The subpackages ``flax`` and
``equinox`` (the layers, which need those frameworks) and ``parallel`` are
imported on first use: ``import blocksparse_jax as bsj; bsj.flax.HSoftmax``.
"""

import importlib

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
    FullSoftmaxRowParams,
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
    "FullSoftmaxRowParams",
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

_ON_FIRST_USE = {"flax": "flax", "equinox": "equinox", "parallel": None}


def __getattr__(name: str):
    """Imports the subpackages ``flax``, ``equinox`` and ``parallel`` when first used."""
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    extra = _ON_FIRST_USE[name]
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if extra is None or e.name != extra:
            raise
        raise ModuleNotFoundError(
            f"blocksparse_jax.{name} needs {extra}: install it with "
            f'python3 -m pip install -e ".[{extra}]" from a checkout',
            name=e.name,
        ) from e


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))
