"""Padding and ids, as each function documents them: zeros or ``-inf`` under ``jit``, no gradient,
a refusal eagerly; ids beyond int32 refused; ``top_k`` never repeats an id."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blocksparse_jax as bsj
from blocksparse_jax import embedding_lookup, value_and_sparse_grad

F32 = jnp.float32


def test_embedding_padding_under_jit_reads_zeros_and_gets_no_gradient():
    table = jax.random.normal(jax.random.key(0), (6, 3), F32)
    ids = jnp.array([-1, 2, 6, -6, 2])  # -1, 6 and -6 are outside [0, 6)
    rows = jax.jit(embedding_lookup)(table, ids)
    np.testing.assert_array_equal(rows[jnp.array([0, 2, 3])], 0.0)
    np.testing.assert_array_equal(rows[1], table[2])

    loss = lambda t, ids: jnp.sum(jnp.sin(embedding_lookup(t, ids)) * 3.0)
    dense = jax.jit(jax.grad(loss))(table, ids)
    touched = np.flatnonzero(np.any(np.asarray(dense) != 0, axis=1))
    assert touched.tolist() == [2]  # the last row (-1) and the first (-6) get nothing

    @jax.jit
    def sparse(t, ids):
        _, g = value_and_sparse_grad(loss)(t, ids)
        return g.indices, g.todense()

    indices, grad = sparse(table, ids)
    assert np.asarray(indices).tolist()[:1] == [2] and (np.asarray(indices)[1:] == 6).all()
    np.testing.assert_allclose(grad, dense, rtol=1e-6)


def test_embedding_padding_eagerly_is_refused():
    table = jnp.ones((6, 3), F32)
    for bad in (-1, 6):
        with pytest.raises(IndexError, match=f"ids holds {bad} at position"):
            embedding_lookup(table, jnp.array([1, bad]))


def _layer_with_layout():
    from flax import nnx

    from blocksparse_jax.flax import HSoftmax

    counts = np.array([50, 30, 10, 5, 3, 1, 1])  # 7 words
    layout = bsj.frequency_classes(counts, n_classes=3)
    return HSoftmax(4, layout=layout, rngs=nnx.Rngs(0)), layout


def test_layout_padding_word_scores_minus_inf_and_is_not_trained():
    from flax import nnx

    layer, layout = _layer_with_layout()
    x = jax.random.normal(jax.random.key(1), (3, 4), F32)
    words = jnp.array([-1, 3, 6])  # -1: padding

    @nnx.jit
    def out(layer, x, words):
        return layer(x, words).output

    got = out(layer, x, words)
    assert np.isneginf(got[0]) and np.isfinite(got[1:]).all()
    np.testing.assert_allclose(got[1:], out(layer, x[1:], words[1:]), rtol=1e-6)

    params = nnx.state(layer, nnx.Param)

    @nnx.jit
    def grads(layer, x, words):
        def loss(layer):
            return -jnp.sum(jnp.where(words >= 0, layer(x, words).output, 0.0))

        return nnx.grad(loss)(layer)

    with_pad = grads(layer, x, words)
    without = grads(layer, x[1:], words[1:])
    for a, b in zip(jax.tree.leaves(with_pad), jax.tree.leaves(without), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    del params


def test_top_k_never_repeats_an_id():
    layer, layout = _layer_with_layout()
    x = jax.random.normal(jax.random.key(2), (2, 4), F32)
    _, ids = layer.top_k(x, 7)  # every word
    for row in np.asarray(ids):
        assert sorted(row.tolist()) == list(range(7))
    with pytest.raises(ValueError, match="k must be at most the number of words in the layout, 7"):
        layer.top_k(x, 8)
    params = bsj.h_softmax_init(jax.random.key(0), 4, 10)
    with pytest.raises(ValueError, match="k must be in"):
        bsj.h_softmax_top_k(x, params, 11, n_outputs=10)


def test_ids_beyond_int32_are_refused_with_x64_off():
    code = textwrap.dedent(
        """
        import numpy as np, blocksparse_jax as bsj
        from flax import nnx
        from blocksparse_jax.flax import HSoftmax
        table = np.ones((5, 2), np.float32)
        for bad in (np.array([2**32 + 1], np.int64), [2**40]):
            try:
                bsj.embedding_lookup(table, bad)
                print("embedding NO ERROR")
            except IndexError as e:
                print("embedding", str(e).split(" at ")[0])
        layout = bsj.frequency_classes(np.array([5, 3, 2, 1]), n_classes=2)
        print(np.asarray(layout.to_output(np.array([2**32 + 1, 1], np.int64))).tolist())
        layer = HSoftmax(2, layout=layout, rngs=nnx.Rngs(0))
        try:
            layer(np.ones((1, 2), np.float32), np.array([2**32 + 1], np.int64))
            print("layer NO ERROR")
        except IndexError as e:
            print("layer", str(e).split(" at ")[0])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    assert out[0] == "embedding ids holds 4294967297"
    assert out[1] == "embedding ids holds 1099511627776"
    assert out[2].startswith("[-1, ")  # beyond the vocabulary: no output
    assert out[3] == "layer target holds 4294967297"
