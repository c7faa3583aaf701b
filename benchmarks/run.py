"""The benchmark suite: every gemv regime, every implementation, one run.

    python3 -m benchmarks.run            # full: S1-S4 and the h_softmax cases (5-10 minutes)
    python3 -m benchmarks.run --quick    # scaled-down shapes, fewer implementations (< 1 min)

For each regime it measures ``sparse_block_gemv`` forward and forward+backward
(gradients of ``W`` and ``h``), float32, for ours with ``strategy="auto"`` (the
default) and with each strategy, the naive JAX ``einsum`` over
``W[input_idx[:, :, None], output_idx[:, None, :]]`` differentiated by JAX,
PyTorch's gather + ``bmm`` with autograd (skipped, with a line saying so, when
torch is not installed) and the NumPy loop reference (where it finishes in
reasonable time); then the h_softmax cases of ``benchmarks.bench_hsoftmax``.

Every JAX contender is ``jax.jit``-ed and returns all its outputs (``out``, or
``(out, dW, dh)``).  Steady-state medians are measured after warm-up, every call
ending in ``block_until_ready``, the implementations timed alternately (in a new
random order each round) so that load on the machine hits them alike; compile
time and XLA's compiled temp memory (``memory_analysis().temp_size_in_bytes``)
are reported apart.  The bandwidth bound - bytes of the distinct blocks touched
plus the inputs and outputs, over the machine's memory bandwidth - uses a
bandwidth measured in the same run by a large array copy.

Writes ``results.json``, ``results.md`` (tables of medians and ratios) and
``results.png`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_hsoftmax
from benchmarks._machine import machine_info, measure_bandwidth
from benchmarks._timing import call, compile_stats, time_round_robin
from benchmarks.bench_gemv import MODES, QUICK_REGIMES, REGIMES, jitted, make_problem, naive_gemv
from blocksparse_jax import sparse_block_gemv
from blocksparse_jax.blocksparse import choose_strategy, estimate_costs

STRATEGIES = ["gather", "loop", "dense", "grouped"]
IMPLS = ["auto", *STRATEGIES, "naive", "torch", "numpy"]
QUICK_IMPLS = ["auto", "naive", "torch"]
SKIP_ESTIMATE_S = 2.0  # a strategy the cost model expects to take longer than this is skipped
NUMPY_MAX_PAIRS = 200_000  # the NumPy loop is skipped above this many block products
SLOW_S = 5.0  # a contender whose warm-up call takes longer than this is timed once
DW_FILL = "dw_fill"  # the runner of the fresh dW zero-fill, timed with the fwd+bwd contenders

# The summary: column -> (mode, field of the auto row); the ceilings are computed.
SUMMARY_FIELDS = {
    "fwd_vs_naive": ("fwd", "speedup_vs_naive"),
    "fwdbwd_vs_naive": ("fwd+bwd", "speedup_vs_naive"),
    "fwd_vs_torch": ("fwd", "speedup_vs_torch"),
    "fwdbwd_vs_torch": ("fwd+bwd", "speedup_vs_torch"),
    "fwd_x_bound": ("fwd", "x_bandwidth_bound"),
    "fwdbwd_temp_vs_naive": ("fwd+bwd", "temp_vs_naive"),
}
CEILINGS = {"fwdbwd_ceiling_vs_naive": "naive", "fwdbwd_ceiling_vs_torch": "torch"}
SUMMARY_LABELS = {
    "fwd_vs_naive": "fwd vs naive",
    "fwdbwd_vs_naive": "fwd+bwd vs naive",
    "fwd_vs_torch": "fwd vs torch",
    "fwdbwd_vs_torch": "fwd+bwd vs torch",
    "fwd_x_bound": "fwd / bound",
    "fwdbwd_temp_vs_naive": "fwd+bwd temp / naive",
    "fwdbwd_ceiling_vs_naive": "fwd+bwd ceiling vs naive",
    "fwdbwd_ceiling_vs_torch": "fwd+bwd ceiling vs torch",
}
GEOMEAN_KEYS = [k for k in SUMMARY_LABELS if "_vs_" in k and "temp" not in k]


# --------------------------------------------------------------------------------------
# A regime: its problem, the cost model's view of it, and its bound.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Regime:
    name: str
    shape: tuple
    call: tuple  # (o, W, h, input_idx, output_idx, g)
    auto: str  # the strategy "auto" picks
    estimates: dict  # the cost model's seconds per strategy

    @classmethod
    def make(cls, name, shape):
        batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
        dims = dict(
            batch=batch,
            i_blocks=i_blocks,
            o_blocks=o_blocks,
            i_win=i_win,
            o_win=o_win,
            i_size=i_size,
            o_size=o_size,
        )
        return cls(
            name,
            tuple(shape),
            make_problem(shape),
            choose_strategy(**dims),
            estimate_costs(**dims, itemsize=4),
        )

    @functools.cached_property
    def np_call(self):
        return tuple(np.asarray(a) for a in self.call)

    @property
    def pairs(self):
        batch, _, _, i_win, o_win, _, _ = self.shape
        return batch * i_win * o_win

    def bound(self, mode, bandwidth) -> dict:
        """Bytes the best possible implementation must move (float32), and their seconds."""
        batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = self.shape
        ii, oi = self.np_call[3], self.np_call[4]
        distinct = int(np.unique((ii[:, :, None] * o_blocks + oi[:, None, :]).reshape(-1)).size)
        blk = i_size * o_size * 4
        acts = batch * (i_win * i_size + 2 * o_win * o_size) * 4 + batch * (i_win + o_win) * 4
        if mode == "fwd":
            total = distinct * blk + acts
        else:
            # read the distinct blocks, write the whole dense dW, read/write the activations twice.
            total = distinct * blk + i_blocks * o_blocks * blk + 2 * acts
        return {"distinct_blocks": distinct, "bytes": total, "seconds": total / bandwidth}


# --------------------------------------------------------------------------------------
# Implementations: each gives a runner (no arguments, returns every output).
# --------------------------------------------------------------------------------------


def torch_runner(mode, np_call, threads):
    """PyTorch's gather + ``bmm``; forward+backward by autograd, returning ``(out, dW, dh)``."""
    import torch

    torch.set_num_threads(threads)
    o, W, h, ii, oi, g = (torch.from_numpy(np.array(a)) for a in np_call)
    ii, oi = ii.long(), oi.long()
    batch, i_win, i_size = h.shape
    o_win, o_size = o.shape[1:]

    def forward(W, h):
        blocks = W[ii[:, :, None], oi[:, None, :]]  # (b, i, j, s, t): gather
        blocks = blocks.permute(0, 1, 3, 2, 4).reshape(batch, i_win * i_size, o_win * o_size)
        out = torch.bmm(h.reshape(batch, 1, i_win * i_size), blocks)
        return o + out.reshape(batch, o_win, o_size)

    def fwd():
        with torch.no_grad():
            return forward(W, h)

    def fwd_bwd():
        Wr = W.detach().requires_grad_(True)
        hr = h.detach().requires_grad_(True)
        out = forward(Wr, hr)
        out.backward(g)
        return out, Wr.grad, hr.grad

    return fwd if mode == "fwd" else fwd_bwd


