"""The adaptive softmax against the exact full softmax and the hierarchical softmax.

At 589,824 words (batch 256, width 128, float32) with Zipf-distributed targets
(``p(rank r) ~ 1 / r``) and three tail clusters whose cutoffs
``adaptive_softmax_cutoffs`` proposes from the Zipf counts (the cheapest ones,
and ones with 80% of the counts in the shortlist), the gradient (every weight
and the input ``x``) of

* ``adaptive_softmax_loss(x, params, target)``: the adaptive softmax, each tail
  cluster evaluated only for the examples whose target is in it;
* the same loss with every tail cluster evaluated for every example
  (``-mean(adaptive_log_softmax(x, params)[b, target[b]])``), to show what the
  bucketing saves;
* the exact full-softmax cross-entropy (``logits = x @ W + b``,
  ``mean(logsumexp(logits) - logits[target])``);
* ``h_softmax_loss(x, params, target, n_outputs=589_824)``, the two-level
  hierarchical softmax with its default 768 x 768 grid;

and, for decoding, the exact top 10 of ``adaptive_softmax_top_k``,
``h_softmax_top_k`` and ``lax.top_k`` of the full log-softmax (at
initialisation, where the models are least confident and the searches open the
most clusters or classes).

Every contender is ``jax.jit``-compiled ahead of time (compile time and XLA's
temp memory reported apart), warmed up, then timed in rounds that alternate
the contenders in a shuffled order, each call ending in ``block_until_ready``;
the figures are medians over the rounds and the ratios are taken against the
adaptive softmax (its gradient, or its top 10) measured in the same run.  Results are printed as a table and
written to ``bench_adaptive.json`` next to this file.

    python3 -m benchmarks.bench_adaptive [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._machine import machine_info
from benchmarks._timing import call, compile_stats, time_round_robin
from blocksparse_jax import (
    adaptive_log_softmax,
    adaptive_softmax_cutoffs,
    adaptive_softmax_init,
    adaptive_softmax_loss,
    adaptive_softmax_top_k,
    h_softmax_init,
    h_softmax_loss,
    h_softmax_top_k,
)

# name: (vocab, batch, width, n_clusters, shortlist_mass): the cheapest cutoffs, and
# cutoffs with 80% of the counts in the shortlist (as published models keep).
CASES = {
    "V589824_b256_w128": (589_824, 256, 128, 3, 0.0),
    "V589824_b256_w128_short80": (589_824, 256, 128, 3, 0.8),
}
QUICK = {"V8192_b256_w128": (8_192, 256, 128, 3, 0.0)}
TOP_K = 10
# Gradients of the loss, then the exact top-10 (decoding at initialisation).
CONTENDERS = (
    "adaptive",
    "adaptive_all_rows",
    "full",
    "hsoftmax",
    "adaptive_topk",
    "full_topk",
    "hsoftmax_topk",
)


def zipf_targets(vocab: int, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, targets)``: Zipf's law ``p(r) ~ 1 / r`` over the ranks and a sample of it."""
    counts = 1.0 / np.arange(1, vocab + 1)
    rng = np.random.default_rng(seed)
    return counts, rng.choice(vocab, size=batch, p=counts / counts.sum()).astype(np.int32)


