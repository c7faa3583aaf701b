"""The two-level hierarchical softmax: Theano's ``h_softmax`` and a log-space API.

The ``n_outputs`` outputs are laid out on a grid of ``n_classes`` classes of
``n_outputs_per_class`` slots each; output ``o`` lives in class
``o // n_outputs_per_class``, slot ``o % n_outputs_per_class``, and:

```
p(o | x) = softmax(x @ W1 + b1)[class(o)] * softmax(x @ W2[class(o)] + b2[class(o)])[slot(o)]
```

The first level costs ``O(n_in * n_classes)`` per example.  For one target per
example the second level only needs the target's class: a ``sparse_block_dot``
over ``W2[None]`` (one input block, the target class as the output block), so
the gradient of ``W2`` is the block outer product, non-zero only in the
targets' classes.  With ``n_classes ~ n_outputs_per_class ~ sqrt(n_outputs)`` a
training step costs ``O(n_in * sqrt(n_outputs))`` per example instead of
``O(n_in * n_outputs)``.

Two families live here:

* :func:`h_softmax` reproduces Theano's function value for value, including its
  treatment of the padded slots when ``n_outputs < n_classes * n_outputs_per_class``
  (they take part in the last class's softmax and are then dropped, so a row sums
  to less than 1).
* :func:`h_log_softmax`, :func:`h_softmax_loss`, :func:`h_softmax_sgd_step`,
  :func:`h_softmax_top_k` and :func:`h_softmax_sample` work in log space on an
  :class:`HSoftmaxParams` pytree, mask the padded slots (the distribution over
  ``n_outputs`` sums to exactly 1), stay finite for logits of magnitude ``1e4``
  and accumulate float16/bfloat16 inputs in float32.  ``class_sizes=``
  describes classes of uneven size, as built by :func:`frequency_classes`.

The log-space functions take ``x`` of shape ``(..., n_in)`` (any leading batch
dimensions; targets and masks shaped ``x.shape[:-1]``), and ``n_outputs``
defaults to ``n_classes * n_outputs_per_class`` from the parameters' shapes.
Masked-out examples are selected out before any arithmetic, so a NaN there
reaches no gradient.  Differentiation is reverse mode (``jax.grad``,
``jax.jacrev``, nested ``jacrev``); forward mode (``jax.jvp``, ``jacfwd``,
``hessian``) is not supported.

Every public function validates shapes, dtypes and (when they are concrete)
target values eagerly, then runs its computation as one ``jax.jit`` cached per
configuration, so an eager call is not dispatched op by op.
"""

from blocksparse_jax.hsoftmax._decode import h_softmax_sample, h_softmax_top_k
from blocksparse_jax.hsoftmax._layout import HSoftmaxLayout, frequency_classes
from blocksparse_jax.hsoftmax._log_space import h_log_softmax, h_softmax_loss
from blocksparse_jax.hsoftmax._params import HSoftmaxParams, h_softmax_init
from blocksparse_jax.hsoftmax._sgd import h_softmax_sgd_step
from blocksparse_jax.hsoftmax._theano import h_softmax

__all__ = [
    "HSoftmaxLayout",
    "HSoftmaxParams",
    "frequency_classes",
    "h_log_softmax",
    "h_softmax",
    "h_softmax_init",
    "h_softmax_loss",
    "h_softmax_sample",
    "h_softmax_sgd_step",
    "h_softmax_top_k",
]
