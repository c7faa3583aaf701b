"""Hierarchical softmax against the exact full softmax: gradient, SGD step, top-10.

For each vocabulary, same batch, width and dtype (float32), three pairs of
contenders, each ``jax.jit``-ed as a user calls it and returning every output:

* gradient: ``jax.jit(jax.grad(h_softmax_loss, argnums=(0, 1)),
  static_argnames="n_outputs")(x, params, target, n_outputs=vocab)`` -> ``(dx,
  dparams)``, the two-level hierarchical softmax with ``n_classes =
  n_outputs_per_class ~ sqrt(vocab)`` (its second level a ``sparse_block_dot``),
  against ``jax.grad`` of the exact full-softmax cross-entropy
  (``logits = x @ W + b``, ``mean(logsumexp(logits) - logits[target])``) with
  respect to ``W``, ``b`` and ``x``;
* SGD step, exactly as documented: ``step = jax.jit(h_softmax_sgd_step,
  static_argnames="n_outputs", donate_argnums=1)``, ``loss, params, dx =
  step(x, params, target, lr, n_outputs=vocab)`` with ``params`` fed back into
  the next call (``W2`` and ``b2`` updated sparsely in their donated buffers),
  against :func:`full_softmax_sgd_step`, the dense step with the same signature,
  outputs and donation;
* decoding: the exact top-10 of ``h_softmax_top_k`` against ``lax.top_k`` of the
  full log-softmax (at initialisation, where the hierarchical model is least
  confident and its search visits the most classes).

All six are compiled ahead of time for compile time and XLA temp memory, warmed
up, then timed alternately (``--repeats`` rounds, each call ending in
``block_until_ready``); medians, with speedups full / hierarchical from the
same run.  Printed as a table and written to ``bench_hsoftmax.json`` next to
this file.

    python3 -m benchmarks.bench_hsoftmax [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from benchmarks._machine import machine_info
from benchmarks._timing import call, compile_stats, time_round_robin, training_loop
from blocksparse_jax import h_softmax_init, h_softmax_loss, h_softmax_sgd_step, h_softmax_top_k

# name: (vocab, batch, width)
CASES = {
    "V65536_b512_w256": (65_536, 512, 256),
    "V600000_b256_w128": (600_000, 256, 128),
}
QUICK = {"V4096_b64_w32": (4_096, 64, 32)}
TOP_K = 10
LR = 0.01  # the SGD step size

# The call each contender makes (recorded in the JSON): label -> call form.
CALL_FORMS = {
    "hsoftmax": "jax.jit(jax.grad(h_softmax_loss, argnums=(0, 1)), static_argnames='n_outputs')"
    "(x, params, target, n_outputs=V) -> (dx, dparams)",
    "full": "jax.jit(jax.grad(full_softmax_loss, argnums=(0, 1, 2)))(W, b, x, target) "
    "-> (dW, db, dx)",
    "hsoftmax_step": "step = jax.jit(h_softmax_sgd_step, static_argnames='n_outputs', "
    "donate_argnums=1); loss, params, dx = step(x, params, target, lr, n_outputs=V)",
    "full_step": "step = jax.jit(full_softmax_sgd_step, donate_argnums=1); "
    "loss, (W, b), dx = step(x, (W, b), target, lr)",
    "hsoftmax_topk": "jax.jit(h_softmax_top_k, static_argnames=('k', 'n_outputs'))"
    "(x, params, 10, n_outputs=V) -> (log_probs, ids)",
    "full_topk": "jax.jit(full_softmax_top_k, static_argnames='k')(W, b, x, 10) "
    "-> (log_probs, ids)",
}


def full_softmax_loss(W, b, x, target):
    """Exact cross-entropy over the whole vocabulary: ``(batch, vocab)`` logits."""
    logits = jnp.dot(x, W) + b[None, :]
    picked = jnp.take_along_axis(logits, target[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def full_softmax_sgd_step(x, Wb, target, learning_rate):
    """The full softmax's SGD step, shaped like ``h_softmax_sgd_step``: ``(loss, Wb, dx)``."""
    loss, (dW, db, dx) = jax.value_and_grad(full_softmax_loss, argnums=(0, 1, 2))(*Wb, x, target)
    W, b = Wb
    return loss, (W - learning_rate * dW, b - learning_rate * db), dx


def full_softmax_top_k(W, b, x, k):
    """The exact top-``k`` of the full log-softmax: ``(log_probs, ids)``, each ``(batch, k)``."""
    return jax.lax.top_k(jax.nn.log_softmax(jnp.dot(x, W) + b[None, :], axis=1), k)


def make_case(vocab, batch, width, seed=0):
    k_hs, k_w, k_x, k_t = jax.random.split(jax.random.key(seed), 4)
    params = h_softmax_init(k_hs, width, vocab)
    W = jax.random.normal(k_w, (width, vocab), jnp.float32) / math.sqrt(width)
    b = jnp.zeros((vocab,), jnp.float32)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    target = jax.random.randint(k_t, (batch,), 0, vocab, jnp.int32)
    return params, (W, b), x, target


