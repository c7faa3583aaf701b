"""Plain-loop references written from Theano's documented formulas, in float64 NumPy.

These are deliberately naive: one Python loop per index, exactly as Theano's
documentation writes the operations, so they share no code with the library.
NumPy's own indexing gives negative indices their count-from-the-end meaning.
"""

import numpy as np


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def gemv_ref(o, W, h, iIdx, oIdx):
    """for b, j, i: o[b, j, :] += numpy.dot(h[b, i], W[iIdx[b, i], oIdx[b, j]])"""
    o, W, h = _f64(o).copy(), _f64(W), _f64(h)
    iIdx, oIdx = np.asarray(iIdx), np.asarray(oIdx)
    for b in range(o.shape[0]):
        for j in range(o.shape[1]):
            for i in range(h.shape[1]):
                o[b, j, :] += np.dot(h[b, i], W[iIdx[b, i], oIdx[b, j]])
    return o


def outer_ref(o, x, y, xIdx, yIdx, alpha=1.0):
    """for b, i, j: o[xIdx[b, i], yIdx[b, j]] += alpha * outer(x[b, i], y[b, j])"""
    o, x, y = _f64(o).copy(), _f64(x), _f64(y)
    xIdx, yIdx = np.asarray(xIdx), np.asarray(yIdx)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            for j in range(y.shape[1]):
                o[xIdx[b, i], yIdx[b, j]] += alpha * np.outer(x[b, i], y[b, j])
    return o


def dot_ref(W, h, inputIdx, b, outputIdx):
    """dot(W[i, j], h[i]) + b[j], the bias added once per output slot."""
    b = _f64(b)
    outputIdx = np.asarray(outputIdx)
    o = np.zeros(outputIdx.shape + (b.shape[1],))
    for n in range(outputIdx.shape[0]):
        for j in range(outputIdx.shape[1]):
            o[n, j] = b[outputIdx[n, j]]
    return gemv_ref(o, W, h, inputIdx, outputIdx)


def gemv_grads_ref(W, h, iIdx, oIdx, g):
    """Gradients of ``sum(gemv(o, W, h, iIdx, oIdx) * g)`` for W and h, by the explicit sums.

    dW[iIdx[b, i], oIdx[b, j]] += outer(h[b, i], g[b, j]);
    dh[b, i] = sum_j W[iIdx[b, i], oIdx[b, j]] @ g[b, j].
    """
    W, h, g = _f64(W), _f64(h), _f64(g)
    dW = np.zeros_like(W)
    dh = np.zeros_like(h)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            for j in range(g.shape[1]):
                blk = W[iIdx[b, i], oIdx[b, j]]
                dW[iIdx[b, i], oIdx[b, j]] += np.outer(h[b, i], g[b, j])
                dh[b, i] += blk @ g[b, j]
    return dW, dh
