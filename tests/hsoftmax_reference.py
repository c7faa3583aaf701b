"""Brute-force references for the hierarchical softmax, in float64 NumPy.

Written from Theano's formulas (``h_softmax``) with one Python loop
per example and per class; they share no code with the library.
"""

import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def _log_softmax(v):
    m = np.max(v)
    return v - m - np.log(np.sum(np.exp(v - m)))


def theano_h_softmax_ref(x, n_outputs, n_classes, n_outputs_per_class, W1, b1, W2, b2):
    """Theano's ``h_softmax`` without a target: ``(batch, n_outputs)``.

    Every class's softmax runs over all its ``n_outputs_per_class`` slots (the
    padded ones too), then the outputs past ``n_outputs`` are dropped.
    """
    x, W1, b1, W2, b2 = map(_f64, (x, W1, b1, W2, b2))
    out = np.zeros((x.shape[0], n_classes * n_outputs_per_class))
    for b in range(x.shape[0]):
        class_probs = _softmax(x[b] @ W1 + b1)
        for c in range(n_classes):
            p = _softmax(x[b] @ W2[c] + b2[c])
            out[b, c * n_outputs_per_class : (c + 1) * n_outputs_per_class] = class_probs[c] * p
    return out[:, :n_outputs]


def real_outputs(n_outputs, n_classes, n_outputs_per_class, class_sizes=None):
    """``(n_classes, n_outputs_per_class)`` bool: which (class, slot) holds an output."""
    real = np.zeros((n_classes, n_outputs_per_class), bool)
    for c in range(n_classes):
        for s in range(n_outputs_per_class):
            o = c * n_outputs_per_class + s
            real[c, s] = o < n_outputs and (class_sizes is None or s < class_sizes[c])
    return real


def h_log_softmax_ref(x, W1, b1, W2, b2, n_outputs, class_sizes=None):
    """The masked joint log-distribution ``(batch, n_outputs)``; padding is ``-inf``.

    ``log p(o) = log_softmax over non-empty classes [c] + log_softmax over c's real slots [s]``.
    """
    x, W1, b1, W2, b2 = map(_f64, (x, W1, b1, W2, b2))
    n_classes, _, per_class = W2.shape
    real = real_outputs(n_outputs, n_classes, per_class, class_sizes)
    classes = [c for c in range(n_classes) if real[c].any()]
    out = np.full((x.shape[0], n_classes * per_class), -np.inf)
    for b in range(x.shape[0]):
        class_lp = _log_softmax(np.array([x[b] @ W1[:, c] + b1[c] for c in classes]))
        for lp_c, c in zip(class_lp, classes, strict=True):
            slots = np.flatnonzero(real[c])
            slot_lp = _log_softmax(x[b] @ W2[c][:, slots] + b2[c, slots])
            out[b, c * per_class + slots] = lp_c + slot_lp
    return out[:, :n_outputs]


def nll_ref(x, W1, b1, W2, b2, target, n_outputs, mask=None, reduction="mean"):
    """``-log p(target)`` reduced as ``h_softmax_loss`` does."""
    logp = h_log_softmax_ref(x, W1, b1, W2, b2, n_outputs)
    target = np.asarray(target).reshape(-1)
    mask = np.ones(target.shape, bool) if mask is None else np.asarray(mask)
    nll = np.array(
        [-logp[b, t] if m else 0.0 for b, (t, m) in enumerate(zip(target, mask, strict=True))]
    )
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / max(mask.sum(), 1)
