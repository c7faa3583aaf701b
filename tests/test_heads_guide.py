"""The code blocks of docs/heads.md, run as a reader would (a fresh interpreter, JAX's defaults)."""

import math

from tests.doc_blocks import run_block


def test_exact_softmax_block():
    loss, shapes, finite = run_block(
        "heads.md",
        "exact softmax",
        "[float(loss), [list(per_token.shape), list(logp.shape), list(drawn.shape)], "
        "bool(jax.numpy.isfinite(weighted.W).all())]",
    )
    assert math.isfinite(loss) and loss > 0
    assert shapes == [[2, 16], [2, 16, 5], [2, 16]] and finite


def test_sampled_softmax_block():
    loss, exact, n_ids = run_block(
        "heads.md", "sampled softmax", "[float(loss), float(exact), len(set(drawn.ids.tolist()))]"
    )
    assert math.isfinite(loss) and math.isfinite(exact) and n_ids == 512


def test_sampled_softmax_trained_lazily_block():
    loss, kind, moved = run_block(
        "heads.md",
        "sampled softmax, trained lazily",
        "[float(loss), type(params).__name__, "
        "int((abs(params.W - full_softmax_init(jax.random.key(0), 64, 50_000, "
        'layout="rows").W).max(axis=1) > 0).sum())]',
    )
    assert math.isfinite(loss) and loss > 0 and kind == "FullSoftmaxRowParams"
    assert 0 < moved <= 3 * (32 + 512)  # lazy: only the rows the three steps read moved
