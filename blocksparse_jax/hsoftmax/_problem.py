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

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax import _checks
from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax._checks import as_array as _as_array
from blocksparse_jax._checks import shape_str as _shape
from blocksparse_jax.blocksparse import sparse_block_dot
from blocksparse_jax.hsoftmax._first_level import class_log_prob
from blocksparse_jax.hsoftmax._params import check_params

# The first level's chunks of logits may hold up to W2's elements over this.
FIRST_LEVEL_SHARE = 64


def first_level_chunk_elements(w2_elements: int) -> int:
    """The logits a chunk of the first level may hold, for a ``W2`` of this many elements."""
    return int(w2_elements) // FIRST_LEVEL_SHARE


# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------


def static_int(name: str, value, *, hint: str = "") -> int:
    """``value`` as a Python int fixed at trace time; a traced value says how to mark it static."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a Python int, fixed at trace time; got a traced value "
            f"({type(value).__name__}). Under jax.jit mark it static, e.g. "
            f"jax.jit(f, static_argnames={name!r}){hint}"
        )
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int; got {type(value).__name__} {value!r}")
    return int(value)


def check_x(x, n_in: int, *, theano: bool = False) -> jax.Array:
    """``x`` of shape ``(..., n_in)`` (``(batch, n_in)`` for Theano's ``h_softmax``)."""
    x = _as_array("x", x)
    _checks.check_float("x", x)
    if theano and x.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, n_in); got shape {_shape(x.shape)}")
    if x.ndim == 0:
        raise ValueError(
            "x must have shape (..., n_in): any leading batch dimensions, then n_in; got a scalar"
        )
    if x.shape[-1] != n_in:
        desc = {1: "(n_in,)", 2: "(batch, n_in)"}.get(x.ndim, "(..., n_in)")
        raise ValueError(
            f"x must have shape {desc} with n_in={n_in} (W1.shape[0]); got shape {_shape(x.shape)}"
        )
    return x


_N_OUTPUTS_HINT = (
    ", or leave n_outputs out: it defaults to n_classes * n_outputs_per_class "
    "(the layout's n_outputs)."
)


def check_n_outputs(n_outputs, n_classes: int, per_class: int) -> int:
    """``n_outputs`` (default ``n_classes * n_outputs_per_class``) as a checked Python int."""
    if n_outputs is None:
        return n_classes * per_class
    n_outputs = static_int("n_outputs", n_outputs, hint=_N_OUTPUTS_HINT)
    if not 1 <= n_outputs <= n_classes * per_class:
        raise ValueError(
            f"n_outputs must be in [1, n_classes * n_outputs_per_class] = "
            f"[1, {n_classes * per_class}] (n_classes={n_classes}, "
            f"n_outputs_per_class={per_class}); got n_outputs={n_outputs}"
        )
    return n_outputs


def check_class_sizes(
    class_sizes, n_classes: int, per_class: int, source: str = "W1.shape[1]"
) -> jax.Array | None:
    """``class_sizes`` as ``(n_classes,)`` int32, clipped to ``[0, n_outputs_per_class]``.

    Concrete values outside that range raise; traced ones are clipped (a
    negative size is an empty class, a size above ``n_outputs_per_class`` a
    full one).
    """
    if class_sizes is None:
        return None
    class_sizes = _as_array("class_sizes", class_sizes)
    if not jnp.issubdtype(class_sizes.dtype, jnp.integer):
        raise TypeError(
            f"class_sizes must be an integer array (the number of outputs in each class); "
            f"got dtype {class_sizes.dtype}. Cast it with class_sizes.astype(jnp.int32)."
        )
    if class_sizes.shape != (n_classes,):
        raise ValueError(
            f"class_sizes must have shape (n_classes,) = {_shape((n_classes,))} with "
            f"n_classes={n_classes} ({source}); got shape {_shape(class_sizes.shape)}"
        )
    value = _checks.concrete_value(class_sizes)
    if value is not None and ((value < 0) | (value > per_class)).any():
        raise ValueError(
            f"class_sizes must lie in [0, n_outputs_per_class] = [0, {per_class}]; "
            f"got {value.tolist()}"
        )
    dt = class_sizes.dtype
    hi = min(per_class, int(np.iinfo(dt).max))
    return jnp.clip(class_sizes, jnp.zeros((), dt), jnp.asarray(hi, dt)).astype(jnp.int32)


_I32 = np.iinfo(np.int32)


def _host_target(target):
    """A target that is not a JAX array, as NumPy (its true values), or ``None``.

    NumPy and Python integers are inspected before JAX converts them: with x64
    off JAX would wrap an int64 beyond the int32 range into a real output id,
    and a Python int beyond it raises an ``OverflowError`` naming nothing.
    """
    if isinstance(target, jax.Array):
        return None
    try:
        value = np.asarray(target)
    except (TypeError, ValueError):
        return None
    if value.dtype == object:  # Python ints beyond int64
        flat = value.ravel().tolist()
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            return None
        clipped = np.array([min(max(v, -1), int(_I32.max)) for v in flat], np.int64)
        return clipped.reshape(value.shape), value
    return value, value


