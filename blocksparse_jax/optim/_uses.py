"""How each op reports a sparse use of its weight to :class:`~blocksparse_jax.optim._sparse_grad.Recorder`.

Each handler evaluates the op with the tracked weights held constant, adds a
zero probe to the op's output (its cotangent is the output's cotangent) and
records how the pairs of the weight's gradient follow from that cotangent:
the block each pair touches and its two factors.
"""

from __future__ import annotations

import jax.numpy as jnp

from blocksparse_jax import _checks
from blocksparse_jax.blocksparse import sparse_block_dot, sparse_block_gemv
from blocksparse_jax.hsoftmax import _problem as _p
from blocksparse_jax.hsoftmax._params import HSoftmaxParams


def _gemv_pairs(W, h, input_idx, output_idx):
    """Block index, validity and the left factor of every ``(example, i, j)`` pair."""
    i_blocks, o_blocks = W.shape[:2]
    h = jnp.asarray(h)
    ii, vi = _checks.normalize_index(jnp.asarray(input_idx), i_blocks)
    oi, vo = _checks.normalize_index(jnp.asarray(output_idx), o_blocks)
    if h.ndim == 2:  # one example
        h, ii, vi, oi, vo = h[None], ii[None], vi[None], oi[None], vo[None]
    blocks = ii[:, :, None] * o_blocks + oi[:, None, :]  # (batch, i_win, o_win)
    valid = vi[:, :, None] & vo[:, None, :]
    return blocks, valid, h, oi, vo


def _gemv_builds(W, o_win: int):
    """The ``build`` functions of ``W``: pairs ``(b, i, j)``, ``left = h[b, i]``, ``right = g[b, j]``."""
    i_size, o_size = W.shape[2:]
    n_blocks = W.shape[0] * W.shape[1]

    def build(g, a):
        blocks, valid, h = a["blocks"], a["valid"], a["h"]
        g = g if g.ndim == 3 else g[None]
        batch, i_win = h.shape[:2]
        left = jnp.broadcast_to(h[:, :, None, :], (batch, i_win, o_win, i_size))
        right = jnp.broadcast_to(g[:, None, :, :], (batch, i_win, o_win, o_size))
        pb = jnp.where(valid, blocks, n_blocks).reshape(-1)
        return pb, left.reshape(-1, i_size), right.reshape(-1, o_size)

    return build


def _bias_build(n_blocks: int, size: int):
    def build(g, a):
        g = g if g.ndim == 3 else g[None]
        pb = jnp.where(a["vo"], a["oi"], n_blocks).reshape(-1)
        return pb, None, g.reshape(-1, size)

    return build


def gemv(rec, o, W, h, input_idx, output_idx, *, strategy="auto"):
    out = sparse_block_gemv(o, rec.held(W), h, input_idx, output_idx, strategy=strategy)
    k, probe = rec.probe(out.shape, out.dtype, [W])
    blocks, valid, hb, _, _ = _gemv_pairs(W, h, input_idx, output_idx)
    o_win = jnp.shape(output_idx)[-1]
    rec.record(W, k, {"blocks": blocks, "valid": valid, "h": hb}, _gemv_builds(W, o_win))
    return out + probe


def dot(rec, W, h, input_idx, b, output_idx, *, strategy="auto"):
    out = sparse_block_dot(rec.held(W), h, input_idx, rec.held(b), output_idx, strategy=strategy)
    k, probe = rec.probe(out.shape, out.dtype, [W, b])
    blocks, valid, hb, oi, vo = _gemv_pairs(W, h, input_idx, output_idx)
    o_win = jnp.shape(output_idx)[-1]
    rec.record(W, k, {"blocks": blocks, "valid": valid, "h": hb}, _gemv_builds(W, o_win))
    rec.record(b, k, {"oi": oi, "vo": vo}, _bias_build(W.shape[1], W.shape[3]))
    return out + probe


def _log_probs_with_offset(prob, t, mask, probe):
    return prob.target_log_probs(t, probe, mask)


def h_softmax_loss(
    rec, x, params, target, *, n_outputs=None, mask=None, reduction="mean", class_sizes=None
):
    _p.check_reduction(reduction)
    W1, b1, W2, b2 = params
    held = HSoftmaxParams(W1, b1, rec.held(W2), rec.held(b2))
    prob = _p.prepare(x, held, n_outputs, class_sizes)
    mask = _p.check_mask(mask, prob.lead)
    t = _p.checked_target(prob, target, mask)
    flat_mask = mask.reshape(-1)
    batch, P = prob.x.shape[0], prob.per_class
    k, probe = rec.probe((batch, P), prob.acc, [W2, b2])
    logp = _p.run(_log_probs_with_offset, prob, t, flat_mask, probe)
    loss = _p.reduce_nll(logp, mask, reduction)
    # The examples that take part, and their inputs (zeros elsewhere), as the loss saw them.
    t32, valid, xs = prob.select_targets(t, flat_mask)
    n_classes = W2.shape[0]
    classes = jnp.where(valid, t32 // P, n_classes)

    def build_w2(g, a):
        return a["classes"], a["x"].astype(g.dtype), g

    def build_b2(g, a):
        return a["classes"], None, g

    rec.record(W2, k, {"classes": classes, "x": xs}, build_w2)
    rec.record(b2, k, {"classes": classes}, build_b2)
    return loss


def embedding(rec, table, ids):
    from blocksparse_jax.optim._embedding import _lookup

    rows = _lookup(rec.held(table), ids)
    k, probe = rec.probe(rows.shape, rows.dtype, [table])
    n, d = table.shape
    ok = (ids >= 0) & (ids < n)
    blocks = jnp.where(ok, ids, n).astype(jnp.int32)

    def build(g, a):
        return a["blocks"].reshape(-1), None, g.reshape(-1, d)

    rec.record(table, k, {"blocks": blocks}, build)
    return rows + probe


HANDLERS = {
    "sparse_block_gemv": gemv,
    "sparse_block_dot": dot,
    "h_softmax_loss": h_softmax_loss,
    "embedding_lookup": embedding,
}
