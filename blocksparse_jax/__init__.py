"""blocksparse_jax: block-sparse dot products and the hierarchical softmax for JAX."""

from blocksparse_jax._blocksparse import (
    sparse_block_dot,
    sparse_block_gemv,
    sparse_block_outer,
)

__version__ = "0.1.0"

__all__ = [
    "sparse_block_dot",
    "sparse_block_gemv",
    "sparse_block_outer",
]
