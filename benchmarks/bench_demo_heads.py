"""Every output head on the demo's corpus: step time, memory and validation perplexity.

Builds the demo's corpus, vocabulary and model exactly as ``python3 -m
blocksparse_jax demo`` does at its default sizes and trains one model per
output head (``--output``: ``naive``, ``full``, ``filtered``, ``sampled``,
``hsoftmax``, ``adaptive``) with the demo's own training step
(``blocksparse_jax.demo._train.make_train_step``: ``value_and_sparse_grad``
and ``lazy(optax.adam)``, parameters and optimizer state donated, the same
batches for every head).  The heads are trained side by side: step ``i`` of
every head runs before step ``i + 1`` of any, in a new random order each
step, so that the load of the shared machine hits them alike.  After
``--steps`` steps each model is evaluated on the demo's validation sample
with its exact log-likelihood (the sampled head with the exact softmax).

Reported per head: the median step time (the first steps, which compile,
left out) and tokens/s; the step's memory from XLA's compiled memory analysis
(``temp``: its scratch; ``peak``: arguments plus scratch, the parameters and
optimizer state it updates in place included); the validation perplexity.

Then the gradient filter on the trained exact model (the demo's "peaked
distribution"): on 256 validation examples, for several ``filter_eps``, by the
library's rule and by Cut Cross-Entropy's, the share of the chunks (of the
default width for a batch of 256) kept, the probability left out and the gradient's error against the
exact one (``bench_heads.filter_analysis``).

    python3 -m benchmarks.bench_demo_heads [--steps N] [--text PATH]

Results go to ``bench_demo_heads.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time

import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._machine import machine_info
from benchmarks.bench_heads import FILTER_EPS, filter_analysis, print_filter
from blocksparse_jax.demo import _cli, _corpus, _model, _run, _train
from blocksparse_jax.full import _core

HERE = os.path.dirname(os.path.abspath(__file__))
HEADS = ("naive", "full", "filtered", "sampled", "hsoftmax", "adaptive")
# Steps left out of the step time: the first compiles, the next ones settle.
SKIP_STEPS = 3


def _memory(step_fn, params, opt_state, tokens) -> dict:
    mem = step_fn.lower(params, opt_state, tokens, jnp.int32(0)).compile().memory_analysis()
    return {
        "temp_mb": mem.temp_size_in_bytes / 2**20,
        "peak_mb": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20,
    }


def filter_on_trained(params, val: _run._ValSample, n: int = 256) -> dict:
    """The gradient filter on the trained exact model: :func:`benchmarks.bench_heads.filter_analysis`."""
    x = _model.features(params, jnp.asarray(val.x[:n]))
    t = jnp.asarray(val.y[:n])
    chunk = _core.chunk_size(n, params.out.W.shape[1])
    return {
        f"{eps:g}": filter_analysis(x, params.out.W, params.out.b, t, eps, chunk)
        for eps in FILTER_EPS
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="the demo's --text (default: the standard library)")
    p.add_argument("--steps", type=int, default=_cli.DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=_cli.DEFAULTS["batch_size"])
    p.add_argument("--heads", default=",".join(HEADS))
    p.add_argument("--out", default=os.path.join(HERE, "bench_demo_heads.json"))
    args = p.parse_args(argv)
    heads = args.heads.split(",")

    corpus = _corpus.load_corpus(args.text, vocab_size=None)
    val = _run._validation_sample(corpus, np.random.default_rng(_run.EVAL_SEED))
    tokens = jnp.asarray(corpus.train)
    run_args = argparse.Namespace(seed=_cli.DEFAULTS["seed"], no_baseline=True, output="hsoftmax")
    models = _run._build_models(run_args, corpus, optax)
    layouts = dict(models.layouts, adaptive=_model.adaptive_layout(corpus.counts, _cli.HIDDEN))
    outputs = dict(models.outputs, adaptive=_model.Output.adaptive(layouts["adaptive"]))
    tx = models.optimizer
    state, step_fns, rows = {}, {}, {}
    for kind in heads:
        params = _model.init_params(models.key_init, models.cfg, kind, layouts[kind])
        opt_state = tx.init(params)
        step_fns[kind] = _train.make_train_step(
            tx,
            outputs[kind],
            context=_cli.CONTEXT,
            batch_size=args.batch_size,
            key=models.key_data,
        )
        rows[kind] = _memory(step_fns[kind], params, opt_state, tokens)
        state[kind] = [params, opt_state]

    info = machine_info()
    print(
        f"{info['cpu']}, {info['cores']} cores; jax {info['jax']}; vocabulary "
        f"{corpus.vocab_size:,}, batch {args.batch_size}, {args.steps} steps per head, "
        f"heads alternated step by step",
        flush=True,
    )
    load_start = os.getloadavg()
    times = {kind: [] for kind in heads}
    losses = {kind: [] for kind in heads}
    order = list(heads)
    rng = random.Random(0)
    for i in range(args.steps):
        rng.shuffle(order)
        for kind in order:
            t0 = time.perf_counter()
            out = step_fns[kind](*state[kind], tokens, jnp.int32(i))
            loss = float(out[2])  # waits for the step
            times[kind].append(time.perf_counter() - t0)
            state[kind] = [out[0], out[1]]
            losses[kind].append(loss)
    for kind in heads:
        evaluate = _train.make_evaluator(outputs[kind], val.x, val.y, val.chunk)
        med = statistics.median(times[kind][SKIP_STEPS:])
        rows[kind].update(
            step_ms=med * 1e3,
            tokens_per_s=args.batch_size / med,
            val_ppl=math.exp(evaluate(state[kind][0])),
            final_train_loss=float(np.mean(losses[kind][-20:])),
        )
    base = rows["full"]["step_ms"] if "full" in rows else None
    print(f"{'head':10}{'step ms':>9}{'x full':>8}{'temp MB':>9}{'peak MB':>9}{'val ppl':>9}")
    for kind, r in rows.items():
        r["full_over"] = base / r["step_ms"] if base else None
        speed = f"{r['full_over']:7.1f}x" if base else f"{'-':>8}"
        print(
            f"{kind:10}{r['step_ms']:9.2f}{speed}{r['temp_mb']:9.1f}{r['peak_mb']:9.1f}"
            f"{r['val_ppl']:9.1f}"
        )
    filt = None
    if "full" in heads:
        print("the gradient filter on the trained exact model (256 validation examples):")
        filt = filter_on_trained(state["full"][0], val)
        for eps, r in filt.items():
            print_filter(eps, r)
    result = {
        "benchmark": "demo_heads",
        "machine": info,
        "vocab_size": corpus.vocab_size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "model": {"context": _cli.CONTEXT, "embed": _cli.EMBED, "hidden": _cli.HIDDEN},
        "optimizer": f"lazy(adam({_cli.LEARNING_RATE}))",
        "heads": {
            "filtered": {
                "filter_eps": _model.FILTER_EPS,
                "chunk": _core.chunk_size(args.batch_size, corpus.vocab_size),
            },
            "sampled": {"n_sampled": _model.N_SAMPLED, "sampler": "unigram (training counts)"},
            "adaptive": {"cutoffs": list(layouts["adaptive"].cutoffs)},
            "hsoftmax": {
                "n_classes": models.layout.n_classes,
                "n_outputs_per_class": models.layout.n_outputs_per_class,
            },
        },
        "val_ppl_unigram": val.unigram_ppl,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "rows": rows,
        "filter_on_trained_full": filt,
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