def numpy_runner(mode, np_call):
    """Theano's loops (as ``tests/reference.py``) in float32 NumPy."""
    o, W, h, ii, oi, g = (np.array(a) for a in np_call)
    batch, i_win, _ = h.shape
    o_win = o.shape[1]

    def run():
        out = o.copy()
        for b in range(batch):
            for j in range(o_win):
                for i in range(i_win):
                    out[b, j] += h[b, i] @ W[ii[b, i], oi[b, j]]
        if mode == "fwd":
            return out
        dW = np.zeros_like(W)
        dh = np.zeros_like(h)
        for b in range(batch):
            for i in range(i_win):
                for j in range(o_win):
                    dW[ii[b, i], oi[b, j]] += np.outer(h[b, i], g[b, j])
                    dh[b, i] += W[ii[b, i], oi[b, j]] @ g[b, j]
        return out, dW, dh

    return run


def dw_fill_runner(W):
    """A jitted fresh ``W``-sized zero-fill: the dense ``dW`` every fwd+bwd must return."""
    return call(jax.jit(lambda w: jnp.zeros_like(w) + w[0, 0, 0, 0] * 0), W)


def skip_reason(impl, regime, *, has_torch) -> str | None:
    """Why ``impl`` is not timed in ``regime``, or ``None``."""
    est = regime.estimates.get(impl)
    if impl in STRATEGIES and impl != regime.auto and est > SKIP_ESTIMATE_S:
        return f"cost model estimates {est:.1f} s per call"
    if impl == "torch" and not has_torch:
        return "torch not installed"
    if impl == "numpy" and regime.pairs > NUMPY_MAX_PAIRS:
        return f"{regime.pairs} Python-level block products"
    return None


