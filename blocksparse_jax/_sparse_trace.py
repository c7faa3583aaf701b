"""The trace-time hook through which the ops report a sparse use of a weight.

:func:`blocksparse_jax.value_and_sparse_grad` traces the user's function with a
recorder active.  The ops that read only some blocks of a weight
(``sparse_block_gemv``, ``sparse_block_dot``, ``h_softmax_loss``,
``embedding_lookup``) ask :func:`claimant` whether one of their weight
arguments is an array the recorder tracks (by identity); if so they hand the
call to the recorder, which evaluates the op with the weight held constant and
records, for the gradient, which blocks the op touched and the per-pair
factors.  Without a recorder (the usual case) :func:`claimant` returns ``None``
and costs one list lookup.

This module imports nothing from the package, so that every op can import it.
"""

from __future__ import annotations

import threading

_STATE = threading.local()


def _stack() -> list:
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    return _STATE.stack


def claimant(*arrays):
    """The active recorder if it tracks any of ``arrays`` (and is not already inside an op)."""
    stack = _stack()
    if not stack:
        return None
    rec = stack[-1]
    if rec.busy:
        return None
    return rec if any(rec.tracks(a) for a in arrays) else None


class active:
    """``with active(recorder):`` makes ``recorder`` the one :func:`claimant` answers with."""

    def __init__(self, recorder):
        self.recorder = recorder

    def __enter__(self):
        _stack().append(self.recorder)
        return self.recorder

    def __exit__(self, *exc):
        _stack().pop()
        return False
