"""``sparse_block_gemv`` against the naive gather + einsum, and the gemv problems.

Forward, and forward+backward (gradients of ``W`` and ``h``), of ours against
``jnp.einsum`` over ``W[input_idx[:, :, None], output_idx[:, None, :]]``
differentiated by JAX.  Each is ``jax.jit``-ed and called with every output
returned (``out``, or ``(out, dW, dh)``); the two are timed alternately and
reported as medians, with compile time and XLA's compiled temp memory apart and
the ratio naive / ours measured in the same run.

    python3 -m benchmarks.bench_gemv [--quick] [--regimes S2,S3]

The full suite over every strategy and baseline is ``python3 -m benchmarks.run``.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import call, compile_stats, time_round_robin
from blocksparse_jax import sparse_block_gemv

# (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size)
REGIMES = {
    "S1": (512, 1, 1000, 1, 1, 256, 1000),
    "S2": (256, 32, 32, 4, 4, 128, 128),
    "S3": (64, 8, 8, 2, 2, 512, 512),
    "S4": (1024, 256, 256, 8, 8, 16, 16),
}
# Scaled-down versions for --quick: the same structure, about 1/8 of the memory.
QUICK_REGIMES = {
    "S1": (128, 1, 250, 1, 1, 256, 250),
    "S2": (64, 16, 16, 4, 4, 64, 64),
    "S3": (16, 4, 4, 2, 2, 256, 256),
    "S4": (256, 64, 64, 8, 8, 16, 16),
}
MODES = ("fwd", "fwd+bwd")


def make_problem(shape, dtype=jnp.float32, seed=0):
    """Random ``(o, W, h, input_idx, output_idx, g)`` for a regime's shape tuple.

    ``g`` is the cotangent of the output for the backward pass.
    """
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    rng = np.random.default_rng(seed)
    W = jnp.asarray(rng.standard_normal((i_blocks, o_blocks, i_size, o_size)), dtype)
    h = jnp.asarray(rng.standard_normal((batch, i_win, i_size)), dtype)
    o = jnp.zeros((batch, o_win, o_size), dtype)
    ii = jnp.asarray(rng.integers(0, i_blocks, (batch, i_win)), jnp.int32)
    oi = jnp.asarray(rng.integers(0, o_blocks, (batch, o_win)), jnp.int32)
    g = jnp.asarray(rng.standard_normal(o.shape), dtype)
    return o, W, h, ii, oi, g


def naive_gemv(o, W, h, input_idx, output_idx):
    blocks = W[input_idx[:, :, None], output_idx[:, None, :]]  # (b, i, j, s, t)
    return o + jnp.einsum("bis,bijst->bjt", h, blocks)


def fwd_bwd(gemv):
    """``(out, dW, dh)``: the forward and the gradients of ``W`` and ``h`` for cotangent ``g``."""

    def f(o, W, h, ii, oi, g):
        out, vjp = jax.vjp(lambda W, h: gemv(o, W, h, ii, oi), W, h)
        dW, dh = vjp(g)
        return out, dW, dh

    return f


def fwd_only(gemv):
    """``out``: the forward alone (``g`` unused, so both modes take the same arguments)."""

    def f(o, W, h, ii, oi, g):
        del g
        return gemv(o, W, h, ii, oi)

    return f


def jitted(gemv, mode):
    """``jax.jit`` of ``gemv``'s forward (``mode="fwd"``) or forward+backward."""
    return jax.jit((fwd_only if mode == "fwd" else fwd_bwd)(gemv))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="scaled-down shapes, fewer repeats")
    p.add_argument("--regimes", default=",".join(REGIMES))
    args = p.parse_args(argv)
    repeats = 3 if args.quick else 10
    table = QUICK_REGIMES if args.quick else REGIMES
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; medians of {repeats}")
    print(
        f"{'regime':6} {'pass':8} {'ours ms':>9} {'naive ms':>9} {'speedup':>8} "
        f"{'ours temp MB':>13} {'naive temp MB':>14} {'temp ratio':>10} {'compile s (ours/naive)':>23}"
    )
    for name in args.regimes.split(","):
        problem = make_problem(table[name])
        for mode in MODES:
            fns = {"ours": jitted(sparse_block_gemv, mode), "naive": jitted(naive_gemv, mode)}
            stats = {k: compile_stats(fn, *problem) for k, fn in fns.items()}
            times = time_round_robin(
                {k: call(fn, *problem) for k, fn in fns.items()}, warmup=2, repeats=repeats
            )
            ours, naive = (statistics.median(times[k]) for k in ("ours", "naive"))
            to, tn = stats["ours"]["temp_bytes"], stats["naive"]["temp_bytes"]
            print(
                f"{name:6} {mode:8} {ours * 1e3:9.2f} {naive * 1e3:9.2f} {naive / ours:7.2f}x "
                f"{to / 2**20:13.1f} {tn / 2**20:14.1f} {to / max(tn, 1):10.3f} "
                f"{stats['ours']['compile_s']:11.2f}/{stats['naive']['compile_s']:<11.2f}"
            )


if __name__ == "__main__":
    main()