def check_target(target, lead: tuple[int, ...], mask=None) -> tuple[jax.Array, np.ndarray | None]:
    """Validates ``target``'s dtype and shape against the leading dims ``lead`` of ``x``.

    Returns ``(target as (N,), its concrete values shaped lead, or None)``.  A concrete
    target's values are checked by :func:`check_target_values`.
    """
    host = _host_target(target)
    if host is not None:
        value, exact = host
        if value.dtype.kind not in "iu":
            raise TypeError(
                f"target must be an array of integer output ids; got dtype {value.dtype}. "
                "Cast it with target.astype(jnp.int32)."
            )
        # Every value JAX cannot hold is out of range anyway: clip (the checks see the exact values).
        arr = jnp.asarray(
            np.clip(value, max(-1, int(np.iinfo(value.dtype).min)), _I32.max).astype(np.int32)
        )
    else:
        arr = _as_array("target", target)
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(
                f"target must be an array of integer output ids; got dtype {arr.dtype}. "
                "Cast it with target.astype(jnp.int32)."
            )
        exact = _checks.concrete_value(arr)
    if arr.shape not in (lead, lead + (1,)):
        if lead == ():
            want = "be a scalar (or shape (1,)) for a 1-D x"
        elif len(lead) == 1:
            want = f"have shape (batch,) or (batch, 1) with batch={lead[0]} (x.shape[0])"
        else:
            want = f"have shape x.shape[:-1] = {_shape(lead)} (or that with a trailing 1)"
        raise ValueError(f"target must {want}; got shape {_shape(arr.shape)}")
    n = int(np.prod(lead, dtype=np.int64))
    return arr.reshape(n), (None if exact is None else np.asarray(exact).reshape(lead))


