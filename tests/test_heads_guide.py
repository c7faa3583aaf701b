"""The code blocks of docs/heads.md, run as a reader would (a fresh interpreter, JAX's defaults).

The blocks run one after the other in one fresh interpreter, each as a script
of its own (:func:`~tests.doc_blocks.run_blocks`); each test checks one.
"""

import functools
import math

import pytest

from tests.doc_blocks import reported, run_blocks


@functools.cache
def _runs():
    return run_blocks(
        {
            "exact softmax": (
                "heads.md",
                "exact softmax",
                "[float(loss), [list(per_token.shape), list(logp.shape), list(drawn.shape)], "
                "bool(jax.numpy.isfinite(weighted.W).all())]",
                None,
            ),
            "sampled softmax": (
                "heads.md",
                "sampled softmax",
                "[float(loss), float(exact), len(set(drawn.ids.tolist()))]",
                None,
            ),
            "sampled softmax, trained lazily": (
                "heads.md",
                "sampled softmax, trained lazily",
                "[float(loss), type(params).__name__, "
                "int((abs(params.W - full_softmax_init(jax.random.key(0), 64, 50_000, "
                'layout="rows").W).max(axis=1) > 0).sum())]',
                None,
            ),
        }
    )


@pytest.mark.slow
@pytest.mark.xdist_group("heads_guide")  # one worker runs _runs once
def test_exact_softmax_block():
    loss, shapes, finite = reported(_runs(), "exact softmax")
    assert math.isfinite(loss) and loss > 0
    assert shapes == [[2, 16], [2, 16, 5], [2, 16]] and finite


@pytest.mark.slow
@pytest.mark.xdist_group("heads_guide")
def test_sampled_softmax_block():
    loss, exact, n_ids = reported(_runs(), "sampled softmax")
    assert math.isfinite(loss) and math.isfinite(exact) and n_ids == 512


@pytest.mark.slow
@pytest.mark.xdist_group("heads_guide")
def test_sampled_softmax_trained_lazily_block():
    loss, kind, moved = reported(_runs(), "sampled softmax, trained lazily")
    assert math.isfinite(loss) and loss > 0 and kind == "FullSoftmaxRowParams"
    assert 0 < moved <= 3 * (32 + 512)  # lazy: only the rows the three steps read moved
