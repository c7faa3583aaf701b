"""Every strategy against the naive gather + einsum on a GPU or TPU, in one short run.

    python3 -m benchmarks.device [--out benchmarks/results] [--repeats 10] [--budget-s 270]

On a machine whose default JAX backend is a GPU or a TPU it measures, float32:

* the regimes S1-S4 of ``benchmarks/bench_gemv.py``: ``sparse_block_gemv``
  forward and forward+backward (gradients of ``W`` and ``h``) with
  ``strategy="auto"`` and each named strategy, against the naive
  ``einsum`` over ``W[input_idx[:, :, None], output_idx[:, None, :]]``
  differentiated by JAX;
* the h_softmax cases of ``benchmarks/bench_hsoftmax.py``: the gradient of
  ``h_softmax_loss`` (all parameters and ``x``) with its second level's
  ``sparse_block_dot`` run by each strategy, against the same loss with that
  dot written as the naive gather + einsum.

Each contender is compiled ahead of time (compile seconds and XLA's temp bytes
reported apart), warmed up, then timed round-robin in a new random order each
round, every call ending in ``block_until_ready``; the table gives medians and
the ratio naive / contender from the same run.  A contender whose single call
takes longer than ``--slow-s`` (the sequential ``loop`` and ``grouped`` can) is
timed once; cases left when ``--budget-s`` seconds have passed are skipped
with a note, so the run stays under five minutes.  Writes
``device_<platform>.json`` and ``device_<platform>.md`` under ``--out``.

On a CPU it says so and exits (status 2): ``benchmarks/run.py`` is the CPU suite.
``--smoke`` runs the same code on tiny shapes on any backend (one repeat), to
check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks._timing import call, compile_stats, time_round_robin
from benchmarks.bench_gemv import REGIMES, fwd_bwd, fwd_only, make_problem, naive_gemv
from blocksparse_jax import h_softmax_init, h_softmax_loss, sparse_block_dot, sparse_block_gemv
from blocksparse_jax.blocksparse import STRATEGIES, accelerator_budget
from blocksparse_jax.hsoftmax import _problem

# name: (vocab, batch, width), as in benchmarks/bench_hsoftmax.py.
HS_CASES = {"V65536_b512_w256": (65_536, 512, 256), "V600000_b256_w128": (600_000, 256, 128)}
SMOKE_REGIMES = {"S2_tiny": (8, 4, 4, 2, 2, 8, 8)}
SMOKE_HS_CASES = {"V64_b8_w8": (64, 8, 8)}
NAMED = [s for s in STRATEGIES if s != "auto"]


def naive_dot(W, h, input_idx, b, output_idx, **_):
    """``sparse_block_dot`` as the naive gather + einsum (no bound checks)."""
    blocks = W[input_idx[:, :, None], output_idx[:, None, :]]
    return b[output_idx] + jnp.einsum("bis,bijst->bjt", h, blocks)


def measure(contenders, args, *, repeats, slow_s, log):
    """``{name: {median_s, times, compile_s, temp_bytes}}``, timed round-robin."""
    res, ready = {}, {}
    for name, f in contenders.items():
        try:
            stats = compile_stats(jax.jit(f), *args)
            jax.block_until_ready(stats["compiled"](*args))
        except Exception as e:  # a contender that does not compile or run is reported, not fatal
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            log(f"    {name}: {res[name]['error']}")
            continue
        temp = -1 if stats["temp_bytes"] is None else stats["temp_bytes"]
        res[name] = {"compile_s": stats["compile_s"], "temp_bytes": temp}
        ready[name] = call(stats["compiled"], *args)
    times = time_round_robin(
        ready, warmup=1, repeats=repeats, slow_s=slow_s, seed=random.randrange(2**32)
    )
    for name, ts in times.items():
        res[name]["times"] = ts
        res[name]["median_s"] = statistics.median(ts)
        if repeats > 1 and len(ts) == 1:
            res[name]["note"] = f"timed once (warm-up call > {slow_s} s)"
    return res


def regime_contenders(mode):
    wrap = fwd_only if mode == "fwd" else fwd_bwd
    out = {"naive": wrap(naive_gemv)}
    for s in ("auto", *NAMED):
        out[s] = wrap(functools.partial(sparse_block_gemv, strategy=s))
    return out


def hs_contenders(vocab):
    """The h_softmax gradient with the second level's dot per strategy (patched at trace time)."""

    def with_dot(dot):
        def grad(params, x, target):
            saved = _problem.sparse_block_dot
            _problem.sparse_block_dot = dot
            try:
                loss = lambda p, x: h_softmax_loss(x, p, target, n_outputs=vocab)
                return jax.grad(loss, argnums=(0, 1))(params, x)
            finally:
                _problem.sparse_block_dot = saved

        return grad

    out = {"naive": with_dot(naive_dot)}
    for s in ("auto", *NAMED):
        out[s] = with_dot(functools.partial(sparse_block_dot, strategy=s))
    return out


