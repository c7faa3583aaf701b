"""First benchmark: ``sparse_block_gemv`` against the naive gather + einsum.

Forward, and forward+backward (gradients of ``W`` and ``h``), of ours against
``jnp.einsum`` over ``W[input_idx[:, :, None], output_idx[:, None, :]]``
differentiated by JAX.  Reports median steady-state times (after warm-up, every
call ending in ``block_until_ready``), compile time apart, and XLA's compiled
temp memory (``jax.jit(f).lower(...).compile().memory_analysis()``), with the
ratios naive / ours measured in the same run.

    python3 benchmarks/bench_gemv.py [--quick] [--regimes S2,S3]

The full suite over every strategy is ``python3 benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import sparse_block_gemv

# (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size), as in issue 4.
REGIMES = {
    "S1": (512, 1, 1000, 1, 1, 256, 1000),
    "S2": (256, 32, 32, 4, 4, 128, 128),
    "S3": (64, 8, 8, 2, 2, 512, 512),
    "S4": (1024, 256, 256, 8, 8, 16, 16),
}


def make_problem(shape, dtype=jnp.float32, seed=0):
    """Random ``(o, W, h, input_idx, output_idx)`` for a regime's shape tuple."""
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    rng = np.random.default_rng(seed)
    W = jnp.asarray(rng.standard_normal((i_blocks, o_blocks, i_size, o_size)), dtype)
    h = jnp.asarray(rng.standard_normal((batch, i_win, i_size)), dtype)
    o = jnp.zeros((batch, o_win, o_size), dtype)
    ii = jnp.asarray(rng.integers(0, i_blocks, (batch, i_win)), jnp.int32)
    oi = jnp.asarray(rng.integers(0, o_blocks, (batch, o_win)), jnp.int32)
    return o, W, h, ii, oi


def naive_gemv(o, W, h, input_idx, output_idx):
    blocks = W[input_idx[:, :, None], output_idx[:, None, :]]  # (b, i, j, s, t)
    return o + jnp.einsum("bis,bijst->bjt", h, blocks)


def fwd_bwd(gemv):
    """``(out, dW, dh)`` of ``sum(out * g)``: the forward and the gradients of W and h."""

    def f(o, W, h, ii, oi, g):
        out, vjp = jax.vjp(lambda W, h: gemv(o, W, h, ii, oi), W, h)
        dW, dh = vjp(g)
        return out, dW, dh

    return f


def fwd_only(gemv):
    def f(o, W, h, ii, oi, g):
        del g
        return gemv(o, W, h, ii, oi)

    return f


def compile_fn(f, args):
    """``(compiled, compile_seconds, temp_bytes)`` of ``jax.jit(f)`` for ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(*args).compile()
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else -1
    return compiled, secs, temp


def time_fn(fn, args, *, warmup=2, repeats=10, min_time=0.0):
    """Median seconds of ``fn(*args)`` after ``warmup`` calls (each ends in block_until_ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times), times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--regimes", default=",".join(REGIMES))
    args = p.parse_args(argv)
    repeats = 3 if args.quick else 10
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; medians of {repeats}")
    header = (
        f"{'regime':6} {'pass':8} {'ours ms':>9} {'naive ms':>9} {'speedup':>8} "
        f"{'ours temp MB':>13} {'naive temp MB':>14} {'temp ratio':>10} {'compile s (ours/naive)':>23}"
    )
    print(header)
    for name in args.regimes.split(","):
        shape = REGIMES[name]
        o, W, h, ii, oi = make_problem(shape)
        g = jnp.ones_like(o)
        call = (o, W, h, ii, oi, g)
        for label, wrap in (("fwd", fwd_only), ("fwd+bwd", fwd_bwd)):
            res = {}
            for impl, gemv in (("ours", sparse_block_gemv), ("naive", naive_gemv)):
                fn, csec, temp = compile_fn(wrap(gemv), call)
                med, _ = time_fn(fn, call, repeats=repeats)
                res[impl] = (med, temp, csec)
            (mo, to, co), (mn, tn, cn) = res["ours"], res["naive"]
            print(
                f"{name:6} {label:8} {mo * 1e3:9.2f} {mn * 1e3:9.2f} {mn / mo:7.2f}x "
                f"{to / 2**20:13.1f} {tn / 2**20:14.1f} {to / max(tn, 1):10.3f} "
                f"{co:11.2f}/{cn:<11.2f}"
            )


if __name__ == "__main__":
    main()
