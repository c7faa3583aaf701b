"""Sparse gradients and lazy optimizers: a training step whose cost follows the blocks it touches.

* :func:`value_and_sparse_grad` returns the gradients of the block-sparse ops'
  weights as :class:`SparseBlockGrad` (the touched blocks only);
  :func:`embedding_lookup` is an embedding whose table's gradient is sparse
  the same way.
* :func:`lazy` runs an optax transformation on the touched blocks and their
  optimizer state only (PyTorch's ``SparseAdam``, TensorFlow's ``LazyAdam``
  semantics); :func:`apply_updates` adds the result; :func:`lazy_train_step`
  is the whole jitted step.
* :func:`rowwise_adagrad` is FBGEMM's row-wise Adagrad: one accumulator per
  row (per block), only the touched rows updated.
* :func:`training_classes` recommends the class count of a hierarchical
  softmax trained this way.
"""

from blocksparse_jax.optim._blocks import SparseBlockGrad
from blocksparse_jax.optim._classes import training_classes, training_step_cost
from blocksparse_jax.optim._embedding import embedding_lookup
from blocksparse_jax.optim._lazy import apply_updates, lazy
from blocksparse_jax.optim._rowwise import RowwiseAdagradState, row_layout, rowwise_adagrad
from blocksparse_jax.optim._step import lazy_train_step, touched_fractions
from blocksparse_jax.optim._value_and_grad import DenseGradientWarning, value_and_sparse_grad

__all__ = [
    "DenseGradientWarning",
    "RowwiseAdagradState",
    "SparseBlockGrad",
    "apply_updates",
    "embedding_lookup",
    "lazy",
    "lazy_train_step",
    "row_layout",
    "rowwise_adagrad",
    "touched_fractions",
    "training_classes",
    "training_step_cost",
    "value_and_sparse_grad",
]