def markdown(results):
    lines = [
        f"Device: {results['device']} ({results['platform']}), jax {results['jax']}; "
        f"float32; medians of {results['repeats']}; gather budget "
        f"{results['budget_bytes'] / 2**30:.2f} GiB.",
        "",
        "| case | pass | contender | median ms | naive / this | compile s | temp MB | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for case, modes in results["cases"].items():
        for mode, res in modes.items():
            if "skipped" in res:
                lines.append(f"| {case} | {mode} | - | - | - | - | - | {res['skipped']} |")
                continue
            naive = res.get("naive", {}).get("median_s")
            for name, r in res.items():
                if "median_s" not in r:
                    lines.append(f"| {case} | {mode} | {name} | - | - | - | - | {r.get('error')} |")
                    continue
                ratio = f"{naive / r['median_s']:.2f}" if naive else "-"
                lines.append(
                    f"| {case} | {mode} | {name} | {r['median_s'] * 1e3:.3f} | {ratio} | "
                    f"{r['compile_s']:.1f} | {r['temp_bytes'] / 2**20:.0f} | {r.get('note', '')} |"
                )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--slow-s", type=float, default=1.0)
    p.add_argument("--budget-s", type=float, default=270.0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on any backend, one repeat")
    args = p.parse_args(argv)
    platform = jax.default_backend()
    if args.smoke:
        args.repeats = 1
    elif platform not in ("gpu", "tpu"):
        print(
            f"benchmarks.device needs a GPU or TPU; JAX's default backend here is {platform!r}. "
            "Run python3 benchmarks/run.py for the CPU suite."
        )
        return 2
    device = jax.devices()[0]
    accel = {"tpu": "tpu", "cpu": "cpu"}.get(platform) or device.client.platform  # cuda / rocm
    log = functools.partial(print, flush=True)
    results = {
        "platform": accel,
        "device": device.device_kind,
        "jax": jax.__version__,
        "repeats": args.repeats,
        "budget_bytes": accelerator_budget(accel) if accel != "cpu" else 0,
        "smoke": args.smoke,
        "cases": {},
    }
    start = time.perf_counter()
    regimes, hs_cases = (SMOKE_REGIMES, SMOKE_HS_CASES) if args.smoke else (REGIMES, HS_CASES)
    work = [(name, "regime", shape) for name, shape in regimes.items()]
    work += [(name, "hs", case) for name, case in hs_cases.items()]
    for name, kind, spec in work:
        modes = ("fwd", "fwd+bwd") if kind == "regime" else ("grad",)
        results["cases"][name] = {}
        for mode in modes:
            if time.perf_counter() - start > args.budget_s:
                results["cases"][name][mode] = {"skipped": f"time budget {args.budget_s} s spent"}
                continue
            log(f"{name} {mode}")
            if kind == "regime":
                call_args = make_problem(spec)  # (o, W, h, ii, oi, g)
                contenders = regime_contenders(mode)
            else:
                vocab, batch, width = spec
                keys = jax.random.split(jax.random.key(0), 3)
                params = h_softmax_init(keys[0], width, vocab)
                x = jax.random.normal(keys[1], (batch, width), jnp.float32)
                target = jax.random.randint(keys[2], (batch,), 0, vocab, jnp.int32)
                call_args = (params, x, target)
                contenders = hs_contenders(vocab)
            results["cases"][name][mode] = measure(
                contenders, call_args, repeats=args.repeats, slow_s=args.slow_s, log=log
            )
    results["total_s"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"device_{accel}" + ("_smoke" if args.smoke else ""))
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {stem}.json and {stem}.md in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
