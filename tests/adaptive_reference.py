"""Brute-force references for the adaptive softmax, in float64 NumPy.

Written from the formulas of Grave et al. (PyTorch's ``AdaptiveLogSoftmaxWithLoss``)
with one Python loop per example and per cluster; they share no code with the library.
"""

import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _log_softmax(v):
    m = np.max(v)
    return v - m - np.log(np.sum(np.exp(v - m)))


def adaptive_log_softmax_ref(x, head_W, head_b, tail_proj, tail_out):
    """``(batch, n_outputs)`` log-probabilities, from ``x @ W`` weights."""
    x, head_W = _f64(x), _f64(head_W)
    K = len(tail_out)
    S = head_W.shape[1] - K
    sizes = [np.shape(o)[1] for o in tail_out]
    out = np.zeros((x.shape[0], S + sum(sizes)))
    for b in range(x.shape[0]):
        logits = x[b] @ head_W + (0.0 if head_b is None else _f64(head_b))
        head = _log_softmax(logits)
        out[b, :S] = head[:S]
        start = S
        for i in range(K):
            hidden = x[b] @ _f64(tail_proj[i])
            out[b, start : start + sizes[i]] = head[S + i] + _log_softmax(
                hidden @ _f64(tail_out[i])
            )
            start += sizes[i]
    return out


def nll_ref(x, params, target, mask=None, reduction="mean"):
    """The loss from :func:`adaptive_log_softmax_ref`; masked examples excluded."""
    logp = adaptive_log_softmax_ref(x, *params)
    target = np.asarray(target)
    mask = np.ones(target.shape, bool) if mask is None else np.asarray(mask)
    nll = np.array(
        [-logp[b, target[b]] if mask[b] else 0.0 for b in range(target.shape[0])], np.float64
    )
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / max(1, mask.sum())


def cutoff_cost(cum, cutoffs, n_words, n_in, widths):
    """The cost model of ``adaptive_softmax_cutoffs`` for one choice of cutoffs."""
    K = len(cutoffs)
    ends = [*cutoffs, n_words]
    cost = (cutoffs[0] + K) * (n_in + 1.0)
    for i in range(K):
        a, b = ends[i], ends[i + 1]
        cost += (cum[b] - cum[a]) * (b - a) * (widths[i] + 1.0)
    return cost
