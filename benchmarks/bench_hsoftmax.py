"""Hierarchical softmax vs the exact full softmax: one training step's gradient.

For each vocabulary, the gradient (all weights and the input ``x``) of

* ``h_softmax_loss(x, params, target, n_outputs=vocab)``, the two-level
  hierarchical softmax with ``n_classes = n_outputs_per_class ~ sqrt(vocab)``
  (the second level through ``sparse_block_dot`` for the targets' classes), and
* the exact full-softmax cross-entropy over the same vocabulary
  (``logits = x @ W + b``, ``mean(logsumexp(logits) - logits[target])``),

same batch, width and dtype (float32); one SGD training step of each, jitted
with the parameters donated as in a training loop (``h_softmax_sgd_step``,
which updates ``W2`` and ``b2`` sparsely in place, against the full softmax's
gradient and dense update); and, for decoding, the exact top-10 of
``h_softmax_top_k`` against ``lax.top_k`` of the full log-softmax (at
initialisation, where the hierarchical model is least confident and its search
visits the most classes).  All are ``jax.jit``-compiled ahead of
time (compile time reported apart), warmed up, then timed as the median of
``--repeats`` calls, each ending in ``block_until_ready``; the speedup is
full / hierarchical, measured in the same run.  Results are printed as a table
and written to ``bench_hsoftmax.json`` next to this file.

    python3 benchmarks/bench_hsoftmax.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax import h_softmax_init, h_softmax_loss, h_softmax_sgd_step, h_softmax_top_k

# name: (vocab, batch, width)
CASES = {
    "V65536_b512_w256": (65_536, 512, 256),
    "V600000_b256_w128": (600_000, 256, 128),
}
QUICK = {"V4096_b64_w32": (4_096, 64, 32)}
TOP_K = 10


def full_softmax_loss(W, b, x, target):
    """Exact cross-entropy over the whole vocabulary: ``(batch, vocab)`` logits."""
    logits = jnp.dot(x, W) + b[None, :]
    picked = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def make_case(vocab, batch, width, seed=0):
    key = jax.random.key(seed)
    k_hs, k_w, k_x, k_t = jax.random.split(key, 4)
    params = h_softmax_init(k_hs, width, vocab)
    W = jax.random.normal(k_w, (width, vocab), jnp.float32) / math.sqrt(width)
    b = jnp.zeros((vocab,), jnp.float32)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    target = jax.random.randint(k_t, (batch,), 0, vocab, jnp.int32)
    return params, (W, b), x, target


def compile_fn(f, args, *, donate_argnums=()):
    """``(compiled, compile_seconds, temp_bytes)`` of ``jax.jit(f, donate_argnums=...)`` for ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(f, donate_argnums=donate_argnums).lower(*args).compile()
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = int(mem.temp_size_in_bytes) if mem is not None else -1
    return compiled, secs, temp


LR = 0.01  # the SGD step size of the training-step rows


def time_step(step, state, rest, *, warmup, repeats):
    """``(median seconds, times, compile seconds, temp bytes)`` of ``state = step(state, *rest)``.

    ``step`` is jitted with ``state`` donated, as in a training loop: the
    parameters are updated in their own buffers, call after call.
    """
    compiled, secs, temp = compile_fn(step, (state, *rest), donate_argnums=0)
    state = jax.tree.map(jnp.copy, state)  # the caller's arrays stay valid
    for _ in range(warmup):
        state = jax.block_until_ready(compiled(state, *rest))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(state, *rest))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, secs, temp