def make_runner(impl, mode, regime, *, threads):
    """``(runner, meta)``: meta holds compile seconds and XLA temp bytes (``None`` off JAX)."""
    if impl == "torch":
        return torch_runner(mode, regime.np_call, threads), {"compile_s": None, "temp_bytes": None}
    if impl == "numpy":
        return numpy_runner(mode, regime.np_call), {"compile_s": None, "temp_bytes": None}
    if impl == "naive":
        gemv = naive_gemv
    elif impl == "auto":
        gemv = sparse_block_gemv  # the default, as users call it
    else:
        gemv = functools.partial(sparse_block_gemv, strategy=impl)
    fn = jitted(gemv, mode)
    stats = compile_stats(fn, *regime.call)
    return call(fn, *regime.call), {k: stats[k] for k in ("compile_s", "temp_bytes")}


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


def add_ratios(res, bound_s):
    """Each timed contender's ratios against naive and torch (time, temp) and the bound."""
    naive = res.get("naive", {}).get("median_s")
    torch_s = res.get("torch", {}).get("median_s")
    naive_temp = res.get("naive", {}).get("temp_bytes")
    for r in res.values():
        if "median_s" in r:
            r["speedup_vs_naive"] = naive / r["median_s"] if naive else None
            r["speedup_vs_torch"] = torch_s / r["median_s"] if torch_s else None
            r["x_bandwidth_bound"] = r["median_s"] / bound_s
        if r.get("temp_bytes") is not None and naive_temp:
            r["temp_vs_naive"] = r["temp_bytes"] / naive_temp


def time_mode(regime, mode, impls, *, repeats, warmup, bandwidth, has_torch, threads):
    """One mode of one regime: ``{"bound", "impls", ["dw_fill_s"]}``."""
    res, runners = {}, {}
    for impl in impls:
        reason = skip_reason(impl, regime, has_torch=has_torch)
        if reason:
            res[impl] = {"skipped": reason}
        else:
            runners[impl], res[impl] = make_runner(impl, mode, regime, threads=threads)
    if mode == "fwd+bwd":
        # The floor every implementation pays here: jax.grad returns a dense W-sized
        # dW, a fresh buffer on every call, whose zero-fill (first touch) is timed alone.
        runners[DW_FILL] = dw_fill_runner(regime.call[1])
    times = time_round_robin(runners, warmup=warmup, repeats=repeats, slow_s=SLOW_S)
    for impl, ts in times.items():
        if impl != DW_FILL:
            res[impl].update(median_s=statistics.median(ts), times_s=ts)
    bound = regime.bound(mode, bandwidth)
    add_ratios(res, bound["seconds"])
    entry = {"bound": bound, "impls": res}
    if DW_FILL in times:
        entry["dw_fill_s"] = statistics.median(times[DW_FILL])
    return entry


