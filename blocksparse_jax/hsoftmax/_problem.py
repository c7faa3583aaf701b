"""The validated hierarchical-softmax problem: the internal interface of the softmax code.

:func:`prepare` checks the arguments of a log-space function and returns a
:class:`Problem`; its methods are the formulas every public function (and
:mod:`blocksparse_jax.parallel`) evaluates: class log-probabilities, all
outputs' log-probabilities, the targets' log-probabilities.  A ``Problem``
whose ``model_axis`` is set holds one shard of the classes inside
``shard_map``; the same methods then combine the shards (a global
log-sum-exp over the classes, a ``psum`` of the owning shard's term).

Shape letters: ``batch``; ``n_in`` the input width; ``n_classes``;
``n_outputs_per_class``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax import _checks
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax.blocksparse import sparse_block_dot
from blocksparse_jax.hsoftmax._params import check_params

# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------


def check_x(x, n_in: int, *, allow_1d: bool) -> jax.Array:
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


def check_n_outputs(n_outputs, n_classes: int, per_class: int) -> int:
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


def check_class_sizes(class_sizes, n_classes: int, per_class: int) -> jax.Array | None:
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


def check_target(target, batch: int, *, batched: bool) -> jax.Array:
    """Validates ``target``'s dtype and shape; returns it as ``(batch,)`` (or ``()``)."""
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


