"""The two-level hierarchical softmax: Theano's ``h_softmax`` and a log-space API.

The ``n_outputs`` outputs are laid out on a grid of ``n_classes`` classes of
``n_outputs_per_class`` slots each; output ``o`` lives in class
``o // n_outputs_per_class``, slot ``o % n_outputs_per_class``, and::

    p(o | x) = softmax(x @ W1 + b1)[class(o)] * softmax(x @ W2[class(o)] + b2[class(o)])[slot(o)]

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
* :func:`h_log_softmax`, :func:`h_softmax_loss`, :func:`h_softmax_top_k` and
  :func:`h_softmax_sample` work in log space on an :class:`HSoftmaxParams`
  pytree, mask the padded slots (the distribution over ``n_outputs`` sums to
  exactly 1), stay finite for logits of magnitude ``1e4`` and accumulate
  float16/bfloat16 inputs in float32.  ``class_sizes=`` describes classes of
  uneven size, as built by :func:`frequency_classes`.

Every public function validates shapes, dtypes and (when they are concrete)
target values eagerly, then runs its computation as one ``jax.jit`` cached per
configuration, so an eager call is not dispatched op by op.

Shape letters: ``batch``; ``n_in`` the input width; ``n_classes``;
``n_outputs_per_class``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from blocksparse_jax import _checks
from blocksparse_jax._blocksparse import _as_array, sparse_block_dot, sparse_block_outer

__all__ = [
    "HSoftmaxLayout",
    "HSoftmaxParams",
    "frequency_classes",
    "h_log_softmax",
    "h_softmax",
    "h_softmax_init",
    "h_softmax_loss",
    "h_softmax_sample",
    "h_softmax_top_k",
]

_shape = _checks.shape_str

# The exact top-k search visits at most this many classes per step, and at
# most this many elements (batch * classes_per_step * n_outputs_per_class,
# 16 MiB in float32) per step.  Small steps stop the search early.
_TOP_K_CLASSES_PER_STEP = 16
_TOP_K_CHUNK_ELEMENTS = 1 << 22


class HSoftmaxParams(NamedTuple):
    """The weights of a two-level hierarchical softmax (a pytree).

    Attributes:
      W1: ``(n_in, n_classes)`` first-level (class) weights.
      b1: ``(n_classes,)`` first-level bias.
      W2: ``(n_classes, n_in, n_outputs_per_class)`` second-level weights, one
        ``(n_in, n_outputs_per_class)`` block per class.
      b2: ``(n_classes, n_outputs_per_class)`` second-level bias.
    """

    W1: jax.Array
    b1: jax.Array
    W2: jax.Array
    b2: jax.Array


class HSoftmaxLayout(NamedTuple):
    """An assignment of words to (class, slot), as made by :func:`frequency_classes`.

    Output ``o = class * n_outputs_per_class + slot``; class ``c`` holds the
    outputs in slots ``0 .. class_sizes[c] - 1``, the rest of its slots are
    padding.

    Attributes:
      word_to_output: ``(n_words,)`` int32, the output id of every word.
      output_to_word: ``(n_outputs,)`` int32, the word of every output id, ``-1``
        for a padded slot.
      class_sizes: ``(n_classes,)`` int32, the number of words in each class;
        pass it as ``class_sizes=`` to the log-space functions.
      n_classes: the number of classes.
      n_outputs_per_class: slots per class (the largest class size).
    """

    word_to_output: np.ndarray
    output_to_word: np.ndarray
    class_sizes: np.ndarray
    n_classes: int
    n_outputs_per_class: int

    @property
    def n_outputs(self) -> int:
        """``n_classes * n_outputs_per_class``: the ``n_outputs=`` of the log-space API."""
        return self.n_classes * self.n_outputs_per_class


# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------


def _check_params(params) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Checks the four weight arrays against each other; returns them as arrays."""
    if not isinstance(params, tuple) or len(params) != 4:
        raise TypeError(
            "params must be an HSoftmaxParams(W1, b1, W2, b2) (or a 4-tuple in that order); "
            f"got {type(params).__name__}. Create one with h_softmax_init."
        )
    W1, b1, W2, b2 = (
        _as_array(n, a) for n, a in zip(("W1", "b1", "W2", "b2"), params, strict=True)
    )
    for name, a in (("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)):
        _checks.check_float(name, a)
    _checks.check_ndim("W1", W1, 2, "(n_in, n_classes)")
    n_in, n_classes = W1.shape
    if b1.shape != (n_classes,):
        raise ValueError(
            f"b1 must have shape (n_classes,) = {_shape((n_classes,))} with n_classes={n_classes} "
            f"(W1.shape[1]); got shape {_shape(b1.shape)}"
        )
    _checks.check_ndim("W2", W2, 3, "(n_classes, n_in, n_outputs_per_class)")
    if W2.shape[:2] != (n_classes, n_in):
        raise ValueError(
            "W2 must have shape (n_classes, n_in, n_outputs_per_class) with "
            f"n_classes={n_classes} (W1.shape[1]) and n_in={n_in} (W1.shape[0]); "
            f"got shape {_shape(W2.shape)}"
        )
    if b2.shape != (n_classes, W2.shape[2]):
        raise ValueError(
            "b2 must have shape (n_classes, n_outputs_per_class) = "
            f"{_shape((n_classes, W2.shape[2]))} from W2 of shape {_shape(W2.shape)}; "
            f"got shape {_shape(b2.shape)}"
        )
    return W1, b1, W2, b2


def _check_x(x, n_in: int, *, allow_1d: bool) -> jax.Array:
    x = _as_array("x", x)
    _checks.check_float("x", x)
    if x.ndim != 2 and not (allow_1d and x.ndim == 1):
        also = " or, for one example, 1-D (n_in,)" if allow_1d else ""
        raise ValueError(f"x must be 2-D (batch, n_in){also}; got shape {_shape(x.shape)}")
    if x.shape[-1] != n_in:
        desc = "(batch, n_in)" if x.ndim == 2 else "(n_in,)"
        raise ValueError(
            f"x must have shape {desc} with n_in={n_in} (W1.shape[0]); got shape {_shape(x.shape)}"
        )
    return x


def _check_n_outputs(n_outputs, n_classes: int, per_class: int) -> int:
    if isinstance(n_outputs, bool) or not isinstance(n_outputs, (int, np.integer)):
        raise TypeError(f"n_outputs must be a Python int; got {type(n_outputs).__name__}")
    n_outputs = int(n_outputs)
    if not 1 <= n_outputs <= n_classes * per_class:
        raise ValueError(
            f"n_outputs must be in [1, n_classes * n_outputs_per_class] = "
            f"[1, {n_classes * per_class}] (n_classes={n_classes}, "
            f"n_outputs_per_class={per_class}); got n_outputs={n_outputs}"
        )
    return n_outputs


def _check_class_sizes(class_sizes, n_classes: int, per_class: int) -> jax.Array | None:
    if class_sizes is None:
        return None
    class_sizes = _as_array("class_sizes", class_sizes)
    _checks.check_int("class_sizes", class_sizes)
    if class_sizes.shape != (n_classes,):
        raise ValueError(
            f"class_sizes must have shape (n_classes,) = {_shape((n_classes,))} with "
            f"n_classes={n_classes} (W1.shape[1]); got shape {_shape(class_sizes.shape)}"
        )
    value = _checks.concrete_value(class_sizes)
    if value is not None and ((value < 0) | (value > per_class)).any():
        raise ValueError(
            f"class_sizes must lie in [0, n_outputs_per_class] = [0, {per_class}]; "
            f"got {value.tolist()}"
        )
    return class_sizes.astype(jnp.int32)


def _check_target(target, batch: int, n_outputs: int, *, batched: bool) -> jax.Array:
    """Validates ``target``; returns it as ``(batch,)`` (or ``()``) of the input's int dtype."""
    target = _as_array("target", target)
    _checks.check_int("target", target)
    if batched:
        if target.shape not in ((batch,), (batch, 1)):
            raise ValueError(
                f"target must have shape (batch,) or (batch, 1) with batch={batch} "
                f"(x.shape[0]); got shape {_shape(target.shape)}"
            )
        return target.reshape(batch)
    if target.size != 1 or target.ndim > 1:
        raise ValueError(
            f"target must be a scalar (or shape (1,)) for a 1-D x; got shape {_shape(target.shape)}"
        )
    return target.reshape(())


def _check_target_values(target, n_outputs: int) -> None:
    """Raises ``IndexError`` if a concrete ``target`` holds a value outside ``[0, n_outputs)``."""
    value = _checks.concrete_value(target)
    if value is None or value.size == 0:
        return
    bad = (value < 0) | (value >= n_outputs)
    if bad.any():
        pos = tuple(int(p) for p in np.argwhere(bad)[0])
        raise IndexError(
            f"target holds {int(value[pos])} at position {pos}, out of range for "
            f"n_outputs={n_outputs} (valid targets are 0 <= t < {n_outputs})"
        )


def _normalize_target(target: jax.Array, n_outputs: int) -> tuple[jax.Array, jax.Array]:
    """``(int32 target in [0, n_outputs), valid mask)``; raises ``IndexError`` when concrete.

    Targets count from 0 only (a negative target is out of range).  Under ``jit``
    an out-of-range entry comes back as 0 with ``valid == False``, and the
    ``fill``-mode probe gather of ``_checks`` makes ``checkify.index_checks``
    report it, with its value.
    """
    _check_target_values(target, n_outputs)
    info = jnp.iinfo(target.dtype)
    i32 = jnp.iinfo(jnp.int32)
    lo, hi = max(int(info.min), int(i32.min)), min(int(info.max), int(i32.max))
    raw = jnp.clip(target, jnp.asarray(lo, target.dtype), jnp.asarray(hi, target.dtype))
    raw = raw.astype(jnp.int32)
    valid = _checks._probe_gather(n_outputs, raw)
    return jnp.where(valid, raw, jnp.zeros((), jnp.int32)), valid


def _check_padding_target(t, class_sizes, per_class: int) -> None:
    """A concrete target on a padded slot of ``class_sizes`` raises ``IndexError``."""
    if class_sizes is None:
        return
    tv, sv = _checks.concrete_value(t), _checks.concrete_value(class_sizes)
    if tv is None or sv is None or tv.size == 0:
        return
    bad = (tv % per_class) >= sv[tv // per_class]
    if bad.any():
        pos = tuple(int(p) for p in np.argwhere(bad)[0])
        c = int(tv[pos]) // per_class
        raise IndexError(
            f"target holds {int(tv[pos])} at position {pos}, a padded slot: class {c} holds "
            f"class_sizes[{c}]={int(sv[c])} outputs (slots 0..{int(sv[c]) - 1})"
        )


# --------------------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------------------


def _dtypes(x, W1, b1, W2, b2):
    """``(common dtype, accumulation dtype)`` of the inputs."""
    dts = (x.dtype, W1.dtype, b1.dtype, W2.dtype, b2.dtype)
    return _checks.common_float_dtype(*dts), _checks.accumulation_dtype(*dts)


def _class_logits(x, W1, b1, acc) -> jax.Array:
    """``x @ W1 + b1`` as ``(batch, n_classes)`` in ``acc``."""
    dt = _checks.common_float_dtype(x.dtype, W1.dtype)
    logits = jnp.dot(x.astype(dt), W1.astype(dt), preferred_element_type=acc)
    return logits + b1.astype(acc)[None, :]


def _target_activations(x, W2, b2, classes, acc) -> jax.Array:
    """``x[b] @ W2[classes[b]] + b2[classes[b]]`` as ``(batch, n_outputs_per_class)``.

    The seed's ``sparse_block_dot(W2.dimshuffle('x', 0, 1, 2), x.dimshuffle(0, 'x', 1),
    zeros((batch, 1)), b2, classes.dimshuffle(0, 'x'))``: one input block, the
    class as the output block.  ``classes`` may also be ``(batch, m)`` for ``m``
    classes per example; the result is then ``(batch, m, n_outputs_per_class)``.
    """
    idx = classes if classes.ndim == 2 else classes[:, None]
    zeros = jnp.zeros((x.shape[0], 1), jnp.int32)
    out = sparse_block_dot(W2[None], x[:, None, :], zeros, b2.astype(acc), idx)
    return out if classes.ndim == 2 else out[:, 0, :]


def _all_activations(x, W2, b2, acc) -> jax.Array:
    """Every class's second-level activations, ``(batch, n_classes, n_outputs_per_class)``."""
    dt = _checks.common_float_dtype(x.dtype, W2.dtype)
    act = jnp.einsum("bs,cst->bct", x.astype(dt), W2.astype(dt), preferred_element_type=acc)
    return act + b2.astype(acc)[None]


def _slot_valid(classes, per_class: int, n_outputs: int, class_sizes) -> jax.Array:
    """``(..., n_outputs_per_class)`` bool: does slot ``s`` of class ``classes[...]`` hold an output."""
    slots = lax.broadcasted_iota(jnp.int32, (*classes.shape, per_class), classes.ndim)
    ok = classes[..., None] * per_class + slots < n_outputs
    if class_sizes is not None:
        ok &= slots < class_sizes[classes][..., None]
    return ok


def _class_valid(n_classes: int, per_class: int, n_outputs: int, class_sizes) -> jax.Array:
    """``(n_classes,)`` bool: does the class hold at least one output."""
    ok = jnp.arange(n_classes, dtype=jnp.int32) * per_class < n_outputs
    if class_sizes is not None:
        ok &= class_sizes > 0
    return ok


def _masked_log_softmax(logits, valid) -> jax.Array:
    """``log_softmax`` over the last axis with the invalid entries at ``-inf``.

    A row with no valid entry (an empty class, whose own log-probability is
    ``-inf``) is left unmasked so that it stays finite instead of NaN.
    """
    keep = valid | ~jnp.any(valid, axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)


def _neg_inf_where_invalid(logp, valid) -> jax.Array:
    return jnp.where(valid, logp, jnp.full((), -jnp.inf, logp.dtype))


class _Problem(NamedTuple):
    x: jax.Array  # (batch, n_in)
    W1: jax.Array
    b1: jax.Array
    W2: jax.Array
    b2: jax.Array
    acc: np.dtype
    n_outputs: int
    class_sizes: jax.Array | None
    class_valid: jax.Array  # (n_classes,)
    batched: bool

    @property
    def per_class(self) -> int:
        return self.W2.shape[2]

    def class_log_probs(self) -> jax.Array:
        """``(batch, n_classes)`` log-probabilities of the classes (empty classes ``-inf``)."""
        logits = _class_logits(self.x, self.W1, self.b1, self.acc)
        return jax.nn.log_softmax(jnp.where(self.class_valid[None, :], logits, -jnp.inf), axis=-1)

    def slot_valid(self, classes) -> jax.Array:
        return _slot_valid(classes, self.per_class, self.n_outputs, self.class_sizes)


def _prepare(x, params, n_outputs, class_sizes) -> _Problem:
    W1, b1, W2, b2 = _check_params(params)
    x = _check_x(x, W1.shape[0], allow_1d=True)
    n_classes, _, per_class = W2.shape
    n_outputs = _check_n_outputs(n_outputs, n_classes, per_class)
    class_sizes = _check_class_sizes(class_sizes, n_classes, per_class)
    batched = x.ndim == 2
    _, acc = _dtypes(x, W1, b1, W2, b2)
    valid = _class_valid(n_classes, per_class, n_outputs, class_sizes)
    x = x if batched else x[None]
    return _Problem(x, W1, b1, W2, b2, acc, n_outputs, class_sizes, valid, batched)


def _n_valid_outputs(prob: _Problem) -> int | None:
    """The number of non-padded outputs, if known at trace time."""
    C, P = prob.W2.shape[0], prob.per_class
    full = np.minimum(np.maximum(prob.n_outputs - np.arange(C) * P, 0), P)
    if prob.class_sizes is None:
        return int(full.sum())
    sizes = _checks.concrete_value(prob.class_sizes)
    return None if sizes is None else int(np.minimum(full, sizes).sum())


@functools.partial(jax.jit, static_argnames=("fn", "acc", "n_outputs", "static"))
def _run_jit(arrays, args, *, fn, acc, n_outputs, static):
    x, W1, b1, W2, b2, class_sizes, class_valid = arrays
    prob = _Problem(x, W1, b1, W2, b2, acc, n_outputs, class_sizes, class_valid, True)
    return fn(prob, *args, **dict(static))


def _run(fn, prob: _Problem, *args, **static):
    """``fn(prob, *args, **static)`` as one cached ``jax.jit`` computation.

    The validation (and the checks of concrete values) happens before, eagerly;
    the computation itself is then compiled once per configuration instead of
    dispatched op by op (and, for a ``lax.scan``, retraced on every call).
    """
    arrays = (prob.x, prob.W1, prob.b1, prob.W2, prob.b2, prob.class_sizes, prob.class_valid)
    out = _run_jit(
        arrays, args, fn=fn, acc=prob.acc, n_outputs=prob.n_outputs,
        static=tuple(sorted(static.items())),
    )  # fmt: skip
    return out if prob.batched else jax.tree.map(lambda a: a[0], out)


# --------------------------------------------------------------------------------------
# Theano-compatible h_softmax.
# --------------------------------------------------------------------------------------


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
    ``p_c = softmax(x @ W2[c] + b2[c])`` over its ``n_outputs_per_class`` slots::

        out[b, o] = class_probs[b, o // n_outputs_per_class] * p_{o // n_outputs_per_class}[b, o % n_outputs_per_class]

    Without ``target`` every output is computed (``O(n_in * n_classes *
    n_outputs_per_class)`` per example).  With ``target`` only the target's
    class is: a ``sparse_block_dot`` over ``W2[None]`` as in the seed's code,
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
    W1, b1, W2, b2 = _check_params((W1, b1, W2, b2))
    x = _check_x(x, W1.shape[0], allow_1d=False)
    for name, given, actual, source in (
        ("batch_size", batch_size, x.shape[0], "x.shape[0]"),
        ("n_classes", n_classes, W1.shape[1], "W1.shape[1]"),
        ("n_outputs_per_class", n_outputs_per_class, W2.shape[2], "W2.shape[2]"),
    ):
        if given != actual:
            raise ValueError(f"{name}={given} does not match {source}={actual}; pass {actual}")
    n_outputs = _check_n_outputs(n_outputs, W2.shape[0], W2.shape[2])
    dt, acc = _dtypes(x, W1, b1, W2, b2)
    if target is not None:
        target = _check_target(target, batch_size, n_outputs, batched=True)
        _check_target_values(target, n_outputs)
    return _h_softmax(x, W1, b1, W2, b2, target, n_outputs=n_outputs, dt=dt, acc=acc)


@functools.partial(jax.jit, static_argnames=("n_outputs", "dt", "acc"))
def _h_softmax(x, W1, b1, W2, b2, target, *, n_outputs, dt, acc):
    """The seed's code, line by line (after validation)."""
    batch_size, n_outputs_per_class = x.shape[0], W2.shape[2]
    class_probs = jax.nn.softmax(_class_logits(x, W1, b1, acc), axis=-1)
    if target is None:
        output_probs = jax.nn.softmax(_all_activations(x, W2, b2, acc), axis=-1)
        output_probs = class_probs[:, :, None] * output_probs
        return output_probs.reshape(batch_size, -1)[:, :n_outputs].astype(dt)
    t, valid = _normalize_target(target, n_outputs)
    target_classes = t // n_outputs_per_class
    target_outputs_in_class = t % n_outputs_per_class
    output_probs = jax.nn.softmax(_target_activations(x, W2, b2, target_classes, acc), axis=-1)
    rows = jnp.arange(batch_size)
    probs = class_probs[rows, target_classes] * output_probs[rows, target_outputs_in_class]
    return jnp.where(valid, probs, jnp.zeros((), acc)).astype(dt)


# --------------------------------------------------------------------------------------
# The log-space API.
# --------------------------------------------------------------------------------------


def h_softmax_init(
    key: jax.Array,
    n_in: int,
    n_outputs: int,
    *,
    n_classes: int | None = None,
    dtype=jnp.float32,
) -> HSoftmaxParams:
    r"""Initial :class:`HSoftmaxParams` for ``n_outputs`` outputs.

    ``n_classes`` defaults to ``ceil(sqrt(n_outputs))``, which minimises the
    per-example cost ``n_classes + n_outputs_per_class``, and
    ``n_outputs_per_class = ceil(n_outputs / n_classes)``.  ``W1`` and ``W2``
    are drawn from ``N(0, 1 / n_in)`` (LeCun normal: logits of the scale of
    ``x``'s entries); the biases are zero.

    Args:
      key: a PRNG key.
      n_in: input width.
      n_outputs: number of outputs (the vocabulary size, or a layout's
        ``n_outputs``).
      n_classes: number of classes, in ``[1, n_outputs]``.
      dtype: float dtype of the parameters.

    Returns:
      ``HSoftmaxParams(W1 (n_in, n_classes), b1 (n_classes,),
      W2 (n_classes, n_in, n_outputs_per_class), b2 (n_classes, n_outputs_per_class))``.

    Raises:
      ValueError: a non-positive size or ``n_classes`` outside ``[1, n_outputs]``.

    Examples:
      >>> import jax
      >>> from blocksparse_jax import h_softmax_init
      >>> params = h_softmax_init(jax.random.key(0), 16, 1000)
      >>> [p.shape for p in params]
      [(16, 32), (32,), (32, 16, 32), (32, 32)]
    """
    for name, v in (("n_in", n_in), ("n_outputs", n_outputs)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive int; got {v!r}")
    n_in, n_outputs = int(n_in), int(n_outputs)
    if n_classes is None:
        n_classes = math.isqrt(n_outputs - 1) + 1 if n_outputs > 1 else 1
    if int(n_classes) != n_classes or not 1 <= n_classes <= n_outputs:
        raise ValueError(
            f"n_classes must be an int in [1, n_outputs] = [1, {n_outputs}]; got {n_classes!r}"
        )
    n_classes = int(n_classes)
    per_class = -(-n_outputs // n_classes)
    return _init(key, n_in, n_classes, per_class, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init(key, n_in, n_classes, per_class, dtype) -> HSoftmaxParams:
    k1, k2 = jax.random.split(key)
    scale = 1.0 / math.sqrt(n_in)
    W1 = (jax.random.normal(k1, (n_in, n_classes), jnp.float32) * scale).astype(dtype)
    W2 = (jax.random.normal(k2, (n_classes, n_in, per_class), jnp.float32) * scale).astype(dtype)
    return HSoftmaxParams(
        W1, jnp.zeros((n_classes,), dtype), W2, jnp.zeros((n_classes, per_class), dtype)
    )


def h_log_softmax(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike | None = None,
    *,
    n_outputs: int,
    class_sizes: ArrayLike | None = None,
) -> jax.Array:
    r"""Log-probabilities of the two-level hierarchical softmax, computed in log space.

    With ``c = o // n_outputs_per_class`` and ``s = o % n_outputs_per_class``::

        log p(o | x) = log_softmax(x @ W1 + b1)[c] + log_softmax(x @ W2[c] + b2[c])[s]

    where both softmaxes run only over real outputs: padded slots (``o >=
    n_outputs``, or ``s >= class_sizes[c]``) and empty classes are masked out,
    so ``sum_o p(o | x) == 1`` exactly.  Nothing is exponentiated outside a
    ``log_softmax``, so logits of magnitude ``1e4`` are fine.

    With ``target`` only the targets' classes are evaluated at the second level
    (a ``sparse_block_dot``), ``O(n_in * (n_classes + n_outputs_per_class))`` per
    example, and the gradient of ``W2`` and ``b2`` is non-zero only in the
    targets' classes.  Without it all ``n_outputs`` are computed.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`HSoftmaxParams`.
      target: optional ``(batch,)`` or ``(batch, 1)`` integer outputs in
        ``[0, n_outputs)`` (a scalar for a 1-D ``x``).
      n_outputs: number of outputs, at most ``n_classes * n_outputs_per_class``.
      class_sizes: optional ``(n_classes,)`` integer number of outputs in each
        class (slots ``0 .. class_sizes[c] - 1``); the other slots are padding,
        with log-probability ``-inf``.  See :func:`frequency_classes`.

    Returns:
      ``(batch, n_outputs)`` log-probabilities without ``target``, else the
      ``(batch,)`` log-probability of each target (the batch axis dropped for a
      1-D ``x``).  float64 if any input is float64, else float32 (float16 and
      bfloat16 inputs accumulate in float32).

    Raises:
      TypeError: non-float weights or inputs, non-integer ``target``.
      ValueError: shapes that do not match each other, ``n_outputs`` too large.
      IndexError: a concrete ``target`` outside ``[0, n_outputs)`` or on a
        padded slot.  Under ``jit`` an out-of-range target gets ``-inf`` and
        ``checkify.index_checks`` reports it.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_log_softmax, h_softmax_init
      >>> params = h_softmax_init(jax.random.key(0), 8, 10)   # 4 classes of 3: 2 padded slots
      >>> x = jax.random.normal(jax.random.key(1), (2, 8))
      >>> logp = h_log_softmax(x, params, n_outputs=10)
      >>> logp.shape, jnp.exp(logp).sum(axis=-1).round(6)
      ((2, 10), Array([1., 1.], dtype=float32))
      >>> target = jnp.array([3, 9])
      >>> bool(jnp.allclose(h_log_softmax(x, params, target, n_outputs=10), logp[jnp.arange(2), target]))
      True
    """
    prob = _prepare(x, params, n_outputs, class_sizes)
    if target is None:
        return _run(_full_log_probs, prob)
    return _run(_target_log_probs, prob, _checked_target(prob, target))


def _full_log_probs(prob: _Problem) -> jax.Array:
    C, P = prob.W2.shape[0], prob.per_class
    class_logp = prob.class_log_probs()  # (batch, C)
    act = _all_activations(prob.x, prob.W2, prob.b2, prob.acc)  # (batch, C, P)
    slot_ok = prob.slot_valid(jnp.arange(C, dtype=jnp.int32))  # (C, P)
    slot_logp = _masked_log_softmax(act, slot_ok[None])
    logp = _neg_inf_where_invalid(class_logp[:, :, None] + slot_logp, slot_ok[None])
    return logp.reshape(prob.x.shape[0], C * P)[:, : prob.n_outputs]


def _checked_target(prob: _Problem, target) -> jax.Array:
    """``target`` as ``(batch,)``, its shape and (when concrete) its values checked."""
    batch = prob.x.shape[0]
    t = _check_target(target, batch, prob.n_outputs, batched=prob.batched).reshape(batch)
    _check_target_values(t, prob.n_outputs)  # raises IndexError when concrete
    _check_padding_target(t, prob.class_sizes, prob.per_class)
    return t


def _target_log_probs(prob: _Problem, t, act_offset=None) -> jax.Array:
    """``(batch,)`` log-probabilities of the targets ``t``.

    ``act_offset`` (``(batch, n_outputs_per_class)``, zeros) is added to the
    second-level activations: its gradient is the activations' cotangent, which
    :func:`h_softmax_sgd_step` turns into the sparse ``W2`` update.
    """
    batch, P = prob.x.shape[0], prob.per_class
    t, valid = _normalize_target(t, prob.n_outputs)
    classes, slots = t // P, t % P
    act = _target_activations(prob.x, prob.W2, prob.b2, classes, prob.acc)  # (batch, P)
    if act_offset is not None:
        act = act + act_offset
    slot_logp = _masked_log_softmax(act, prob.slot_valid(classes))
    rows = jnp.arange(batch)
    logp = prob.class_log_probs()[rows, classes] + slot_logp[rows, slots]
    valid &= prob.slot_valid(classes)[rows, slots]
    return _neg_inf_where_invalid(logp, valid)


def h_softmax_loss(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike,
    *,
    n_outputs: int,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    class_sizes: ArrayLike | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of the targets under the hierarchical softmax.

    ::

        loss[b] = -log p(target[b] | x[b])          (see h_log_softmax)

    reduced by ``mean`` over the unmasked examples (0 if there are none),
    ``sum`` or not at all (``none``, masked entries 0).  The second level is
    evaluated only for the targets' classes, so the gradient of ``W2`` and
    ``b2`` is non-zero only in those classes' blocks.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`HSoftmaxParams`.
      target: ``(batch,)`` or ``(batch, 1)`` integer outputs in ``[0, n_outputs)``.
      n_outputs: number of outputs.
      mask: optional ``(batch,)`` bool, ``False`` for padding tokens; their
        targets are ignored (they may be out of range, e.g. ``-1``).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      class_sizes: optional ``(n_classes,)`` class sizes, as in
        :func:`h_log_softmax`.

    Returns:
      A scalar, or ``(batch,)`` for ``reduction="none"``; float32 (float64 if
      any input is float64).

    Raises:
      ValueError: an unknown ``reduction``, a ``mask`` of the wrong shape, and
        everything :func:`h_log_softmax` raises.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax_init, h_softmax_loss
      >>> params = h_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, -1])             # the last one is padding
      >>> mask = jnp.array([True, True, True, False])
      >>> loss = h_softmax_loss(x, params, target, n_outputs=100, mask=mask)
      >>> grads = jax.grad(h_softmax_loss, argnums=1)(x, params, target, n_outputs=100, mask=mask)
      >>> jnp.flatnonzero(jnp.any(grads.W2 != 0, axis=(1, 2)))   # classes of 1, 42 and 99
      Array([0, 4, 9], dtype=int32)
    """
    x = _as_array("x", x)
    target, mask = _loss_target_and_mask(target, mask, reduction, batched=x.ndim == 2)
    logp = h_log_softmax(x, params, target, n_outputs=n_outputs, class_sizes=class_sizes)
    return _reduce_nll(logp, mask, reduction)


def h_softmax_sgd_step(
    x: ArrayLike,
    params: HSoftmaxParams,
    target: ArrayLike,
    learning_rate: ArrayLike,
    *,
    n_outputs: int,
    mask: ArrayLike | None = None,
    reduction: str = "mean",
    class_sizes: ArrayLike | None = None,
) -> tuple[jax.Array, HSoftmaxParams, jax.Array]:
    r"""One SGD step on :func:`h_softmax_loss` that updates ``W2`` sparsely, in place.

    ::

        params' = params - learning_rate * grad(h_softmax_loss)(params)

    The same values as the dense step, but the gradients of ``W2`` and ``b2``
    are never built: they are non-zero only in the targets' classes, and the
    update is applied to those blocks directly, with :func:`sparse_block_outer`
    (``alpha=-learning_rate``) for ``W2`` and a scatter-add for ``b2``.
    ``jax.grad`` must return a dense ``W2``-sized gradient, whose zero-fill
    dominates a step at large vocabularies (``W2`` holds ``n_in * n_outputs``
    weights); this step touches ``W2`` only where the targets' classes are.
    Under ``jax.jit`` with ``params`` donated (``donate_argnums``) the update
    is made in the donated buffer; without donation XLA copies ``W2`` first.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`HSoftmaxParams`.
      target: ``(batch,)`` or ``(batch, 1)`` integer outputs in ``[0, n_outputs)``.
      learning_rate: scalar step size (an array or a Python float; traced, so a
        schedule does not recompile).
      n_outputs, mask, reduction, class_sizes: as in :func:`h_softmax_loss`;
        ``reduction`` must reduce to a scalar (``"mean"`` or ``"sum"``).

    Returns:
      ``(loss, new_params, dx)``: the loss before the step (as
      :func:`h_softmax_loss`), the updated parameters (each in its own dtype) and
      the gradient of the loss with respect to ``x`` (to backpropagate into the
      layers below), shaped and typed like ``x``.

    Raises:
      ValueError: ``reduction="none"``, a ``learning_rate`` that is not a scalar,
        and everything :func:`h_softmax_loss` raises.
      TypeError: a ``learning_rate`` that is not a float.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax_init, h_softmax_loss, h_softmax_sgd_step
      >>> params = h_softmax_init(jax.random.key(0), 8, 100)
      >>> x = jax.random.normal(jax.random.key(1), (4, 8))
      >>> target = jnp.array([1, 42, 99, 7])
      >>> step = jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)
      >>> dense = jax.tree.map(lambda p, g: p - 0.1 * g, params,
      ...                      jax.grad(h_softmax_loss, argnums=1)(x, params, target, n_outputs=100))
      >>> loss, params, dx = step(x, params, target, 0.1, n_outputs=100)
      >>> all(bool(jnp.allclose(a, b, atol=1e-6)) for a, b in zip(params, dense))
      True
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum' for a training step (a scalar loss); got {reduction!r}"
        )
    x = _as_array("x", x)
    target, mask = _loss_target_and_mask(target, mask, reduction, batched=x.ndim == 2)
    learning_rate = _as_array("learning_rate", learning_rate)
    if learning_rate.shape != ():
        raise ValueError(f"learning_rate must be a scalar; got shape {_shape(learning_rate.shape)}")
    if not jnp.issubdtype(learning_rate.dtype, jnp.floating):
        raise TypeError(f"learning_rate must be a float scalar; got dtype {learning_rate.dtype}")
    prob = _prepare(x, params, n_outputs, class_sizes)
    t = _checked_target(prob, target)
    mask = mask.reshape(prob.x.shape[0])
    loss, new, dx = _run(_sgd_step, prob._replace(batched=True), t, mask, learning_rate,
                         reduction=reduction)  # fmt: skip
    return loss, new, (dx if prob.batched else dx[0]).astype(x.dtype)


def _sgd_step(prob: _Problem, t, mask, learning_rate, *, reduction):
    batch, P = prob.x.shape[0], prob.per_class

    def loss_fn(x, W1, b1, act_offset):
        p = prob._replace(x=x, W1=W1, b1=b1)
        return _reduce_nll(_target_log_probs(p, t, act_offset), mask, reduction)

    # W2 and b2 are held fixed: their dense gradients are never built (XLA drops
    # them); the cotangent of the second-level activations updates their blocks.
    offset = jnp.zeros((batch, P), prob.acc)
    loss, vjp = jax.vjp(loss_fn, prob.x, prob.W1, prob.b1, offset)
    dx, dW1, db1, g_act = vjp(jnp.ones((), loss.dtype))
    lr = learning_rate.astype(prob.acc)
    sgd = lambda p, g: (p.astype(prob.acc) - lr * g.astype(prob.acc)).astype(p.dtype)
    classes = _normalize_target(t, prob.n_outputs)[0] // P
    zeros = jnp.zeros((batch, 1), jnp.int32)
    W2 = sparse_block_outer(
        prob.W2[None], prob.x[:, None, :], g_act[:, None, :], zeros, classes[:, None], alpha=-lr
    )[0]
    b2 = prob.b2.astype(prob.acc).at[classes].add(-lr * g_act, mode="drop").astype(prob.b2.dtype)
    return loss, HSoftmaxParams(sgd(prob.W1, dW1), sgd(prob.b1, db1), W2, b2), dx


def _loss_target_and_mask(target, mask, reduction: str, *, batched: bool):
    """Validates ``reduction`` and ``mask`` (default all ``True``) for a loss.

    Returns ``(target, mask)`` with the masked targets replaced by 0: they may be
    anything (a padding id such as -1) and must not reach the range checks.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
    target = _as_array("target", target)
    _checks.check_int("target", target)
    shape = target.shape[:1] if batched else ()
    if mask is None:
        mask = jnp.ones(shape, jnp.bool_)
    else:
        mask = _as_array("mask", mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be a bool array; got dtype {mask.dtype}")
        if mask.shape != shape:
            raise ValueError(
                f"mask must have shape {'(batch,)' if shape else '()'} = {_shape(shape)} to "
                f"match target of shape {_shape(target.shape)}; got shape {_shape(mask.shape)}"
            )
    keep = mask.reshape(mask.shape + (1,) * (target.ndim - mask.ndim))
    return jnp.where(keep, target, jnp.zeros((), target.dtype)), mask


def _reduce_nll(logp: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
    """``-logp`` where ``mask``, reduced: mean over the unmasked entries (0 if none), sum, none."""
    nll = jnp.where(mask, -logp, jnp.zeros((), logp.dtype))
    if reduction == "none":
        return nll
    total = jnp.sum(nll)
    if reduction == "sum":
        return total
    count = jnp.sum(mask, dtype=jnp.int32).astype(total.dtype)
    return total / jnp.maximum(count, jnp.ones((), total.dtype))


def h_softmax_top_k(
    x: ArrayLike,
    params: HSoftmaxParams,
    k: int,
    *,
    n_outputs: int,
    class_sizes: ArrayLike | None = None,
    approximate: bool = False,
    n_best_classes: int | None = None,
    classes_per_step: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""The ``k`` most probable outputs of each example, without materialising them all.

    Exact (default): a best-first search.  Classes are visited
    ``classes_per_step`` at a time in decreasing order of their best
    probability over the batch; each step computes ``log p`` for the outputs
    of those classes and merges them into a running top-k.  Because ``log p(o)
    <= log p(class(o))``, the search stops as soon as no example has an
    unvisited class more probable than its current k-th best output - after a
    few steps for a confident model, after all of them for a flat one.  Memory
    is ``O(batch * (k + classes_per_step * n_outputs_per_class))`` however
    large ``n_outputs`` is: ``(batch, n_outputs)`` is never materialised.

    Approximate (``approximate=True``): the ``n_best_classes`` most probable
    classes (default ``min(k, n_classes)``), then the best outputs within them
    (a ``sparse_block_dot`` over those classes), ``O(n_classes +
    n_best_classes * n_outputs_per_class)`` per example.  The log-probabilities
    returned are exact; an output is missed only if its class is not among the
    best.  If the chosen classes hold fewer than ``k`` outputs the last entries
    are ``-inf``.

    This is a search for decoding: its outputs carry no gradient (take
    :func:`h_log_softmax` at the returned ids for one).  Ties between equal
    log-probabilities may be broken either way.

    Args:
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`HSoftmaxParams`.
      k: number of outputs to return, in ``[1, number of real outputs]``.
      n_outputs: number of outputs.
      class_sizes: optional ``(n_classes,)`` class sizes, as in :func:`h_log_softmax`.
      approximate: search only the best classes.
      n_best_classes: classes searched when ``approximate``.
      classes_per_step: classes per step of the exact search (default 16, fewer
        if a step's ``batch * classes_per_step * n_outputs_per_class`` block
        would exceed 4M elements).

    Returns:
      ``(log_probs, indices)``, both ``(batch, k)`` (``(k,)`` for a 1-D ``x``),
      sorted by decreasing log-probability; ``indices`` int32 output ids.

    Raises:
      ValueError: ``k`` outside ``[1, n_outputs]`` (or larger than the number of
        non-padded outputs when ``class_sizes`` is concrete), ``n_best_classes``
        without ``approximate=True``, and everything :func:`h_log_softmax` raises.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_log_softmax, h_softmax_init, h_softmax_top_k
      >>> params = h_softmax_init(jax.random.key(0), 8, 50)
      >>> x = jax.random.normal(jax.random.key(1), (3, 8))
      >>> logp, idx = h_softmax_top_k(x, params, 5, n_outputs=50)
      >>> ref_logp, ref_idx = jax.lax.top_k(h_log_softmax(x, params, n_outputs=50), 5)
      >>> bool(jnp.all(idx == ref_idx)), bool(jnp.allclose(logp, ref_logp))
      (True, True)
    """
    prob = _prepare(x, params, n_outputs, class_sizes)
    C, P = prob.W2.shape[0], prob.per_class
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be a Python int; got {type(k).__name__}")
    k = int(k)
    n_real = _n_valid_outputs(prob)
    limit = prob.n_outputs if n_real is None else n_real
    if not 1 <= k <= limit:
        what = "n_outputs" if n_real is None or n_real == prob.n_outputs else "real outputs"
        raise ValueError(f"k must be in [1, {limit}] ({what}={limit}); got k={k}")
    if n_best_classes is not None and not approximate:
        raise ValueError("n_best_classes is used only with approximate=True")
    if approximate:
        m = min(k, C) if n_best_classes is None else int(n_best_classes)
        if not 1 <= m <= C:
            raise ValueError(f"n_best_classes must be in [1, n_classes] = [1, {C}]; got {m}")
        return _run(_top_k_approximate, prob, k=k, m=m)
    if classes_per_step is None:
        cc = min(_TOP_K_CLASSES_PER_STEP, _TOP_K_CHUNK_ELEMENTS // max(1, prob.x.shape[0] * P))
    else:
        cc = int(classes_per_step)
        if cc < 1:
            raise ValueError(f"classes_per_step must be >= 1; got {classes_per_step}")
    return _run(_top_k_exact, prob, k=k, cc=max(1, min(C, cc)))


def _top_k_exact(prob: _Problem, *, k: int, cc: int):
    """Best-first search over chunks of classes with a running top-k, stopping early.

    Classes are visited in decreasing order of their best probability over the
    batch, ``cc`` at a time; since ``log p(o) <= log p(class(o))``, the search
    stops as soon as no example has an unvisited class more probable than its
    current k-th best output.  A search, not a differentiable function: its
    inputs are ``stop_gradient``-ed (``lax.while_loop`` has no reverse mode).
    """
    x, W2, b2 = (lax.stop_gradient(a) for a in (prob.x, prob.W2, prob.b2))
    class_logp = lax.stop_gradient(prob.class_log_probs())  # (batch, C)
    batch = x.shape[0]
    C, P = W2.shape[0], prob.per_class
    n_steps = -(-C // cc)
    order = jnp.argsort(-jnp.max(class_logp, axis=0)).astype(jnp.int32)  # (C,)
    sorted_logp = class_logp[:, order]
    position = jnp.arange(C, dtype=jnp.int32)
    slots = jnp.arange(P, dtype=jnp.int32)

    def search_more(carry):
        i, vals, _ = carry
        unvisited = jnp.where(position[None, :] >= i * cc, sorted_logp, -jnp.inf)
        return (i < n_steps) & jnp.any(jnp.max(unvisited, axis=1) >= vals[:, k - 1])

    def step(carry):
        i, best_vals, best_idx = carry
        # The last chunk is shifted back to stay in bounds; classes seen before are masked.
        start = jnp.minimum(i * cc, C - cc)
        classes = lax.dynamic_slice_in_dim(order, start, cc)  # (cc,)
        fresh = start + jnp.arange(cc, dtype=jnp.int32) >= i * cc
        act = _all_activations(x, W2[classes], b2[classes], prob.acc)  # (batch, cc, P)
        slot_ok = prob.slot_valid(classes) & fresh[:, None]  # (cc, P)
        logp = class_logp[:, classes][:, :, None] + _masked_log_softmax(act, slot_ok[None])
        logp = _neg_inf_where_invalid(logp, slot_ok[None]).reshape(batch, cc * P)
        ids = (classes[:, None] * P + slots[None, :]).reshape(-1)
        vals = jnp.concatenate([best_vals, logp], axis=1)
        cand = jnp.concatenate([best_idx, jnp.broadcast_to(ids[None, :], logp.shape)], axis=1)
        vals, pos = lax.top_k(vals, k)
        return i + 1, vals, jnp.take_along_axis(cand, pos, axis=1)

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch, k), -jnp.inf, prob.acc),
        jnp.zeros((batch, k), jnp.int32),
    )
    _, vals, idx = lax.while_loop(search_more, step, init)
    return vals, idx


def _top_k_approximate(prob: _Problem, *, k: int, m: int):
    batch, P = prob.x.shape[0], prob.per_class
    cl, best = lax.top_k(prob.class_log_probs(), m)  # (batch, m)
    act = _target_activations(prob.x, prob.W2, prob.b2, best, prob.acc)  # (batch, m, P)
    slot_ok = prob.slot_valid(best)
    logp = _neg_inf_where_invalid(cl[:, :, None] + _masked_log_softmax(act, slot_ok), slot_ok)
    ids = best[:, :, None] * P + lax.broadcasted_iota(jnp.int32, (batch, m, P), 2)
    k_eff = min(k, m * P)
    vals, pos = lax.top_k(logp.reshape(batch, m * P), k_eff)
    idx = jnp.take_along_axis(ids.reshape(batch, m * P), pos, axis=1)
    if k_eff < k:
        vals = jnp.pad(vals, ((0, 0), (0, k - k_eff)), constant_values=-jnp.inf)
        idx = jnp.pad(idx, ((0, 0), (0, k - k_eff)))
    return lax.stop_gradient(vals), idx


def h_softmax_sample(
    key: jax.Array,
    x: ArrayLike,
    params: HSoftmaxParams,
    *,
    n_outputs: int,
    class_sizes: ArrayLike | None = None,
) -> jax.Array:
    r"""Exact samples from the hierarchical distribution, one per example.

    First a class ``c ~ softmax(x @ W1 + b1)``, then a slot ``s ~ softmax(x @
    W2[c] + b2[c])`` over the class's real slots (a ``sparse_block_dot`` on the
    sampled class), both with ``jax.random.categorical``; the output is ``c *
    n_outputs_per_class + s``.  ``O(n_in * (n_classes + n_outputs_per_class))``
    work per example; padded slots are never drawn.

    Args:
      key: a PRNG key.
      x: ``(batch, n_in)`` inputs, or ``(n_in,)`` for one example.
      params: :class:`HSoftmaxParams`.
      n_outputs: number of outputs.
      class_sizes: optional ``(n_classes,)`` class sizes, as in :func:`h_log_softmax`.

    Returns:
      ``(batch,)`` int32 output ids (a scalar for a 1-D ``x``).

    Raises:
      TypeError, ValueError: as :func:`h_log_softmax`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from blocksparse_jax import h_softmax_init, h_softmax_sample
      >>> params = h_softmax_init(jax.random.key(0), 8, 10)
      >>> x = jax.random.normal(jax.random.key(1), (5, 8))
      >>> ids = h_softmax_sample(jax.random.key(2), x, params, n_outputs=10)
      >>> ids.shape, ids.dtype, bool(jnp.all((ids >= 0) & (ids < 10)))
      ((5,), dtype('int32'), True)
    """
    prob = _prepare(x, params, n_outputs, class_sizes)
    return _run(_sample, prob, key)


def _sample(prob: _Problem, key) -> jax.Array:
    k_class, k_slot = jax.random.split(key)
    classes = jax.random.categorical(k_class, prob.class_log_probs(), axis=-1).astype(jnp.int32)
    act = _target_activations(prob.x, prob.W2, prob.b2, classes, prob.acc)
    act = jnp.where(prob.slot_valid(classes), act, -jnp.inf)
    slots = jax.random.categorical(k_slot, act, axis=-1).astype(jnp.int32)
    return classes * prob.per_class + slots


# --------------------------------------------------------------------------------------
# Frequency binning.
# --------------------------------------------------------------------------------------


def frequency_classes(
    counts: ArrayLike,
    n_classes: int | None = None,
    *,
    max_class_size: int | None = None,
) -> HSoftmaxLayout:
    r"""Assigns words to classes of roughly equal probability mass (frequency binning).

    Words are sorted by decreasing count and cut into ``n_classes`` consecutive
    runs, each class taking as close as it can to an equal share of the mass
    not yet assigned - as class-based language models do (frequent words get
    small classes, rare words large ones) - subject to every class holding
    between 1 and ``max_class_size`` words.  Within a
    class, slots follow decreasing count.  Class sizes differ; the layout pads
    every class to ``n_outputs_per_class`` (the largest size) and
    ``class_sizes=`` tells the log-space functions which slots are padding.

    Usage::

        layout = frequency_classes(counts)
        params = h_softmax_init(key, n_in, layout.n_outputs, n_classes=layout.n_classes)
        out_ids = layout.word_to_output[word_ids]
        loss = h_softmax_loss(x, params, out_ids, n_outputs=layout.n_outputs,
                              class_sizes=layout.class_sizes)
        words = layout.output_to_word[h_softmax_sample(key, x, params, ...)]

    Args:
      counts: ``(n_words,)`` non-negative word counts (or frequencies).
      n_classes: number of classes, default ``ceil(sqrt(n_words))``.
      max_class_size: the largest class allowed, at least
        ``ceil(n_words / n_classes)``; default ``4 * ceil(n_words / n_classes)``,
        which bounds the second level's cost and ``W2``'s size at 4 times those
        of an even split.

    Returns:
      An :class:`HSoftmaxLayout` (NumPy arrays, computed on the host).

    Raises:
      ValueError: ``counts`` not 1-D, negative or not finite, ``n_classes``
        outside ``[1, n_words]``, ``max_class_size`` too small.

    Examples:
      >>> import numpy as np
      >>> from blocksparse_jax import frequency_classes
      >>> layout = frequency_classes(np.array([50, 20, 10, 8, 5, 4, 2, 1]), n_classes=3)
      >>> layout.class_sizes, layout.n_outputs_per_class
      (array([1, 1, 6], dtype=int32), 6)
      >>> layout.word_to_output
      array([ 0,  6, 12, 13, 14, 15, 16, 17], dtype=int32)
      >>> layout.output_to_word[layout.word_to_output]
      array([0, 1, 2, 3, 4, 5, 6, 7], dtype=int32)
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be 1-D (n_words,); got shape {_shape(counts.shape)}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    n_words = counts.size
    if n_classes is None:
        n_classes = math.isqrt(n_words - 1) + 1 if n_words > 1 else 1
    if int(n_classes) != n_classes or not 1 <= n_classes <= n_words:
        raise ValueError(
            f"n_classes must be an int in [1, n_words] = [1, {n_words}]; got {n_classes!r}"
        )
    C = int(n_classes)
    even = -(-n_words // C)
    cap = 4 * even if max_class_size is None else int(max_class_size)
    if cap < even:
        raise ValueError(
            f"max_class_size must be at least ceil(n_words / n_classes) = {even} for "
            f"{n_words} words in {C} classes; got {max_class_size}"
        )
    if counts.sum() <= 0:
        counts = np.ones_like(counts)
    order = np.argsort(-counts, kind="stable")
    cum = np.cumsum(counts[order])
    total = cum[-1]
    sizes = np.zeros(C, np.int64)
    pos = 0
    for c in range(C):
        remaining, later = n_words - pos, C - c - 1
        lo = max(1, remaining - later * cap)
        hi = min(cap, remaining - later)
        # An equal share of the mass not yet assigned (frequent words that fill
        # a class alone may take more than 1 / n_classes).
        done = cum[pos - 1] if pos else 0.0
        goal = done + (total - done) / (C - c)
        # The end (exclusive) whose cumulative count is closest to the goal.
        end = int(np.searchsorted(cum, goal, side="left"))
        if end < n_words and (end == 0 or cum[end] - goal < goal - cum[end - 1]):
            end += 1
        sizes[c] = min(max(end - pos, lo), hi)
        pos += sizes[c]
    P = int(sizes.max())
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    word_class = np.repeat(np.arange(C), sizes)
    word_slot = np.arange(n_words) - starts[word_class]
    word_to_output = np.empty(n_words, np.int32)
    word_to_output[order] = word_class * P + word_slot
    output_to_word = np.full(C * P, -1, np.int32)
    output_to_word[word_to_output] = np.arange(n_words, dtype=np.int32)
    return HSoftmaxLayout(word_to_output, output_to_word, sizes.astype(np.int32), C, P)
