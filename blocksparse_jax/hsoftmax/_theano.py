"""Theano's ``h_softmax``, value for value (padded slots included)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from blocksparse_jax import _targets
from blocksparse_jax._checks import static_int
from blocksparse_jax._scope import named
from blocksparse_jax.hsoftmax import _formulas as _f
from blocksparse_jax.hsoftmax._params import check_params
from blocksparse_jax.hsoftmax._validate import check_n_outputs, check_x


@named
def h_softmax(
    x: ArrayLike,
    batch_size: int,
    n_outputs: int,
    n_classes: int,
    n_outputs_per_class: int,
    W1: ArrayLike,
    b1: ArrayLike,
    W2: ArrayLike,
    b2: ArrayLike,
    target: ArrayLike | None = None,
) -> jax.Array:
    r"""Two-level hierarchical softmax, exactly as Theano's ``h_softmax``.

    With ``class_probs = softmax(x @ W1 + b1)`` and, for every class ``c``,
    ``p_c = softmax(x @ W2[c] + b2[c])`` over its ``n_outputs_per_class`` slots:

    ```
    out[b, o] = class_probs[b, o // n_outputs_per_class] * p_{o // n_outputs_per_class}[b, o % n_outputs_per_class]
    ```

    Without ``target`` every output is computed (``O(n_in * n_classes *
    n_outputs_per_class)`` per example).  With ``target`` only the target's
    class is: a ``sparse_block_dot`` over ``W2[None]`` as in Theano's code,
    whose weight gradient is the block outer product.

    Compatibility note: when ``n_outputs < n_classes * n_outputs_per_class``,
    Theano lets the padded slots of the last class take part in that class's
    softmax and then drops them, so a row sums to less than 1.  This function
    keeps that; :func:`h_log_softmax` masks the padding instead.

    Args:
      x: ``(batch_size, n_in)`` inputs.
      batch_size: ``x.shape[0]``.
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``.
      n_classes: number of classes (``W1.shape[1]``).
      n_outputs_per_class: slots per class (``W2.shape[2]``).
      W1: ``(n_in, n_classes)`` class weights.
      b1: ``(n_classes,)`` class bias.
      W2: ``(n_classes, n_in, n_outputs_per_class)`` second-level weights.
      b2: ``(n_classes, n_outputs_per_class)`` second-level bias.
      target: optional ``(batch_size,)`` or ``(batch_size, 1)`` integer outputs
        in ``[0, n_outputs)``.

    Returns:
      ``(batch_size, n_outputs)`` probabilities without ``target``, else the
      ``(batch_size,)`` probability of each target; in the common dtype of the
      float inputs (computed in float32 for float16/bfloat16).

    Raises:
      TypeError: non-float weights or inputs, non-integer ``target``.
      ValueError: a shape argument that does not match the arrays.
      IndexError: a concrete ``target`` outside ``[0, n_outputs)`` (Theano
        returned "ghost" probabilities for some of these).  Under ``jit`` such a
        target has probability 0 and ``checkify.index_checks`` reports it.

    Examples:
      >>> import jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax
      >>> x = jnp.ones((2, 3))
      >>> W1, b1 = jnp.zeros((3, 2)), jnp.zeros((2,))
      >>> W2, b2 = jnp.zeros((2, 3, 2)), jnp.zeros((2, 2))
      >>> h_softmax(x, 2, 4, 2, 2, W1, b1, W2, b2)
      Array([[0.25, 0.25, 0.25, 0.25],
             [0.25, 0.25, 0.25, 0.25]], dtype=float32)
      >>> h_softmax(x, 2, 3, 2, 2, W1, b1, W2, b2, jnp.array([2, 0]))  # padded: rows sum to 0.75
      Array([0.25, 0.25], dtype=float32)

    References:
      Theano ``theano.tensor.nnet.h_softmax``; Morin and Bengio, "Hierarchical
      Probabilistic Neural Network Language Model", AISTATS 2005.
    """
    W1, b1, W2, b2 = check_params((W1, b1, W2, b2))
    x = check_x(x, W1.shape[0], theano=True)
    for name, given, actual, source in (
        ("batch_size", batch_size, x.shape[0], "x.shape[0]"),
        ("n_classes", n_classes, W1.shape[1], "W1.shape[1]"),
        ("n_outputs_per_class", n_outputs_per_class, W2.shape[2], "W2.shape[2]"),
    ):
        if isinstance(given, jax.core.Tracer):
            static_int(name, given)  # raises, saying how to mark it static
        if given != actual:
            raise ValueError(f"{name}={given} does not match {source}={actual}; pass {actual}")
    n_outputs = check_n_outputs(n_outputs, W2.shape[0], W2.shape[2])
    dt, acc = _f.dtypes(x, W1, b1, W2, b2)
    if target is not None:
        target, value = _targets.check_target(target, (x.shape[0],))
        _targets.check_target_range(value, n_outputs)
    return _h_softmax(x, W1, b1, W2, b2, target, n_outputs=n_outputs, dt=dt, acc=acc)


@functools.partial(jax.jit, static_argnames=("n_outputs", "dt", "acc"))
def _h_softmax(x, W1, b1, W2, b2, target, *, n_outputs, dt, acc):
    """Theano's code, line by line (after validation)."""
    batch_size, n_outputs_per_class = x.shape[0], W2.shape[2]
    class_probs = jax.nn.softmax(_f.class_logits(x, W1, b1, acc), axis=-1)
    if target is None:
        output_probs = jax.nn.softmax(_f.all_activations(x, W2, b2, acc), axis=-1)
        output_probs = class_probs[:, :, None] * output_probs
        return output_probs.reshape(batch_size, W2.shape[0] * n_outputs_per_class)[
            :, :n_outputs
        ].astype(dt)
    t, valid = _targets.normalize_target(target, n_outputs)
    target_classes = t // n_outputs_per_class
    target_outputs_in_class = t % n_outputs_per_class
    output_probs = jax.nn.softmax(_f.target_activations(x, W2, b2, target_classes, acc), axis=-1)
    rows = jnp.arange(batch_size)
    probs = class_probs[rows, target_classes] * output_probs[rows, target_outputs_in_class]
    return jnp.where(valid, probs, jnp.zeros((), acc)).astype(dt)