def check_target_values(t, n_outputs: int, class_sizes, per_class: int) -> None:
    """A concrete target outside ``[0, n_outputs)`` or on a padded slot raises ``IndexError``."""
    _checks.check_index_values("target", t, n_outputs, "n_outputs", from_end=False)
    if class_sizes is None:
        return
    tv, sv = _checks.concrete_value(t), _checks.concrete_value(class_sizes)
    if tv is None or sv is None or tv.size == 0:
        return
    bad = (tv % per_class) >= sv[tv // per_class]
    if bad.any():
        pos = _checks.first_position(bad)
        c = int(tv[pos]) // per_class
        raise IndexError(
            f"target holds {int(tv[pos])} at position {pos}, a padded slot: class {c} holds "
            f"class_sizes[{c}]={int(sv[c])} outputs (slots 0..{int(sv[c]) - 1})"
        )


def normalize_target(target: jax.Array, n_outputs: int) -> tuple[jax.Array, jax.Array]:
    """``(int32 target in [0, n_outputs), valid mask)`` of a traced or concrete ``target``.

    Targets count from 0 only (a negative target is out of range).  An
    out-of-range entry comes back as 0 with ``valid == False``, and the
    ``fill``-mode probe gather of ``_checks`` makes ``checkify.index_checks``
    report it, with its value.
    """
    info = jnp.iinfo(target.dtype)
    i32 = jnp.iinfo(jnp.int32)
    lo, hi = max(int(info.min), int(i32.min)), min(int(info.max), int(i32.max))
    raw = jnp.clip(target, jnp.asarray(lo, target.dtype), jnp.asarray(hi, target.dtype))
    raw = raw.astype(jnp.int32)
    valid = _checks.probe_gather(n_outputs, raw)
    return jnp.where(valid, raw, jnp.zeros((), jnp.int32)), valid


def loss_target_and_mask(target, mask, reduction: str, *, batched: bool):
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


def reduce_nll(logp: jax.Array, mask: jax.Array, reduction: str) -> jax.Array:
    """``-logp`` where ``mask``, reduced: mean over the unmasked entries (0 if none), sum, none."""
    nll = jnp.where(mask, -logp, jnp.zeros((), logp.dtype))
    if reduction == "none":
        return nll
    total = jnp.sum(nll)
    if reduction == "sum":
        return total
    count = jnp.sum(mask, dtype=jnp.int32).astype(total.dtype)
    return total / jnp.maximum(count, jnp.ones((), total.dtype))


# --------------------------------------------------------------------------------------
# The formulas.
# --------------------------------------------------------------------------------------


def dtypes(x, W1, b1, W2, b2):
    """``(common dtype, accumulation dtype)`` of the inputs."""
    dts = (x.dtype, W1.dtype, b1.dtype, W2.dtype, b2.dtype)
    return _checks.common_float_dtype(*dts), _checks.accumulation_dtype(*dts)


def class_logits(x, W1, b1, acc) -> jax.Array:
    """``x @ W1 + b1`` as ``(batch, n_classes)`` in ``acc``."""
    dt = _checks.common_float_dtype(x.dtype, W1.dtype)
    logits = jnp.dot(x.astype(dt), W1.astype(dt), preferred_element_type=acc)
    return logits + b1.astype(acc)[None, :]


def target_activations(x, W2, b2, classes, acc) -> jax.Array:
    """``x[b] @ W2[classes[b]] + b2[classes[b]]`` as ``(batch, n_outputs_per_class)``.

    Theano's ``sparse_block_dot(W2.dimshuffle('x', 0, 1, 2), x.dimshuffle(0, 'x', 1),
    zeros((batch, 1)), b2, classes.dimshuffle(0, 'x'))``: one input block, the
    class as the output block.  ``classes`` may also be ``(batch, m)`` for ``m``
    classes per example; the result is then ``(batch, m, n_outputs_per_class)``.
    """
    idx = classes if classes.ndim == 2 else classes[:, None]
    zeros = jnp.zeros((x.shape[0], 1), jnp.int32)
    out = sparse_block_dot(W2[None], x[:, None, :], zeros, b2.astype(acc), idx)
    return out if classes.ndim == 2 else out[:, 0, :]


def all_activations(x, W2, b2, acc) -> jax.Array:
    """Every class's second-level activations, ``(batch, n_classes, n_outputs_per_class)``."""
    dt = _checks.common_float_dtype(x.dtype, W2.dtype)
    act = jnp.einsum("bs,cst->bct", x.astype(dt), W2.astype(dt), preferred_element_type=acc)
    return act + b2.astype(acc)[None]


def slot_valid(classes, per_class: int, n_outputs: int, class_sizes) -> jax.Array:
    """``(..., n_outputs_per_class)`` bool: does slot ``s`` of class ``classes[...]`` hold an output."""
    slots = lax.broadcasted_iota(jnp.int32, (*classes.shape, per_class), classes.ndim)
    ok = classes[..., None] * per_class + slots < n_outputs
    if class_sizes is not None:
        ok &= slots < class_sizes[classes][..., None]
    return ok


def class_valid(n_classes: int, per_class: int, n_outputs: int, class_sizes) -> jax.Array:
    """``(n_classes,)`` bool: does the class hold at least one output."""
    ok = jnp.arange(n_classes, dtype=jnp.int32) * per_class < n_outputs
    if class_sizes is not None:
        ok &= class_sizes > 0
    return ok


def masked_log_softmax(logits, valid) -> jax.Array:
    """``log_softmax`` over the last axis with the invalid entries at ``-inf``.

    A row with no valid entry (an empty class, whose own log-probability is
    ``-inf``) is left unmasked so that it stays finite instead of NaN.
    """
    keep = valid | ~jnp.any(valid, axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)


def neg_inf_where_invalid(logp, valid) -> jax.Array:
    return jnp.where(valid, logp, jnp.full((), -jnp.inf, logp.dtype))


def _take(a, idx):
    """``a[b, idx[b]]`` for ``a (batch, n)`` and ``idx (batch,)``."""
    return jnp.take_along_axis(a, idx[:, None], axis=1)[:, 0]


class Problem(NamedTuple):
    """Validated inputs of a log-space function, with the formulas evaluated on them.

    ``W1``, ``b1``, ``W2``, ``b2`` and ``class_valid`` hold all classes, or with
    ``model_axis`` set (inside ``shard_map``) this shard's contiguous range of
    them; ``class_sizes`` (if given) always holds all classes, and targets are
    global output ids.
    """

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
    model_axis: str | None = None

    @property
    def per_class(self) -> int:
        return self.W2.shape[2]

    def first_class(self):
        """The global id of this shard's first class (0 without ``model_axis``)."""
        if self.model_axis is None:
            return 0
        return lax.axis_index(self.model_axis) * self.W2.shape[0]

    def class_logits(self) -> jax.Array:
        """``(batch, n_classes)`` class logits, ``-inf`` for the empty classes."""
        logits = class_logits(self.x, self.W1, self.b1, self.acc)
        return jnp.where(self.class_valid[None, :], logits, -jnp.inf)

    def class_lse(self, logits) -> jax.Array:
        """``(batch,)`` log-sum-exp of ``logits`` over every class (of every shard).

        Across shards the maximum only keeps ``exp`` in range; it is held
        constant for the gradient (which does not depend on it).
        """
        if self.model_axis is None:
            return jax.nn.logsumexp(logits, axis=1)
        m = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=1)), self.model_axis)
        s = lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), axis=1), self.model_axis)
        return m + jnp.log(s)

    def class_log_probs(self) -> jax.Array:
        """``(batch, n_classes)`` log-probabilities of the classes (empty classes ``-inf``)."""
        logits = self.class_logits()
        return logits - self.class_lse(logits)[:, None]

    def slot_valid(self, classes) -> jax.Array:
        """Which slots of the (global) ``classes`` hold an output (see :func:`slot_valid`)."""
        return slot_valid(classes, self.per_class, self.n_outputs, self.class_sizes)

    def full_log_probs(self) -> jax.Array:
        """``(batch, n_classes * n_outputs_per_class)`` log-probabilities, padding ``-inf``.

        Columns follow the output ids (of this shard's classes); the caller drops
        the columns at and past ``n_outputs``.
        """
        C, P = self.W2.shape[0], self.per_class
        act = all_activations(self.x, self.W2, self.b2, self.acc)  # (batch, C, P)
        slot_ok = self.slot_valid(self.first_class() + jnp.arange(C, dtype=jnp.int32))[None]
        logp = self.class_log_probs()[:, :, None] + masked_log_softmax(act, slot_ok)
        return neg_inf_where_invalid(logp, slot_ok).reshape(self.x.shape[0], C * P)

    def target_log_probs(self, t, act_offset=None) -> jax.Array:
        """``(batch,)`` log-probabilities of the targets ``t`` (``-inf`` where invalid).

        ``act_offset`` (``(batch, n_outputs_per_class)``, zeros) is added to the
        second-level activations: its gradient is the activations' cotangent,
        which :func:`~blocksparse_jax.h_softmax_sgd_step` turns into the sparse
        ``W2`` update.  With ``model_axis``, the shard that owns a target's class
        computes its term and the shards' terms are summed; for a class another
        shard owns, class 0 stands in and its term is dropped by selection, so
        this shard's ``W2`` gets no gradient from it.
        """
        P = self.per_class
        t, valid = normalize_target(t, self.n_outputs)
        classes, slots = t // P, t % P
        logits = self.class_logits()
        local = classes - self.first_class()
        if self.model_axis is not None:
            mine = (local >= 0) & (local < self.W2.shape[0])
            local = jnp.where(mine, local, 0)
        act = target_activations(self.x, self.W2, self.b2, local, self.acc)  # (batch, P)
        if act_offset is not None:
            act = act + act_offset
        slot_ok = self.slot_valid(classes)
        term = _take(logits, local) + _take(masked_log_softmax(act, slot_ok), slots)
        if self.model_axis is not None:
            term = lax.psum(jnp.where(mine, term, jnp.zeros((), term.dtype)), self.model_axis)
        valid &= _take(slot_ok, slots)
        return neg_inf_where_invalid(term - self.class_lse(logits), valid)