def log_mode(log, mode, entry):
    if "dw_fill_s" in entry:
        log(f"  {mode:8} fresh W-sized zero-fill (dW floor) {entry['dw_fill_s'] * 1e3:9.2f} ms")
    for k, r in entry["impls"].items():
        if "median_s" not in r:
            log(f"  {mode:8} {k:8} skipped: {r['skipped']}")
            continue
        extra = ""
        if r.get("temp_bytes") is not None:
            extra = f" temp {r['temp_bytes'] / 2**20:7.1f} MB compile {r['compile_s']:.2f}s"
        log(
            f"  {mode:8} {k:8} {r['median_s'] * 1e3:9.2f} ms  "
            f"x{r['speedup_vs_naive'] or float('nan'):6.2f} vs naive  "
            f"{r['x_bandwidth_bound']:6.2f}x bound{extra}"
        )


def run_regime(name, shape, impls, *, log, **timing):
    """Both modes of one regime; ``timing`` as :func:`time_mode`'s keywords."""
    regime = Regime.make(name, shape)
    log(f"\n{name} {shape}: auto -> {regime.auto}")
    out = {
        "shape": list(shape),
        "auto_choice": regime.auto,
        "estimates_s": regime.estimates,
        "modes": {},
    }
    for mode in MODES:
        out["modes"][mode] = time_mode(regime, mode, impls, **timing)
        log_mode(log, mode, out["modes"][mode])
    return out


def run_hsoftmax(*, quick, warmup, repeats, log):
    """The h_softmax cases of ``bench_hsoftmax``, without their per-call times."""
    rows = []
    for name, (vocab, batch, width) in (
        bench_hsoftmax.QUICK if quick else bench_hsoftmax.CASES
    ).items():
        row = bench_hsoftmax.run_case(name, vocab, batch, width, warmup=warmup, repeats=repeats)
        rows.append({k: v for k, v in row.items() if not k.endswith("_times_ms")})
        log(
            f"\nh_softmax {name}: grad of h_softmax_loss {row['hsoftmax_ms']:.1f} ms, "
            f"full softmax {row['full_ms']:.1f} ms: {row['speedup']:.1f}x; SGD step "
            f"{row['hsoftmax_step_ms']:.1f} ms vs {row['full_step_ms']:.1f} ms: "
            f"{row['step_speedup']:.1f}x"
        )
    return rows


# --------------------------------------------------------------------------------------
# Summary and reports.
# --------------------------------------------------------------------------------------


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _ceiling(md, baseline):
    """``baseline``'s median over the fresh dW zero-fill: the best fwd+bwd ratio any
    implementation returning a dense ``dW`` could reach in this run (it must write
    every element of a fresh ``W``-sized buffer at least once)."""
    base = md["impls"].get(baseline, {}).get("median_s")
    fill = md.get("dw_fill_s")
    return base / fill if base and fill else None


def summarize(results):
    per = {}
    for name, reg in results["regimes"].items():
        row = {
            key: reg["modes"][mode]["impls"].get("auto", {}).get(field)
            for key, (mode, field) in SUMMARY_FIELDS.items()
        }
        for key, baseline in CEILINGS.items():
            row[key] = _ceiling(reg["modes"]["fwd+bwd"], baseline)
        per[name] = row
    return {
        "per_regime": per,
        "geomean": {k: geomean([p[k] for p in per.values()]) for k in GEOMEAN_KEYS},
    }


def _fmt(x, fmt, suffix=""):
    return "" if x is None else format(x, fmt) + suffix


def _header_lines(results):
    m, bw = results["machine"], results["bandwidth"]
    torch = f", torch {results['torch']}" if results.get("torch") else ", torch not installed"
    mode = "quick (scaled-down shapes)" if results["quick"] else "full"
    return [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; JAX {m['jax']} "
        f"({m['backend']}), Python {m['python']}{torch}. float32.",
        f"Bandwidth (large array copy, read+write): {bw['numpy_copy'] / 1e9:.1f} GB/s into a "
        f"preallocated buffer (used for the bound); {bw['jax_copy'] / 1e9:.1f} GB/s for a jitted "
        "copy into a fresh XLA buffer (first-touch page faults).",
        f"Mode: {mode}; medians of {results['repeats']} round-robin runs (shuffled each round) "
        "after warm-up.",
        "",
    ]