def check_target_values(value, n_outputs: int, class_sizes, per_class: int, keep=None) -> None:
    """Concrete targets outside ``[0, n_outputs)`` or on a padded slot raise ``IndexError``.

    ``value`` holds the exact values (NumPy, possibly ``object`` for huge Python
    ints); entries where ``keep`` is ``False`` (masked out) are not checked.
    """
    if value is None or value.size == 0:
        return
    keep = np.ones(value.shape, bool) if keep is None else np.asarray(keep, bool)
    bad = keep & ((value < 0) | (value >= n_outputs)).astype(bool)
    if bad.any():
        pos = _checks.first_position(bad)
        raise IndexError(
            f"target holds {int(value[pos])} at position {pos}, out of range for "
            f"n_outputs={n_outputs} (valid targets are 0 <= t < {n_outputs})"
        )
    sv = None if class_sizes is None else _checks.concrete_value(class_sizes)
    if sv is None:
        return
    tv = np.where(keep, value, 0).astype(np.int64)
    bad = keep & ((tv % per_class) >= sv[tv // per_class])
    if bad.any():
        pos = _checks.first_position(bad)
        c = int(tv[pos]) // per_class
        held = f"slots 0..{int(sv[c]) - 1}" if sv[c] > 0 else "no slot"
        raise IndexError(
            f"target holds {int(tv[pos])} at position {pos}, a padded slot: class {c} holds "
            f"class_sizes[{c}]={int(sv[c])} outputs ({held})"
        )


def normalize_target(target: jax.Array, n_outputs: int) -> tuple[jax.Array, jax.Array]:
    """``(int32 target in [0, n_outputs), valid mask)`` of a traced or concrete ``target``.

    Targets count from 0 only (a negative target is out of range).  An
    out-of-range entry comes back as 0 with ``valid == False``, and the
    ``fill``-mode probe gather of ``_checks`` makes ``checkify.index_checks``
    report it, with its value.
    """
    info = jnp.iinfo(target.dtype)
    lo, hi = max(int(info.min), int(_I32.min)), min(int(info.max), int(_I32.max))
    raw = jnp.clip(target, jnp.asarray(lo, target.dtype), jnp.asarray(hi, target.dtype))
    raw = raw.astype(jnp.int32)
    valid = _checks.probe_gather(n_outputs, raw)
    return jnp.where(valid, raw, jnp.zeros((), jnp.int32)), valid


def check_mask(mask, lead: tuple[int, ...]) -> jax.Array:
    """``mask`` (default all ``True``) as a bool array of shape ``lead``."""
    if mask is None:
        return jnp.ones(lead, jnp.bool_)
    mask = _as_array("mask", mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a bool array; got dtype {mask.dtype}")
    if mask.shape != lead:
        desc = "()" if lead == () else "(batch,)" if len(lead) == 1 else "x.shape[:-1]"
        raise ValueError(
            f"mask must have shape {desc} = {_shape(lead)}, one entry per example of x; "
            f"got shape {_shape(mask.shape)}"
        )
    return mask


def check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


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
    ``b2`` and ``class_valid`` hold all classes, or with ``model_axis`` set
    (inside ``shard_map``) this shard's contiguous range of them;
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
    model_axis: str | None = None

    @property
    def per_class(self) -> int:
        return self.W2.shape[2]

    def all_valid(self) -> bool:
        """Is every class known at trace time to hold an output (no ``class_sizes``, no empty class)?"""
        n_classes = self.W1.shape[1]
        return (
            self.class_sizes is None
            and self.model_axis is None
            and ((n_classes - 1) * self.per_class < self.n_outputs)
        )

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
        constant for the gradient (which does not depend on it).  With no class
        at all (every class empty) it is 0, so that every log-probability is
        ``-inf`` rather than NaN.
        """
        if self.model_axis is None:
            lse = jax.nn.logsumexp(logits, axis=1)
        else:
            m = lax.pmax(lax.stop_gradient(jnp.max(logits, axis=1)), self.model_axis)
            m = jnp.where(jnp.isneginf(m), jnp.zeros((), m.dtype), m)
            s = lax.psum(jnp.sum(jnp.exp(logits - m[:, None]), axis=1), self.model_axis)
            lse = m + jnp.log(s)
        return jnp.where(jnp.isneginf(lse), jnp.zeros((), lse.dtype), lse)

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

    def select_targets(self, t, mask=None):
        """``(t, use, x)``: the targets that take part, and the inputs cut down to them.

        ``use[b]`` is ``False`` for a masked-out example, an out-of-range target
        and a target on a padded slot.  Such an example is taken out *before*
        any arithmetic: its target becomes 0 and its row of ``x`` zeros
        (selection, not multiplication), so a NaN or inf there reaches neither
        the loss nor any gradient.
        """
        P = self.per_class
        t, use = normalize_target(t, self.n_outputs)
        if mask is not None:
            use &= mask
        use &= _take(self.slot_valid(t // P), t % P)
        t = jnp.where(use, t, jnp.zeros((), t.dtype))
        x = jnp.where(use[:, None], self.x, jnp.zeros((), self.x.dtype))
        return t, use, x

    def target_log_probs(self, t, act_offset=None, mask=None) -> jax.Array:
        """``(batch,)`` log-probabilities of the targets ``t`` (``-inf`` where not used).

        ``act_offset`` (``(batch, n_outputs_per_class)``, zeros) is added to the
        second-level activations: its gradient is the activations' cotangent,
        which :func:`~blocksparse_jax.h_softmax_sgd_step` turns into the sparse
        ``W2`` update.  ``mask`` (``(batch,)`` bool) takes examples out as
        :meth:`select_targets` does.  With ``model_axis``, the shard that owns a
        target's class computes its term and the shards' terms are summed; for
        a class another shard owns, class 0 stands in and its activations are
        replaced by zeros (selection), so this shard's ``W2`` gets no gradient
        from it, even where its class 0 holds a NaN.
        """
        P = self.per_class
        t, use, x = self.select_targets(t, mask)
        prob = self._replace(x=x)
        classes, slots = t // P, t % P
        local = classes - self.first_class()
        mine = use
        if self.model_axis is not None:
            owned = (local >= 0) & (local < self.W2.shape[0])
            local = jnp.where(owned, local, 0)
            mine = use & owned
        act = target_activations(x, self.W2, self.b2, local, self.acc)  # (batch, P)
        if self.model_axis is None:  # the sparse rules of W2 and b2 (see h_softmax_loss)
            act = sites.mark_use(act, self.W2, (x, local, mine), ClassBlockRule())
            act = sites.mark_use(act, self.b2, (local, mine), ClassBiasRule())
        if act_offset is not None:
            act = act + act_offset
        act = jnp.where(mine[:, None], act, jnp.zeros((), act.dtype))
        slot_ok = self.slot_valid(classes)
        second = _take(masked_log_softmax(act, slot_ok), slots)
        if self.model_axis is None:
            # The first level in chunks of classes of at most 1/64 of W2's elements in
            # logits (one chunk when they fit), so its temporaries stay a small
            # fraction of the model.
            first = class_log_prob(
                x, self.W1, self.b1, self.class_valid, local, self.acc,
                chunk_elements=first_level_chunk_elements(self.W2.size),
                all_valid=self.all_valid(),
            )  # fmt: skip
            return neg_inf_where_invalid(first + second, use)
        logits = prob.class_logits()
        term = _take(logits, local) + second
        term = lax.psum(jnp.where(mine, term, jnp.zeros((), term.dtype)), self.model_axis)
        return neg_inf_where_invalid(term - prob.class_lse(logits), use)


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
    _, acc = dtypes(x, W1, b1, W2, b2)
    valid = class_valid(n_classes, per_class, n_outputs, class_sizes)
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
    t, value = check_target(target, prob.lead)
    keep = None
    if mask is not None:
        keep = _checks.concrete_value(mask)
        if keep is None:
            return t
    check_target_values(value, prob.n_outputs, prob.class_sizes, prob.per_class, keep)
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
    return _run_jit(
        arrays, args, fn=fn, acc=prob.acc, n_outputs=prob.n_outputs,
        static=tuple(sorted(static.items())),
    )  # fmt: skip


def run(fn, prob: Problem, *args, **static):
    """:func:`run_flat`, with every output's leading batch axis reshaped to ``prob.lead``."""
    return unflatten(prob, run_flat(fn, prob, *args, **static))