def prepare(x, params, n_outputs, class_sizes) -> Problem:
    """Validates the arguments of a log-space function; returns the :class:`Problem`."""
    W1, b1, W2, b2 = check_params(params)
    x = check_x(x, W1.shape[0], allow_1d=True)
    n_classes, _, per_class = W2.shape
    n_outputs = check_n_outputs(n_outputs, n_classes, per_class)
    class_sizes = check_class_sizes(class_sizes, n_classes, per_class)
    batched = x.ndim == 2
    _, acc = dtypes(x, W1, b1, W2, b2)
    valid = class_valid(n_classes, per_class, n_outputs, class_sizes)
    x = x if batched else x[None]
    return Problem(x, W1, b1, W2, b2, acc, n_outputs, class_sizes, valid, batched)


def checked_target(prob: Problem, target) -> jax.Array:
    """``target`` as ``(batch,)``, its shape and (when concrete) its values checked."""
    batch = prob.x.shape[0]
    t = check_target(target, batch, batched=prob.batched).reshape(batch)
    check_target_values(t, prob.n_outputs, prob.class_sizes, prob.per_class)
    return t


def n_valid_outputs(prob: Problem) -> int | None:
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
    prob = Problem(x, W1, b1, W2, b2, acc, n_outputs, class_sizes, class_valid, True)
    return fn(prob, *args, **dict(static))


def run(fn, prob: Problem, *args, **static):
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