def full_softmax_loss(W, b, x, target):
    """Exact cross-entropy over the whole vocabulary: ``(batch, vocab)`` logits."""
    logits = jnp.dot(x, W) + b[None, :]
    picked = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def run_case(name, vocab, batch, width, n_clusters, shortlist_mass, *, warmup, rounds, seed=0):
    counts, target_np = zipf_targets(vocab, batch, seed)
    layout = adaptive_softmax_cutoffs(
        counts, width, n_clusters=n_clusters, shortlist_mass=shortlist_mass
    )
    k_ad, k_hs, k_w, k_x = jax.random.split(jax.random.key(seed), 4)
    params = adaptive_softmax_init(k_ad, width, vocab, layout.cutoffs)
    hs_params = h_softmax_init(k_hs, width, vocab)
    W = jax.random.normal(k_w, (width, vocab), jnp.float32) / math.sqrt(width)
    b = jnp.zeros((vocab,), jnp.float32)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    target = jnp.asarray(target_np)
    per_cluster = np.bincount(
        np.searchsorted(layout.cutoffs, target_np, side="right"), minlength=n_clusters + 1
    )

    def adaptive(params, x, target):
        return jax.grad(lambda p, x: adaptive_softmax_loss(x, p, target), argnums=(0, 1))(params, x)

    def adaptive_all_rows(params, x, target):
        def loss(p, x):
            logp = adaptive_log_softmax(x, p)
            return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=1))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    def full(W, b, x, target):
        return jax.grad(full_softmax_loss, argnums=(0, 1, 2))(W, b, x, target)

    def hsoftmax(params, x, target):
        return jax.grad(lambda p, x: h_softmax_loss(x, p, target, n_outputs=vocab), argnums=(0, 1))(
            params, x
        )

    def adaptive_top_k(params, x):
        return adaptive_softmax_top_k(x, params, TOP_K)

    def full_top_k(W, b, x):
        return jax.lax.top_k(jax.nn.log_softmax(jnp.dot(x, W) + b[None, :], axis=1), TOP_K)

    def hsoftmax_top_k(params, x):
        return h_softmax_top_k(x, params, TOP_K, n_outputs=vocab)

    contenders = {
        "adaptive": (adaptive, (params, x, target)),
        "adaptive_all_rows": (adaptive_all_rows, (params, x, target)),
        "full": (full, (W, b, x, target)),
        "hsoftmax": (hsoftmax, (hs_params, x, target)),
        "adaptive_topk": (adaptive_top_k, (params, x)),
        "full_topk": (full_top_k, (W, b, x)),
        "hsoftmax_topk": (hsoftmax_top_k, (hs_params, x)),
    }
    losses = dict(
        adaptive=float(jax.jit(lambda p, x, t: adaptive_softmax_loss(x, p, t))(params, x, target)),
        full=float(jax.jit(full_softmax_loss)(W, b, x, target)),
        hsoftmax=float(
            jax.jit(lambda p, x, t: h_softmax_loss(x, p, t, n_outputs=vocab))(hs_params, x, target)
        ),
    )
    row = dict(
        case=name,
        vocab=vocab,
        batch=batch,
        width=width,
        dtype="float32",
        shortlist_mass=shortlist_mass,
        cutoffs=list(layout.cutoffs),
        cluster_sizes=list(params.cluster_sizes),
        cluster_widths=[int(p.shape[1]) for p in params.tail_proj],
        targets_per_cluster=[int(c) for c in per_cluster],
        hsoftmax_grid=list(hs_params.W2.shape[::2]),
        loss_at_init=losses,
    )
    runners = {}
    for label, (f, args) in contenders.items():
        jitted = jax.jit(f)
        stats = compile_stats(jitted, *args)
        row[f"{label}_compile_s"] = stats["compile_s"]
        row[f"{label}_temp_mb"] = (
            -1 if stats["temp_bytes"] is None else stats["temp_bytes"]
        ) / 2**20
        runners[label] = call(jitted, *args)
    times = time_round_robin(runners, warmup=warmup, repeats=rounds, seed=seed)
    for label, ts in times.items():
        row[f"{label}_ms"] = statistics.median(ts) * 1e3
        row[f"{label}_times_ms"] = [t * 1e3 for t in ts]
    for label in ("full", "hsoftmax", "adaptive_all_rows"):
        row[f"{label}_over_adaptive"] = row[f"{label}_ms"] / row["adaptive_ms"]
    for label in ("full_topk", "hsoftmax_topk"):
        row[f"{label}_over_adaptive"] = row[f"{label}_ms"] / row["adaptive_topk_ms"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_adaptive.json"))
    args = p.parse_args(argv)
    cases = QUICK if args.quick else CASES
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"float32; gradient of the loss w.r.t. every weight and x; medians of {args.rounds} "
        f"alternating rounds after {args.warmup} warm-up calls"
    )
    rows = []
    for name, config in cases.items():
        r = run_case(name, *config, warmup=args.warmup, rounds=args.rounds)
        rows.append(r)
        print(
            f"{name}: cutoffs {r['cutoffs']}, widths {r['cluster_widths']}, targets per "
            f"cluster (head first) {r['targets_per_cluster']}"
        )
        print(f"{'contender':20} {'ms':>9} {'x adaptive':>11} {'temp MB':>9} {'compile s':>10}")
        for label in CONTENDERS:
            ratio = 1.0 if label.startswith("adaptive") else r[f"{label}_over_adaptive"]
            ratio = r.get(f"{label}_over_adaptive", ratio)
            print(
                f"{label:20} {r[f'{label}_ms']:9.1f} {ratio:10.1f}x "
                f"{r[f'{label}_temp_mb']:9.1f} {r[f'{label}_compile_s']:10.2f}",
                flush=True,
            )
    result = dict(
        benchmark="adaptive_softmax_grad",
        machine=machine_info(),
        rounds=args.rounds,
        warmup=args.warmup,
        rows=rows,
    )
    if not args.quick:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