def _impl_row(name, label, r):
    if "median_s" not in r:
        return f"| {name} | {label} | skipped: {r['skipped']} | | | | | | |"
    temp_mb = None if r.get("temp_bytes") is None else r["temp_bytes"] / 2**20
    cells = [
        f"{r['median_s'] * 1e3:.1f}",
        _fmt(r.get("speedup_vs_naive"), ".2f", "x"),
        _fmt(r.get("speedup_vs_torch"), ".2f", "x"),
        f"{r['x_bandwidth_bound']:.2f}x",
        _fmt(temp_mb, ".1f"),
        _fmt(r.get("temp_vs_naive"), ".3f"),
        _fmt(r.get("compile_s"), ".2f"),
    ]
    return f"| {name} | {label} | " + " | ".join(cells) + " |"


def _mode_table(results, mode):
    lines = [
        f"### {mode}",
        "",
        "| regime | impl | median ms | vs naive | vs torch | / bandwidth bound | temp MB "
        "| temp / naive | compile s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, reg in results["regimes"].items():
        md = reg["modes"][mode]
        for k, r in md["impls"].items():
            lines.append(_impl_row(name, f"auto ({reg['auto_choice']})" if k == "auto" else k, r))
        bound_s = md["bound"]["seconds"]
        lines.append(f"| {name} | *bound* | {bound_s * 1e3:.1f} | | | 1.00x | | | |")
        if "dw_fill_s" in md:
            lines.append(
                f"| {name} | *fresh dW zero-fill alone* | {md['dw_fill_s'] * 1e3:.1f} | | | "
                f"{md['dw_fill_s'] / bound_s:.2f}x | | | |"
            )
    return [*lines, ""]


def _hsoftmax_table(rows):
    lines = [
        "### h_softmax regime: one training step",
        "",
        "Gradient: `jax.grad` of `h_softmax_loss` (its second level is a `sparse_block_dot`, "
        "strategy `auto`) against exact full-softmax cross-entropy, float32; both return a "
        "dense gradient (a fresh `W2`- or `W`-sized buffer every call). SGD step: "
        '`jax.jit(h_softmax_sgd_step, static_argnames="n_outputs", donate_argnums=1)` '
        "returning `(loss, params, dx)`, `params` fed back (`W2` and `b2` updated sparsely "
        "in place), against the full softmax's step of the same form (dense update).",
        "",
        "| case | vocab | batch | width | gradient: h_softmax ms | full softmax ms | speedup "
        "| SGD step: h_softmax ms | full softmax ms | speedup |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['vocab']} | {r['batch']} | {r['width']} | "
            f"{r['hsoftmax_ms']:.1f} | {r['full_ms']:.1f} | {r['speedup']:.1f}x | "
            f"{r['hsoftmax_step_ms']:.1f} | {r['full_step_ms']:.1f} | {r['step_speedup']:.1f}x |"
        )
    return [*lines, ""]


def _summary_table(summary):
    keys = list(SUMMARY_LABELS)
    lines = [
        "### Summary (auto)",
        "",
        "The two ceiling columns are the baseline's fwd+bwd time over the fresh dW zero-fill "
        "alone: no implementation that returns a dense `dW` can beat that ratio in this run.",
        "",
        "| regime | " + " | ".join(SUMMARY_LABELS.values()) + " |",
        "| --- |" + " ---: |" * len(keys),
    ]
    rows = [*summary["per_regime"].items(), ("geomean", summary["geomean"])]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k), ".2f") for k in keys) + " |")
    return lines


def markdown(results) -> str:
    lines = _header_lines(results)
    for mode in MODES:
        lines += _mode_table(results, mode)
    if results.get("hsoftmax"):
        lines += _hsoftmax_table(results["hsoftmax"])
    lines += _summary_table(results["summary"])
    return "\n".join(lines) + "\n"


