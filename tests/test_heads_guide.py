"""The code blocks of docs/heads.md, run as a reader would (a fresh interpreter, JAX's defaults)."""

import math

import pytest

from tests.doc_blocks import run_block


@pytest.mark.slow
def test_exact_softmax_block():
    loss, shapes, finite = run_block(
        "heads.md",
        "exact softmax",
        "[float(loss), [list(per_token.shape), list(logp.shape), list(drawn.shape)], "
        "bool(jax.numpy.isfinite(weighted.W).all())]",
    )
    assert math.isfinite(loss) and loss > 0
    assert shapes == [[2, 16], [2, 16, 5], [2, 16]] and finite


@pytest.mark.slow
def test_sampled_softmax_block():
    loss, exact, n_ids = run_block(
        "heads.md", "sampled softmax", "[float(loss), float(exact), len(set(drawn.ids.tolist()))]"
    )
    assert math.isfinite(loss) and math.isfinite(exact) and n_ids == 512
