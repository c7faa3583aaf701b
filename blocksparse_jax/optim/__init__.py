"""Sparse gradients and lazy optimizers: a training step whose cost follows the blocks it touches.

* :func:`value_and_sparse_grad` returns the gradients of the block-sparse ops'
  weights as :class:`SparseBlockGrad` (the touched blocks only);
  :func:`embedding_lookup` is an embedding whose table's gradient is sparse
  the same way.
* :func:`lazy` wraps an element-wise optax transformation so that it updates
  only the touched blocks and their optimizer state (PyTorch's ``SparseAdam``,
  TensorFlow's ``LazyAdam`` semantics); :func:`apply_updates` applies the result;
  :func:`lazy_train_step` is the whole jitted step.
* :func:`training_classes` recommends the class count of a hierarchical
  softmax trained this way.

Modules: ``_sparse_grad`` (``SparseBlockGrad``, ``value_and_sparse_grad``),
``_uses`` (how each op reports its sparse use), ``_embedding``, ``_lazy``
(``lazy``, ``apply_updates``), ``_classes`` (the class-count recommendation),
``_step`` (``lazy_train_step``: the whole step), ``_order`` (ordering in-place updates after the reads they overwrite).
"""

from blocksparse_jax.optim._classes import training_classes, training_step_cost
from blocksparse_jax.optim._embedding import embedding_lookup
from blocksparse_jax.optim._lazy import SparseBlockUpdate, apply_updates, lazy
from blocksparse_jax.optim._sparse_grad import SparseBlockGrad, value_and_sparse_grad
from blocksparse_jax.optim._step import lazy_train_step, touched_fractions

__all__ = [
    "SparseBlockGrad",
    "SparseBlockUpdate",
    "apply_updates",
    "embedding_lookup",
    "lazy",
    "lazy_train_step",
    "touched_fractions",
    "training_classes",
    "training_step_cost",
    "value_and_sparse_grad",
]