def _plot_mode(ax, results, mode):
    regimes = results["regimes"]
    impls = [
        k
        for k in IMPLS
        if any("median_s" in reg["modes"][mode]["impls"].get(k, {}) for reg in regimes.values())
    ]
    width = 0.8 / max(len(impls), 1)
    xs = np.arange(len(regimes))
    for n, k in enumerate(impls):
        ys = [
            reg["modes"][mode]["impls"].get(k, {}).get("median_s", np.nan)
            for reg in regimes.values()
        ]
        ax.bar(xs + n * width, np.asarray(ys, float) * 1e3, width, label=k)
    for x, reg in enumerate(regimes.values()):
        label = "bandwidth bound" if x == 0 else None
        bound_ms = reg["modes"][mode]["bound"]["seconds"] * 1e3
        ax.hlines(bound_ms, x - 0.05, x + 0.85, colors="k", linestyles="--", label=label)
    ax.set_yscale("log")
    ax.set_xticks(xs + 0.4 - width / 2)
    ax.set_xticklabels(
        [
            f"{r}\n{tuple(reg['shape'][:3])}\n{tuple(reg['shape'][3:])}"
            for r, reg in regimes.items()
        ],
        fontsize=7,
    )
    ax.set_ylabel("median ms (log)")
    ax.set_title(f"sparse_block_gemv {mode}, float32")
    ax.legend(fontsize=7, ncol=2)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, mode in zip(axes, MODES, strict=True):
        _plot_mode(ax, results, mode)
    m = results["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cores']} cores; JAX {m['jax']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results, out, log):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    try:
        plot(results, os.path.join(out, "results.png"))
    except ImportError:
        log("matplotlib not installed - no plot (pip install -e '.[bench]')")
    log("\n" + md)


# --------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="scaled-down shapes, < 1 minute")
    p.add_argument("--regimes", default="S1,S2,S3,S4")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 7, quick 3)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's threads")
    p.add_argument("--no-hsoftmax", action="store_true", help="skip the h_softmax cases")
    return p.parse_args(argv)


def torch_version(log):
    try:
        import torch
    except ImportError:
        log(
            "torch: not installed - skipping the PyTorch gather + bmm baseline "
            "(pip install -e '.[bench]' to include it)"
        )
        return None
    return torch.__version__


def describe_machine(*, quick, log) -> dict:
    """The machine, its memory bandwidth (measured now) and torch's version, logged."""
    torch = torch_version(log)
    info = machine_info()
    log(f"{info['cpu']}, {info['cores']} cores, JAX {info['jax']} ({info['backend']})")
    bw = measure_bandwidth((64 if quick else 512) * 2**20)
    log(
        f"bandwidth: {bw['numpy_copy'] / 1e9:.1f} GB/s (numpy copy), "
        f"{bw['jax_copy'] / 1e9:.1f} GB/s (jitted copy into a fresh buffer)"
    )
    return {"machine": info, "bandwidth": bw, "torch": torch}


def main(argv=None):
    args = parse_args(argv)
    log = functools.partial(print, flush=True)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    results = dict(describe_machine(quick=args.quick, log=log), quick=args.quick, repeats=repeats)
    timing = dict(
        repeats=repeats,
        warmup=warmup,
        bandwidth=results["bandwidth"]["numpy_copy"],
        has_torch=bool(results["torch"]),
        threads=args.threads,
    )
    impls, table = (QUICK_IMPLS, QUICK_REGIMES) if args.quick else (IMPLS, REGIMES)
    t0 = time.perf_counter()
    results["regimes"] = {
        name: run_regime(name, table[name], impls, log=log, **timing)
        for name in args.regimes.split(",")
    }
    if not args.no_hsoftmax:
        results["hsoftmax"] = run_hsoftmax(
            quick=args.quick, warmup=warmup, repeats=max(3, repeats), log=log
        )
    results["summary"] = summarize(results)
    results["wall_s"] = time.perf_counter() - t0
    write_reports(results, args.out, log)
    log(f"wrote {args.out}/results.json, results.md, results.png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