def time_fn(fn, args, *, warmup, repeats):
    """Median seconds of ``fn(*args)`` after ``warmup`` calls (each ends in block_until_ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def run_case(name, vocab, batch, width, *, warmup, repeats):
    params, (W, b), x, target = make_case(vocab, batch, width)
    n_classes, _, per_class = params.W2.shape

    def hs_grad(params, x, target):
        return jax.grad(lambda p, x: h_softmax_loss(x, p, target, n_outputs=vocab), argnums=(0, 1))(
            params, x
        )

    def full_grad(W, b, x, target):
        return jax.grad(full_softmax_loss, argnums=(0, 1, 2))(W, b, x, target)

    # Sanity: the two losses are comparable (both ~log(vocab) at initialisation).
    hs_loss = float(
        jax.jit(lambda p, x, t: h_softmax_loss(x, p, t, n_outputs=vocab))(params, x, target)
    )
    full_loss = float(jax.jit(full_softmax_loss)(W, b, x, target))

    def hs_top_k(params, x):
        return h_softmax_top_k(x, params, TOP_K, n_outputs=vocab)

    def full_top_k(W, b, x):
        return jax.lax.top_k(jax.nn.log_softmax(jnp.dot(x, W) + b[None, :], axis=1), TOP_K)

    row = dict(
        case=name, vocab=vocab, batch=batch, width=width, dtype="float32",
        n_classes=n_classes, n_outputs_per_class=per_class,
        hs_loss_at_init=hs_loss, full_loss_at_init=full_loss,
    )  # fmt: skip
    for label, f, args in (
        ("hsoftmax", hs_grad, (params, x, target)),
        ("full", full_grad, (W, b, x, target)),
        ("hsoftmax_topk", hs_top_k, (params, x)),
        ("full_topk", full_top_k, (W, b, x)),
    ):
        compiled, csec, temp = compile_fn(f, args)
        med, times = time_fn(compiled, args, warmup=warmup, repeats=repeats)
        row[f"{label}_ms"] = med * 1e3
        row[f"{label}_times_ms"] = [t * 1e3 for t in times]
        row[f"{label}_compile_s"] = csec
        row[f"{label}_temp_mb"] = temp / 2**20
        del compiled

    # One SGD training step with the parameters donated: the h_softmax step updates
    # W2 and b2 sparsely in place (h_softmax_sgd_step); the full softmax step is its
    # gradient and the dense update.
    def hs_step(params, x, target):
        return h_softmax_sgd_step(x, params, target, LR, n_outputs=vocab)[1]

    def full_step(Wb, x, target):
        grads = jax.grad(full_softmax_loss, argnums=(0, 1))(*Wb, x, target)
        return jax.tree.map(lambda p, g: p - LR * g, Wb, grads)

    for label, step, state in (
        ("hsoftmax_step", hs_step, params),
        ("full_step", full_step, (W, b)),
    ):
        med, times, csec, temp = time_step(step, state, (x, target), warmup=warmup, repeats=repeats)
        row[f"{label}_ms"] = med * 1e3
        row[f"{label}_times_ms"] = [t * 1e3 for t in times]
        row[f"{label}_compile_s"] = csec
        row[f"{label}_temp_mb"] = temp / 2**20
    row["speedup"] = row["full_ms"] / row["hsoftmax_ms"]
    row["step_speedup"] = row["full_step_ms"] / row["hsoftmax_step_ms"]
    row["topk_speedup"] = row["full_topk_ms"] / row["hsoftmax_topk_ms"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_hsoftmax.json"))
    args = p.parse_args(argv)
    cases = QUICK if args.quick else CASES
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"float32; gradient of one training step; medians of {args.repeats} after "
        f"{args.warmup} warm-up calls"
    )
    header = (
        f"{'case':20} {'classes x slots':>15} {'h-softmax ms':>13} {'full ms':>10} "
        f"{'speedup':>8} {'compile s (hs/full)':>20} {'temp MB (hs/full)':>18} "
        f"{'top-10 ms (hs/full)':>20} {'speedup':>8} {'SGD step ms (hs/full)':>22} {'speedup':>8}"
    )
    print(header)
    rows = []
    for name, (vocab, batch, width) in cases.items():
        r = run_case(name, vocab, batch, width, warmup=args.warmup, repeats=args.repeats)
        rows.append(r)
        grid = f"{r['n_classes']} x {r['n_outputs_per_class']}"
        comp = f"{r['hsoftmax_compile_s']:.2f}/{r['full_compile_s']:.2f}"
        mem = f"{r['hsoftmax_temp_mb']:.0f}/{r['full_temp_mb']:.0f}"
        print(
            f"{name:20} {grid:>15} {r['hsoftmax_ms']:13.1f} {r['full_ms']:10.1f} "
            f"{r['speedup']:7.1f}x {comp:>20} {mem:>18} "
            f"{r['hsoftmax_topk_ms']:9.1f}/{r['full_topk_ms']:<10.1f} {r['topk_speedup']:7.1f}x "
            f"{r['hsoftmax_step_ms']:10.1f}/{r['full_step_ms']:<11.1f} {r['step_speedup']:7.1f}x",
            flush=True,
        )
    result = dict(
        benchmark="hsoftmax_grad_vs_full_softmax",
        jax=jax.__version__,
        platform=jax.devices()[0].platform,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        numpy=np.__version__,
        repeats=args.repeats,
        warmup=args.warmup,
        rows=rows,
    )
    if not args.quick:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
