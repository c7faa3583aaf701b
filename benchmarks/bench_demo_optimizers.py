"""The demo's training step: lazy Adam (sparse gradients) against dense Adam, side by side.

Builds the demo's corpus, vocabulary, h_softmax layout and models exactly as
``python3 -m blocksparse_jax demo`` does at its default sizes, and times the
demo's own training step (``blocksparse_jax.demo._train.make_train_step``:
jitted, parameters and optimizer state donated, batches drawn on the device)
in four forms, alternated in one process:

* ``hsoftmax lazy``: the demo's step: ``value_and_sparse_grad`` and
  ``lazy(optax.adam)`` (embeddings, ``W2`` and ``b2`` updated on the touched
  blocks only);
* ``hsoftmax dense``: the same model with ``jax.value_and_grad`` and ``optax.adam``;
* ``full lazy``: the demo's baseline (exact softmax; lazy embeddings, dense ``W``, ``b``);
* ``full dense``: the baseline with ``jax.value_and_grad`` and ``optax.adam``.

Each timed call is one step that carries its state, as the demo's loop does,
and ends in ``block_until_ready`` on every output.  Tokens/s is the batch size
over the median step time.

Run::

    python3 -m benchmarks.bench_demo_optimizers [--repeats N] [--text PATH]

Results go to ``bench_demo_optimizers.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax.numpy as jnp
import optax

from benchmarks._machine import machine_info
from benchmarks._timing import compile_stats, time_round_robin
from blocksparse_jax.demo import _cli, _corpus, _model, _run, _train
from blocksparse_jax.optim import lazy

HERE = os.path.dirname(os.path.abspath(__file__))


def _runner(step_fn, params, opt_state, tokens):
    """One training step per call, carrying params, optimizer state and the step count."""
    state = {"params": params, "opt_state": opt_state, "step": 0, "touched": []}

    def run():
        out = step_fn(state["params"], state["opt_state"], tokens, jnp.int32(state["step"]))
        state["params"], state["opt_state"] = out[0], out[1]
        state["step"] += 1
        state["touched"].append(out[3])
        return out

    return run, state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="the demo's --text (default: the standard library)")
    p.add_argument("--batch-size", type=int, default=_cli.DEFAULTS["batch_size"])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "bench_demo_optimizers.json"))
    args = p.parse_args(argv)

    corpus = _corpus.load_corpus(args.text, vocab_size=None)
    run_args = argparse.Namespace(seed=_cli.DEFAULTS["seed"], no_baseline=False, output="hsoftmax")
    models = _run._build_models(run_args, corpus, optax)
    tokens = jnp.asarray(corpus.train)
    dense_adam = optax.adam(_cli.LEARNING_RATE)
    lazy_adam = lazy(optax.adam(_cli.LEARNING_RATE))
    forms = {
        "hsoftmax lazy": ("hsoftmax", lazy_adam, True),
        "hsoftmax dense": ("hsoftmax", dense_adam, False),
        "full lazy": ("full", lazy_adam, True),
        "full dense": ("full", dense_adam, False),
    }
    runners, states, compiled = {}, {}, {}
    for name, (kind, tx, sparse) in forms.items():
        params = _model.init_params(models.key_init, models.cfg, kind, models.layout)
        opt_state = tx.init(params)
        step_fn = _train.make_train_step(
            tx,
            models.outputs[kind],
            context=_cli.CONTEXT,
            batch_size=args.batch_size,
            key=models.key_data,
            sparse=sparse,
        )
        stats = compile_stats(step_fn, params, opt_state, tokens, jnp.int32(0))
        compiled[name] = {k: v for k, v in stats.items() if k != "compiled"}  # JSON-able
        runners[name], states[name] = _runner(step_fn, params, opt_state, tokens)

    info = machine_info()
    print(
        f"{info['cpu']}, {info['cores']} cores; jax {info['jax']} ({info['backend']}); "
        f"vocabulary {corpus.vocab_size:,}, {models.layout.n_classes} classes x "
        f"{models.layout.n_outputs_per_class} slots, batch {args.batch_size}; medians of "
        f"{args.repeats} alternated steps after {args.warmup} warm-up steps"
    )
    times = time_round_robin(runners, warmup=args.warmup, repeats=args.repeats)
    rows = {}
    for name in forms:
        med = statistics.median(times[name])
        touched = {}
        for t in states[name]["touched"]:
            for k, v in t.items():
                touched[k] = touched.get(k, 0.0) + float(v) / len(states[name]["touched"])
        rows[name] = {
            "median_step_ms": med * 1e3,
            "tokens_per_s": args.batch_size / med,
            "touched": touched,
            **compiled[name],
        }
    base = rows["hsoftmax dense"]["tokens_per_s"]
    full = rows["full lazy"]["tokens_per_s"]
    print(f"{'step':16}{'ms':>9}{'tokens/s':>11}{'vs hs dense':>13}{'vs full lazy':>14}  touched")
    for name, r in rows.items():
        t = ", ".join(f"{k} {v:.1%}" for k, v in r["touched"].items()) or "-"
        print(
            f"{name:16}{r['median_step_ms']:9.2f}{r['tokens_per_s']:11,.0f}"
            f"{r['tokens_per_s'] / base:12.2f}x{r['tokens_per_s'] / full:13.2f}x  {t}"
        )
    result = {
        "benchmark": "demo_optimizers",
        "machine": info,
        "vocab_size": corpus.vocab_size,
        "n_classes": models.layout.n_classes,
        "n_outputs_per_class": models.layout.n_outputs_per_class,
        "batch_size": args.batch_size,
        "model": {"context": _cli.CONTEXT, "embed": _cli.EMBED, "hidden": _cli.HIDDEN},
        "learning_rate": _cli.LEARNING_RATE,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rows": rows,
        "ratios": {
            "hsoftmax_lazy_over_hsoftmax_dense": rows["hsoftmax lazy"]["tokens_per_s"] / base,
            "hsoftmax_lazy_over_full_lazy": rows["hsoftmax lazy"]["tokens_per_s"] / full,
            "full_lazy_over_full_dense": full / rows["full dense"]["tokens_per_s"],
        },
        "goals": {
            "hsoftmax_lazy_over_hsoftmax_dense": 2.0,
            "hsoftmax_lazy_over_full_lazy (demo metrics.json speedup)": 15.0,
        },
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