class Contender(NamedTuple):
    """One call of :data:`CALL_FORMS`: ``fn(*args, **kwargs)``, ``fn`` jitted as documented."""

    fn: Callable
    args: tuple
    kwargs: dict
    is_step: bool = False  # a training step: its output 1 (params) is fed back as argument 1

    def runner(self):
        if self.is_step:
            return training_loop(self.fn, *self.args, state_argnum=1, state_out=1, **self.kwargs)
        return call(self.fn, *self.args, **self.kwargs)


def contenders(vocab, params, Wb, x, target) -> dict[str, Contender]:
    """The six contenders of one case, by the labels of :data:`CALL_FORMS`."""
    W, b = Wb
    hs = {"n_outputs": vocab}
    hs_grad = jax.jit(jax.grad(h_softmax_loss, argnums=(0, 1)), static_argnames="n_outputs")
    hs_step = jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)
    hs_top_k = jax.jit(h_softmax_top_k, static_argnames=("k", "n_outputs"))
    return {
        "hsoftmax": Contender(hs_grad, (x, params, target), hs),
        "full": Contender(
            jax.jit(jax.grad(full_softmax_loss, argnums=(0, 1, 2))), Wb + (x, target), {}
        ),
        "hsoftmax_step": Contender(hs_step, (x, params, target, LR), hs, is_step=True),
        "full_step": Contender(
            jax.jit(full_softmax_sgd_step, donate_argnums=1), (x, Wb, target, LR), {}, is_step=True
        ),
        "hsoftmax_topk": Contender(hs_top_k, (x, params, TOP_K), hs),
        "full_topk": Contender(
            jax.jit(full_softmax_top_k, static_argnames="k"), (W, b, x, TOP_K), {}
        ),
    }


def run_case(name, vocab, batch, width, *, warmup, repeats):
    """One case's row: per contender median ms, timed calls, compile s and temp MB."""
    params, Wb, x, target = make_case(vocab, batch, width)
    n_classes, _, per_class = params.W2.shape
    row = dict(
        case=name,
        vocab=vocab,
        batch=batch,
        width=width,
        dtype="float32",
        n_classes=n_classes,
        n_outputs_per_class=per_class,
        # Sanity: the two losses are comparable (both ~log(vocab) at initialisation).
        hs_loss_at_init=float(h_softmax_loss(x, params, target, n_outputs=vocab)),
        full_loss_at_init=float(full_softmax_loss(*Wb, x, target)),
    )
    runners = {}
    for label, c in contenders(vocab, params, Wb, x, target).items():
        stats = compile_stats(c.fn, *c.args, **c.kwargs)
        row[f"{label}_compile_s"] = stats["compile_s"]
        row[f"{label}_temp_mb"] = stats["temp_bytes"] / 2**20
        runners[label] = c.runner()
    times = time_round_robin(runners, warmup=warmup, repeats=repeats)
    for label, ts in times.items():
        row[f"{label}_ms"] = statistics.median(ts) * 1e3
        row[f"{label}_times_ms"] = [t * 1e3 for t in ts]
    row["speedup"] = row["full_ms"] / row["hsoftmax_ms"]
    row["step_speedup"] = row["full_step_ms"] / row["hsoftmax_step_ms"]
    row["topk_speedup"] = row["full_topk_ms"] / row["hsoftmax_topk_ms"]
    return row


def print_row(r):
    pairs = [("", "speedup"), ("_topk", "topk_speedup"), ("_step", "step_speedup")]
    cells = " ".join(
        format(f"{r[f'hsoftmax{s}_ms']:.1f}/{r[f'full{s}_ms']:.1f} ({r[k]:.1f}x)", ">27")
        for s, k in pairs
    )
    print(
        f"{r['case']:20} {r['n_classes']:>6} x {r['n_outputs_per_class']:<6} {cells} "
        f"{r['hsoftmax_compile_s']:>6.2f}/{r['full_compile_s']:<6.2f} "
        f"{r['hsoftmax_temp_mb']:>7.0f}/{r['full_temp_mb']:<7.0f}",
        flush=True,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small case (a smoke test)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_hsoftmax.json"))
    args = p.parse_args(argv)
    info = machine_info()
    print(
        f"{info['cpu']}, {info['cores']} cores; jax {info['jax']} ({info['backend']}); float32; "
        f"medians of {args.repeats} alternated rounds after {args.warmup} warm-up calls; "
        "ms h_softmax / full softmax"
    )
    print(
        f"{'case':20} {'classes x slots':15} {'gradient':>27} {'top-10':>27} {'SGD step':>27} "
        f"{'grad compile s':>13} {'grad temp MB':>15}"
    )
    rows = []
    for name, (vocab, batch, width) in (QUICK if args.quick else CASES).items():
        rows.append(run_case(name, vocab, batch, width, warmup=args.warmup, repeats=args.repeats))
        print_row(rows[-1])
    result = dict(
        benchmark="hsoftmax_vs_full_softmax",
        machine=info,
        call_forms=CALL_FORMS,
        learning_rate=LR,
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
