"""The validated hierarchical-softmax problem: the internal interface of the softmax code.

:func:`prepare` checks the arguments of a log-space function and returns a
:class:`Problem`; its methods combine the formulas of ``_formulas`` into what
every public function (and :mod:`blocksparse_jax.parallel`, one shard's classes
at a time) evaluates: class log-probabilities, all outputs' log-probabilities,
the targets' log-probabilities.  :func:`run` evaluates one of them as a cached
``jax.jit`` computation.

Shape letters: ``batch``; ``n_in`` the input width; ``n_classes``;
``n_outputs_per_class``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax import _checks, _targets
from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax.hsoftmax import _formulas as _f
from blocksparse_jax.hsoftmax._first_level import class_log_prob
from blocksparse_jax.hsoftmax._params import check_params
from blocksparse_jax.hsoftmax._validate import (
    check_class_sizes,
    check_n_outputs,
    check_padded_targets,
    check_x,
)

# blocksparse_jax.optim reaches these through this module.
check_mask, check_reduction, reduce_nll = (
    _targets.check_mask,
    _targets.check_reduction,
    _targets.reduce_nll,
)

# The first level's chunks of logits may hold up to W2's elements over this.
FIRST_LEVEL_SHARE = 64


def first_level_chunk_elements(w2_elements: int) -> int:
    """The logits a chunk of the first level may hold, for a ``W2`` of this many elements."""
    return int(w2_elements) // FIRST_LEVEL_SHARE


@dataclasses.dataclass(frozen=True)
class ClassBlockRule(sites.SparseRule):
    """``W2``'s gradient: ``x[b] (outer) g[b]`` into the block of example ``b``'s class.

    ``g`` is the cotangent of the example's second-level activations.
    """

    def layout(self, weight_shape):
        return sites.BlockLayout.leading(weight_shape, 2)

    def pairs(self, g, x, classes, use):
        return sites.BlockPairs(jnp.where(use, classes, -1), x, g)


@dataclasses.dataclass(frozen=True)
class ClassBiasRule(sites.SparseRule):
    """``b2``'s gradient: ``g[b]`` into the row of example ``b``'s class."""

    def layout(self, weight_shape):
        return sites.BlockLayout.leading(weight_shape, 1)

    def pairs(self, g, classes, use):
        return sites.BlockPairs(jnp.where(use, classes, -1), None, g)


class Problem(NamedTuple):
    """Validated inputs of a log-space function, with the formulas evaluated on them.

    ``x`` is ``(batch, n_in)``: the caller's leading dimensions ``lead`` (``()``
    for one example) flattened into one batch axis.  ``W1``, ``b1``, ``W2``,
    ``b2`` and ``class_valid`` hold all classes, or (in
    :mod:`blocksparse_jax.parallel`) one shard's contiguous range of them;
    ``class_sizes`` (if given) always holds all classes, and targets are global
    output ids.
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
    lead: tuple[int, ...]

    @property
    def per_class(self) -> int:
        return self.W2.shape[2]

    def all_valid(self) -> bool:
        """Is every class known at trace time to hold an output (no ``class_sizes``, no empty class)?"""
        n_classes = self.W1.shape[1]
        return self.class_sizes is None and (n_classes - 1) * self.per_class < self.n_outputs

    def slot_valid(self, classes) -> jax.Array:
        """``(..., n_outputs_per_class)`` bool: does slot ``s`` of (global) class ``classes[...]`` hold an output."""
        P = self.per_class
        slots = lax.broadcasted_iota(jnp.int32, (*classes.shape, P), classes.ndim)
        ok = classes[..., None] * P + slots < self.n_outputs
        if self.class_sizes is not None:
            ok &= slots < _checks.take(self.class_sizes, classes)[..., None]
        return ok

    def masked_class_logits(self) -> jax.Array:
        """``(batch, n_classes)`` class logits, ``-inf`` for the empty classes."""
        logits = _f.class_logits(self.x, self.W1, self.b1, self.acc)
        return jnp.where(self.class_valid[None, :], logits, -jnp.inf)

    def class_lse(self, logits) -> jax.Array:
        """``(batch,)`` log-sum-exp of ``logits`` over the classes.

        With no class at all (every class empty) it is 0, so that every
        log-probability is ``-inf`` rather than NaN.
        """
        lse = jax.nn.logsumexp(logits, axis=1)
        return jnp.where(jnp.isneginf(lse), jnp.zeros((), lse.dtype), lse)

    def class_log_probs(self) -> jax.Array:
        """``(batch, n_classes)`` log-probabilities of the classes (empty classes ``-inf``)."""
        logits = self.masked_class_logits()
        return logits - self.class_lse(logits)[:, None]

    def output_log_probs(self, class_log_probs, first_class=0) -> jax.Array:
        """``(batch, n_classes * n_outputs_per_class)`` log-probabilities, padding ``-inf``.

        ``class_log_probs`` ``(batch, n_classes)`` are those of the problem's
        classes, the first of which has the global id ``first_class``.  Columns
        follow the output ids; the caller drops the columns at and past
        ``n_outputs``.
        """
        C, P = self.W2.shape[0], self.per_class
        act = _f.all_activations(self.x, self.W2, self.b2, self.acc)  # (batch, C, P)
        slot_ok = self.slot_valid(first_class + jnp.arange(C, dtype=jnp.int32))[None]
        logp = class_log_probs[:, :, None] + _f.masked_log_softmax(act, slot_ok)
        return _f.neg_inf_where_invalid(logp, slot_ok).reshape(self.x.shape[0], C * P)

    def full_log_probs(self) -> jax.Array:
        """:meth:`output_log_probs` of every class."""
        return self.output_log_probs(self.class_log_probs())

    def select_targets(self, t, mask=None):
        """``(t, use, x)``: the targets that take part, and the inputs cut down to them.

        ``use[b]`` is ``False`` for a masked-out example, an out-of-range target
        and a target on a padded slot.  Such an example is taken out *before*
        any arithmetic: its target becomes 0 and its row of ``x`` zeros
        (selection, not multiplication), so a NaN or inf there reaches neither
        the loss nor any gradient.
        """
        P = self.per_class
        t, use = _targets.normalize_target(t, self.n_outputs)
        if mask is not None:
            use &= mask
        use &= _f.take_rows(self.slot_valid(t // P), t % P)
        t = jnp.where(use, t, jnp.zeros((), t.dtype))
        x = jnp.where(use[:, None], self.x, jnp.zeros((), self.x.dtype))
        return t, use, x

    def second_level(self, x, t, W2_classes, use, act_offset=None) -> jax.Array:
        """``(batch,)`` second-level log-probability of each target ``t`` (global ids).

        ``W2_classes`` are the targets' classes as indices into this problem's
        ``W2``; an example without ``use`` gets activations of zeros (selected),
        so its class's ``W2`` gets no gradient from it.  ``act_offset``: see
        :meth:`target_log_probs`.
        """
        act = _f.target_activations(x, self.W2, self.b2, W2_classes, self.acc)  # (batch, P)
        act = self.mark_sparse_use(act, x, W2_classes, use)
        return self.second_from_activations(act, t, use, act_offset)

    def mark_sparse_use(self, act, x, classes, use) -> jax.Array:
        """``act`` marked as the second-level activations of ``classes`` (``value_and_sparse_grad``).

        The sparse rules of ``W2`` and ``b2``: each example's activations'
        cotangent, with its ``x``, is its class's gradient (``h_softmax_loss``
        marks the weights).
        """
        act = sites.mark_use(act, self.W2, (x, classes, use), ClassBlockRule())
        return sites.mark_use(act, self.b2, (classes, use), ClassBiasRule())

    def second_from_activations(self, act, t, use, act_offset=None, slots=None) -> jax.Array:
        """``(batch,)`` the targets' second-level log-probabilities from their classes' activations.

        ``slots``: ``slot_valid`` of the targets' classes, when already known.
        """
        P = self.per_class
        if act_offset is not None:
            act = act + act_offset
        act = jnp.where(use[:, None], act, jnp.zeros((), act.dtype))
        if slots is None:
            slots = self.slot_valid(t // P)
        return _f.select_rows(_f.masked_log_softmax(act, slots), t % P)

    def target_log_probs(self, t, act_offset=None, mask=None) -> jax.Array:
        """``(batch,)`` log-probabilities of the targets ``t`` (``-inf`` where not used).

        ``act_offset`` (``(batch, n_outputs_per_class)``, zeros) is added to the
        second-level activations: its gradient is the activations' cotangent,
        which :func:`~blocksparse_jax.h_softmax_sgd_step` turns into the sparse
        ``W2`` update.  ``mask`` (``(batch,)`` bool) takes examples out as
        :meth:`select_targets` does.  The first level runs in chunks of classes
        of at most ``W2``'s elements over ``FIRST_LEVEL_SHARE`` logits (one
        chunk when they fit), so that its temporaries stay a small fraction of
        the model.
        """
        t, use, x = self.select_targets(t, mask)
        classes = t // self.per_class
        second = self.second_level(x, t, classes, use, act_offset)
        first = class_log_prob(
            x,
            self.W1,
            self.b1,
            self.class_valid,
            classes,
            self.acc,
            chunk_elements=first_level_chunk_elements(self.W2.size),
            all_valid=self.all_valid(),
        )
        return _f.neg_inf_where_invalid(first + second, use)


def prepare(x, params, n_outputs, class_sizes, *, n_real_classes=None) -> Problem:
    """Validates the arguments of a log-space function; returns the :class:`Problem`.

    ``n_real_classes`` (the parallel functions, on parameters that
    ``shard_params`` padded) is the number of classes the caller's parameters
    had: ``n_outputs`` and ``class_sizes`` are checked against it, as the
    single-device function would, and the classes past it stay empty.
    """
    W1, b1, W2, b2 = check_params(params)
    x = check_x(x, W1.shape[0])
    n_classes, _, per_class = W2.shape
    real = n_classes if n_real_classes is None else n_real_classes
    n_outputs = check_n_outputs(n_outputs, real, per_class)
    source = "W1.shape[1]" if n_real_classes is None else "the classes before shard_params"
    class_sizes = check_class_sizes(class_sizes, real, per_class, source)
    if class_sizes is not None and real < n_classes:
        class_sizes = jnp.pad(class_sizes, (0, n_classes - real))
    _, acc = _f.dtypes(x, W1, b1, W2, b2)
    valid = _f.class_valid(n_classes, per_class, n_outputs, class_sizes)
    lead = tuple(x.shape[:-1])
    x = x.reshape(-1, x.shape[-1])
    prob = Problem(x, W1, b1, W2, b2, acc, n_outputs, class_sizes, valid, lead)
    if n_valid_outputs(prob) == 0:
        raise ValueError(
            f"class_sizes must give at least one class a real output among the first "
            f"n_outputs={n_outputs} ids; got class_sizes={np.asarray(class_sizes).tolist()} "
            "(with no output there is no distribution)"
        )
    return prob


def checked_target(prob: Problem, target, mask=None) -> jax.Array:
    """``target`` as ``(batch,)``, its shape and (when concrete) its values checked.

    Entries where a concrete ``mask`` is ``False`` are not checked (they may be
    anything, e.g. -1); with a traced ``mask`` no value is checked eagerly.
    """
    t, value = _targets.check_target(target, prob.lead)
    keep = None
    if mask is not None:
        keep = _checks.concrete_value(mask)
        if keep is None:
            return t
    _targets.check_target_range(value, prob.n_outputs, keep)
    check_padded_targets(value, prob.class_sizes, prob.per_class, keep)
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
    prob = Problem(x, W1, b1, W2, b2, acc, n_outputs, class_sizes, class_valid, (x.shape[0],))
    return fn(prob, *args, **dict(static))


def unflatten(prob: Problem, out):
    """Gives the leading ``(batch, ...)`` axis of every output back the caller's ``lead`` dims."""
    return jax.tree.map(lambda a: a.reshape(prob.lead + a.shape[1:]), out)


def run_flat(fn, prob: Problem, *args, **static):
    """``fn(prob, *args, **static)`` as one cached ``jax.jit`` computation.

    The validation (and the checks of concrete values) happens before, eagerly;
    the computation itself is then compiled once per configuration instead of
    dispatched op by op (and, for a ``lax.scan``, retraced on every call).
    """
    arrays = (prob.x, prob.W1, prob.b1, prob.W2, prob.b2, prob.class_sizes, prob.class_valid)
    static = tuple(sorted(static.items()))
    return _run_jit(arrays, args, fn=fn, acc=prob.acc, n_outputs=prob.n_outputs, static=static)


def run(fn, prob: Problem, *args, **static):
    """:func:`run_flat`, with every output's leading batch axis reshaped to ``prob.lead``."""
    return unflatten(prob, run_flat(fn, prob, *args, **static))
