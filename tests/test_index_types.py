"""Index arrays of every kind: NumPy, lists, Python ints, 0-d, bool, huge values, x64 off.

With ``jax_enable_x64`` off JAX stores integers in 32 bits; an index that does
not fit must raise ``IndexError`` naming the argument, never be wrapped into a
real block.  The suite runs with x64 on, so that case runs in a subprocess.
"""

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import blocksparse_jax as bsj

W = np.arange(3 * 4 * 2 * 2, dtype=np.float64).reshape(3, 4, 2, 2)
H = np.ones((2, 1, 2))
OUT = np.zeros((2, 1, 2))


def test_x64_off_wide_indices_raise_instead_of_wrapping():
    code = textwrap.dedent(
        """
        import numpy as np, blocksparse_jax as bsj
        W = np.ones((3, 4, 2, 2), np.float32); h = np.ones((2, 1, 2), np.float32)
        o = np.zeros((2, 1, 2), np.float32)
        ok = np.array([[0], [1]], np.int64)
        print(bsj.sparse_block_gemv(o, W, h, ok, ok).dtype)  # in range: fine
        for name, bad in [("int64", np.array([[2**32], [1]], np.int64)),
                          ("uint64", np.array([[2**32 + 1], [1]], np.uint64)),
                          ("pyint", [[2**40], [1]])]:
            for pos in ("input_idx", "output_idx"):
                args = (bad, ok) if pos == "input_idx" else (ok, bad)
                try:
                    bsj.sparse_block_gemv(o, W, h, *args)
                    print(name, pos, "NO ERROR")
                except IndexError as e:
                    print(name, pos, "IndexError", str(e).split(" at ")[0])
        try:
            bsj.sparse_block_outer(np.ones((3, 4, 2, 2), np.float32), h, h, ok, [[2**33], [0]])
        except IndexError as e:
            print("outer", str(e).split(" at ")[0])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    ).stdout.splitlines()
    assert out[0] == "float32"
    assert out[1:] == [
        "int64 input_idx IndexError input_idx holds 4294967296",
        "int64 output_idx IndexError output_idx holds 4294967296",
        "uint64 input_idx IndexError input_idx holds 4294967297",
        "uint64 output_idx IndexError output_idx holds 4294967297",
        "pyint input_idx IndexError input_idx holds 1099511627776",
        "pyint output_idx IndexError output_idx holds 1099511627776",
        "outer y_idx holds 8589934592",
    ]


def test_python_int_beyond_64_bits_names_the_argument():
    with pytest.raises(IndexError, match="input_idx holds 1267650600228229401496703205376"):
        bsj.sparse_block_gemv(OUT, W, H, [[2**100], [0]], [[0], [1]])


@pytest.mark.parametrize(
    "ii",
    [
        [[1], [2]],  # nested lists
        np.array([[1], [2]], np.uint8),
        np.array([[1], [2]], np.int64),
        jnp.array([[1], [2]], jnp.int16),
        np.array([[-2], [-1]]),  # from the end
    ],
)
def test_index_array_kinds_agree(ii):
    want = bsj.sparse_block_gemv(OUT, W, H, np.array([[1], [2]]), np.array([[0], [3]]))
    np.testing.assert_array_equal(bsj.sparse_block_gemv(OUT, W, H, ii, [[0], [3]]), want)


def test_zero_d_and_bool_indices_are_refused_with_the_argument_name():
    with pytest.raises(ValueError, match="input_idx must have shape"):
        bsj.sparse_block_gemv(OUT, W, H, 1, [[0], [1]])
    with pytest.raises(TypeError, match="output_idx must be an array of integer block indices"):
        bsj.sparse_block_gemv(OUT, W, H, [[0], [1]], np.array([[True], [False]]))
    with pytest.raises(TypeError, match="input_idx must be an array of integer block indices"):
        bsj.sparse_block_gemv(OUT, W, H, [[0.0], [1.0]], [[0], [1]])


def test_none_for_an_array_names_the_argument():
    with pytest.raises(TypeError, match="W must be an array; got NoneType"):
        bsj.sparse_block_gemv(OUT, None, H, [[0], [1]], [[0], [1]])
    with pytest.raises(TypeError, match="input_idx must be an array of integer block indices"):
        bsj.sparse_block_gemv(OUT, W, H, None, [[0], [1]])
