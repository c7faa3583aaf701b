"""The benchmark suite of issue 4: every regime, every implementation, one run.

    python3 benchmarks/run.py            # full: S1-S4 of issue 4 (a few minutes)
    python3 benchmarks/run.py --quick    # scaled-down shapes, fewer implementations (< 1 min)

For each regime it measures ``sparse_block_gemv`` forward and forward+backward
(gradients of ``W`` and ``h``), float32, for ours with ``strategy="auto"`` and
with each strategy, the naive JAX ``einsum`` over ``W[input_idx[:, :, None],
output_idx[:, None, :]]`` differentiated by JAX, PyTorch's gather + ``bmm`` with
autograd (skipped, with a line saying so, when torch is not installed) and the
NumPy loop reference (where it finishes in reasonable time).

Steady-state medians are measured after warm-up, every call ending in
``block_until_ready``, with the implementations timed round-robin (in a new
random order each round) so that load on the machine hits them alike; compile time and XLA's compiled temp
memory (``memory_analysis().temp_size_in_bytes``) are reported apart.  The
bandwidth bound - bytes of the distinct blocks touched plus the inputs and
outputs, over the machine's memory bandwidth - uses a bandwidth measured in
the same run by a large array copy.

Writes ``results.json``, ``results.md`` (tables of medians and ratios) and
``results.png`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gemv import (  # noqa: E402
    REGIMES,
    compile_fn,
    fwd_bwd,
    fwd_only,
    make_problem,
    naive_gemv,
    time_fn,
)

from blocksparse_jax import _execute, sparse_block_gemv  # noqa: E402

try:  # the h_softmax regime, measured by the h_softmax benchmark's own case runner
    import bench_hsoftmax
except ImportError:  # pragma: no cover - h_softmax not available
    bench_hsoftmax = None

# Scaled-down versions for --quick: same structure, ~1/8 of the memory.
QUICK_REGIMES = {
    "S1": (128, 1, 250, 1, 1, 256, 250),
    "S2": (64, 16, 16, 4, 4, 64, 64),
    "S3": (16, 4, 4, 2, 2, 256, 256),
    "S4": (256, 64, 64, 8, 8, 16, 16),
}
STRATEGIES = ["gather", "loop", "dense", "grouped"]
MODES = ("fwd", "fwd+bwd")
SKIP_ESTIMATE_S = 2.0  # a strategy the cost model expects to take longer than this is skipped


# --------------------------------------------------------------------------------------
# Machine.
# --------------------------------------------------------------------------------------


def measure_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """Memory bandwidth from a large array copy: (read + write bytes) / median time.

    ``numpy_copy`` copies into a preallocated buffer (the hardware's streaming
    rate); ``jax_copy`` is ``x * 2`` under ``jit`` into a fresh output buffer, which
    also pays the first touch of every new page (how XLA sees large buffers).
    """
    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    numpy_bw = 2 * nbytes / statistics.median(ts)
    x = jnp.asarray(src)
    f = jax.jit(lambda x: x * 2)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        ts.append(time.perf_counter() - t0)
    return {"bytes": nbytes, "numpy_copy": numpy_bw, "jax_copy": 2 * nbytes / statistics.median(ts)}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.devices()[0].platform,
        "numpy": np.__version__,
    }


# --------------------------------------------------------------------------------------
# Implementations.  Each entry: name -> (setup(problem) -> callable() -> result) per mode.
# --------------------------------------------------------------------------------------


def jax_impl(gemv, mode, call):
    wrap = fwd_only if mode == "fwd" else fwd_bwd
    fn, compile_s, temp = compile_fn(wrap(gemv), call)
    return (lambda: jax.block_until_ready(fn(*call))), compile_s, temp


def torch_impl(mode, np_call, threads):
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

    if mode == "fwd":

        def run():
            with torch.no_grad():
                return forward(W, h)

    else:

        def run():
            Wr = W.detach().requires_grad_(True)
            hr = h.detach().requires_grad_(True)
            out = forward(Wr, hr)
            out.backward(g)
            return out, Wr.grad, hr.grad

    return run


def numpy_loop(mode, np_call):
    """The seed's loops (as ``tests/reference.py``) in float32 NumPy."""
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


# --------------------------------------------------------------------------------------
# Bounds.
# --------------------------------------------------------------------------------------


def bound_bytes(shape, ii, oi, mode) -> dict:
    """Bytes the best possible implementation must move (float32)."""
    batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size = shape
    pairs = (np.asarray(ii)[:, :, None] * o_blocks + np.asarray(oi)[:, None, :]).reshape(-1)
    distinct = int(np.unique(pairs).size)
    blk = i_size * o_size * 4
    acts = batch * (i_win * i_size + 2 * o_win * o_size) * 4 + batch * (i_win + o_win) * 4
    if mode == "fwd":
        total = distinct * blk + acts
    else:
        # read the distinct blocks, write the whole dense dW, read/write the activations twice.
        total = distinct * blk + i_blocks * o_blocks * blk + 2 * acts
    return {"distinct_blocks": distinct, "bytes": total}


# --------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------


def run_regime(name, shape, impls, *, repeats, warmup, bandwidth, has_torch, threads, log):
    o, W, h, ii, oi = make_problem(shape)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(o.shape), jnp.float32)
    call = (o, W, h, ii, oi, g)
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
    auto = _execute.choose_strategy(**dims)
    est = _execute.estimate_costs(**dims, itemsize=4)
    np_call = None
    out = {"shape": list(shape), "auto_choice": auto, "estimates_s": est, "modes": {}}
    log(f"\n{name} {shape}: auto -> {auto}")
    for mode in MODES:
        bb = bound_bytes(shape, ii, oi, mode)
        bound_s = bb["bytes"] / bandwidth
        runners, meta = {}, {}
        for impl in impls:
            if impl in STRATEGIES and est[impl] > SKIP_ESTIMATE_S and impl != auto:
                meta[impl] = {"skipped": f"cost model estimates {est[impl]:.1f} s per call"}
                continue
            if impl == "torch":
                if not has_torch:
                    continue
                np_call = np_call or tuple(np.asarray(a) for a in call)
                runners[impl], cs, temp = torch_impl(mode, np_call, threads), None, None
            elif impl == "numpy":
                pairs = batch * i_win * o_win
                if pairs > 200_000:
                    meta[impl] = {"skipped": f"{pairs} Python-level block products"}
                    continue
                np_call = np_call or tuple(np.asarray(a) for a in call)
                runners[impl], cs, temp = numpy_loop(mode, np_call), None, None
            else:
                gemv = (
                    naive_gemv
                    if impl == "naive"
                    else functools.partial(sparse_block_gemv, strategy=impl)
                )
                runners[impl], cs, temp = jax_impl(gemv, mode, call)
            meta[impl] = {"compile_s": cs, "temp_bytes": temp}
        # Warm up, then time round-robin so the machine's load hits all alike.
        times = {k: [] for k in runners}
        slow = set()
        for k, r in runners.items():
            t0 = time.perf_counter()
            for _ in range(warmup if k != "numpy" else 0):
                r()
            if k == "numpy":
                r()
            if time.perf_counter() - t0 > 5.0:
                slow.add(k)
        order = list(runners)
        rng = np.random.default_rng(0)
        for rep in range(repeats):
            rng.shuffle(order)  # a new order each round: no implementation always follows another
            for k in order:
                r = runners[k]
                if k in slow and rep >= 1:
                    continue
                t0 = time.perf_counter()
                r()
                times[k].append(time.perf_counter() - t0)
        res = {}
        for k in impls:
            if k in times:
                res[k] = dict(meta[k], median_s=statistics.median(times[k]), times_s=times[k])
            elif k in meta:
                res[k] = meta[k]
        naive = res.get("naive", {}).get("median_s")
        torch_s = res.get("torch", {}).get("median_s")
        for r in res.values():
            if "median_s" in r:
                r["speedup_vs_naive"] = naive / r["median_s"] if naive else None
                r["speedup_vs_torch"] = torch_s / r["median_s"] if torch_s else None
                r["x_bandwidth_bound"] = r["median_s"] / bound_s
        naive_temp = res.get("naive", {}).get("temp_bytes")
        for r in res.values():
            if r.get("temp_bytes") is not None and naive_temp:
                r["temp_vs_naive"] = r["temp_bytes"] / naive_temp
        out["modes"][mode] = {"bound": dict(bb, seconds=bound_s), "impls": res}
        if mode == "fwd+bwd":
            # The floor every implementation pays here: jax.grad returns a dense W-sized
            # dW, a fresh buffer on every call whose zero-fill (first touch) is timed alone.
            fill = jax.jit(lambda w: jnp.zeros_like(w) + w[0, 0, 0, 0] * 0)
            fill_s = time_fn(fill, (call[1],), warmup=warmup, repeats=repeats)[0]
            out["modes"][mode]["dw_fill_s"] = fill_s
            log(f"  {mode:8} fresh W-sized zero-fill (dW floor) {fill_s * 1e3:9.2f} ms")
        for k, r in res.items():
            if "median_s" in r:
                extra = ""
                if r.get("temp_bytes") is not None:
                    extra = f" temp {r['temp_bytes'] / 2**20:7.1f} MB compile {r['compile_s']:.2f}s"
                log(
                    f"  {mode:8} {k:8} {r['median_s'] * 1e3:9.2f} ms  "
                    f"x{r['speedup_vs_naive'] or float('nan'):6.2f} vs naive  "
                    f"{r['x_bandwidth_bound']:6.2f}x bound{extra}"
                )
            else:
                log(f"  {mode:8} {k:8} skipped: {r['skipped']}")
    del call, o, W, h, ii, oi, g, np_call
    return out


def geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def markdown(results) -> str:
    m = results["machine"]
    bw = results["bandwidth"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; JAX {m['jax']} "
        f"({m['backend']}), Python {m['python']}"
        + (f", torch {results['torch']}" if results.get("torch") else ", torch not installed")
        + ". float32.",
        f"Bandwidth (large array copy, read+write): {bw['numpy_copy'] / 1e9:.1f} GB/s into a "
        f"preallocated buffer (used for the bound); {bw['jax_copy'] / 1e9:.1f} GB/s for a jitted "
        "copy into a fresh XLA buffer (first-touch page faults).",
        f"Mode: {'quick (scaled-down shapes)' if results['quick'] else 'full'}; medians of "
        f"{results['repeats']} round-robin runs (shuffled each round) after warm-up.",
        "",
    ]
    for mode in MODES:
        lines += [
            f"### {mode}",
            "",
            "| regime | impl | median ms | vs naive | vs torch | / bandwidth bound | temp MB | temp / naive | compile s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, reg in results["regimes"].items():
            md = reg["modes"][mode]
            for k, r in md["impls"].items():
                label = f"auto ({reg['auto_choice']})" if k == "auto" else k
                if "median_s" not in r:
                    lines.append(f"| {name} | {label} | skipped: {r['skipped']} | | | | | | |")
                    continue

                def f(x, fmt):
                    return "" if x is None else format(x, fmt)

                lines.append(
                    f"| {name} | {label} | {r['median_s'] * 1e3:.1f} | "
                    f"{f(r.get('speedup_vs_naive'), '.2f')}x | {f(r.get('speedup_vs_torch'), '.2f')}"
                    f"{'x' if r.get('speedup_vs_torch') else ''} | {r['x_bandwidth_bound']:.2f}x | "
                    f"{f(None if r.get('temp_bytes') is None else r['temp_bytes'] / 2**20, '.1f')} | "
                    f"{f(r.get('temp_vs_naive'), '.3f')} | {f(r.get('compile_s'), '.2f')} |"
                )
            lines.append(
                f"| {name} | *bound* | {md['bound']['seconds'] * 1e3:.1f} | | | 1.00x | | | |"
            )
            if "dw_fill_s" in md:
                lines.append(
                    f"| {name} | *fresh dW zero-fill alone* | {md['dw_fill_s'] * 1e3:.1f} | | | "
                    f"{md['dw_fill_s'] / md['bound']['seconds']:.2f}x | | | |"
                )
        lines.append("")
    if results.get("hsoftmax"):
        lines += [
            "### h_softmax regime: one training step",
            "",
            "Gradient: `jax.grad` of `h_softmax_loss` (its second level is a `sparse_block_dot`, "
            "strategy `auto`) against exact full-softmax cross-entropy, float32; both return a "
            "dense gradient (a fresh `W2`- or `W`-sized buffer every call). SGD step: one jitted "
            "step with the parameters donated, `h_softmax_sgd_step` (`W2` and `b2` updated "
            "sparsely in place) against the full softmax's gradient and dense update.",
            "",
            "| case | vocab | batch | width | gradient: h_softmax ms | full softmax ms | speedup "
            "| SGD step: h_softmax ms | full softmax ms | speedup |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in results["hsoftmax"]:
            lines.append(
                f"| {r['case']} | {r['vocab']} | {r['batch']} | {r['width']} | "
                f"{r['hsoftmax_ms']:.1f} | {r['full_ms']:.1f} | {r['speedup']:.1f}x | "
                f"{r['hsoftmax_step_ms']:.1f} | {r['full_step_ms']:.1f} | {r['step_speedup']:.1f}x |"
            )
        lines.append("")
    s = results["summary"]
    lines += [
        "### Summary (auto)",
        "",
        "The two ceiling columns are the baseline's fwd+bwd time over the fresh dW zero-fill "
        "alone: no implementation that returns a dense `dW` can beat that ratio in this run.",
        "",
        "| regime | fwd vs naive | fwd+bwd vs naive | fwd vs torch | fwd+bwd vs torch "
        "| fwd / bound | fwd+bwd temp / naive | fwd+bwd ceiling vs naive | fwd+bwd ceiling vs torch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in s["per_regime"].items():
        cells = [
            row.get(k)
            for k in (
                "fwd_vs_naive",
                "fwdbwd_vs_naive",
                "fwd_vs_torch",
                "fwdbwd_vs_torch",
                "fwd_x_bound",
                "fwdbwd_temp_vs_naive",
                "fwdbwd_ceiling_vs_naive",
                "fwdbwd_ceiling_vs_torch",
            )
        ]
        lines.append(
            f"| {name} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |"
        )
    g = s["geomean"]
    lines.append(
        "| geomean | "
        + " | ".join(
            "" if g.get(k) is None else f"{g[k]:.2f}"
            for k in ("fwd_vs_naive", "fwdbwd_vs_naive", "fwd_vs_torch", "fwdbwd_vs_torch")
        )
        + " | | | "
        + " | ".join(
            "" if g.get(k) is None else f"{g[k]:.2f}"
            for k in ("fwdbwd_ceiling_vs_naive", "fwdbwd_ceiling_vs_torch")
        )
        + " |"
    )
    return "\n".join(lines) + "\n"


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
        a = {m: reg["modes"][m]["impls"].get("auto", {}) for m in MODES}
        per[name] = {
            "fwd_vs_naive": a["fwd"].get("speedup_vs_naive"),
            "fwdbwd_vs_naive": a["fwd+bwd"].get("speedup_vs_naive"),
            "fwd_vs_torch": a["fwd"].get("speedup_vs_torch"),
            "fwdbwd_vs_torch": a["fwd+bwd"].get("speedup_vs_torch"),
            "fwd_x_bound": a["fwd"].get("x_bandwidth_bound"),
            "fwdbwd_temp_vs_naive": a["fwd+bwd"].get("temp_vs_naive"),
            "fwdbwd_ceiling_vs_naive": _ceiling(reg["modes"]["fwd+bwd"], "naive"),
            "fwdbwd_ceiling_vs_torch": _ceiling(reg["modes"]["fwd+bwd"], "torch"),
        }
    keys = (
        "fwd_vs_naive",
        "fwdbwd_vs_naive",
        "fwd_vs_torch",
        "fwdbwd_vs_torch",
        "fwdbwd_ceiling_vs_naive",
        "fwdbwd_ceiling_vs_torch",
    )
    return {"per_regime": per, "geomean": {k: geomean([p[k] for p in per.values()]) for k in keys}}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(results["regimes"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, mode in zip(axes, MODES, strict=True):
        order = ["auto", *STRATEGIES, "naive", "torch", "numpy"]
        impls = [
            k
            for k in order
            if any(
                "median_s" in reg["modes"][mode]["impls"].get(k, {})
                for reg in results["regimes"].values()
            )
        ]
        width = 0.8 / max(len(impls), 1)
        for n, k in enumerate(impls):
            ys = []
            for name in regimes:
                r = results["regimes"][name]["modes"][mode]["impls"].get(k, {})
                ys.append(r["median_s"] * 1e3 if "median_s" in r else np.nan)
            ax.bar(np.arange(len(regimes)) + n * width, ys, width, label=k)
        bounds = [results["regimes"][r]["modes"][mode]["bound"]["seconds"] * 1e3 for r in regimes]
        for x, b in enumerate(bounds):
            ax.hlines(
                b,
                x - 0.05,
                x + 0.85,
                colors="k",
                linestyles="--",
                label="bandwidth bound" if x == 0 else None,
            )
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(regimes)) + 0.4 - width / 2)
        ax.set_xticklabels(
            [
                f"{r}\n{tuple(results['regimes'][r]['shape'][:3])}\n{tuple(results['regimes'][r]['shape'][3:])}"
                for r in regimes
            ],
            fontsize=7,
        )
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"sparse_block_gemv {mode}, float32")
        ax.legend(fontsize=7, ncol=2)
    m = results["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cores']} cores; JAX {m['jax']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="blocksparse_jax benchmark suite (issue 4)")
    p.add_argument("--quick", action="store_true", help="scaled-down shapes, < 1 minute")
    p.add_argument("--regimes", default="S1,S2,S3,S4")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-hsoftmax", action="store_true", help="skip the h_softmax regime")
    args = p.parse_args(argv)
    quick = args.quick
    repeats = args.repeats or (3 if quick else 7)
    warmup = 1 if quick else 2
    impls = (
        ["auto", "naive", "torch"] if quick else ["auto", *STRATEGIES, "naive", "torch", "numpy"]
    )
    try:
        import torch

        has_torch = torch.__version__
    except ImportError:
        has_torch = None
        print(
            "torch: not installed - skipping the PyTorch gather + bmm baseline "
            "(pip install -e '.[bench]' to include it)"
        )
    log = functools.partial(print, flush=True)
    info = machine_info()
    log(f"{info['cpu']}, {info['cores']} cores, JAX {info['jax']} ({info['backend']})")
    bw = measure_bandwidth((64 if quick else 512) * 2**20)
    log(
        f"bandwidth: {bw['numpy_copy'] / 1e9:.1f} GB/s (numpy copy), "
        f"{bw['jax_copy'] / 1e9:.1f} GB/s (jitted copy into a fresh buffer)"
    )
    table = QUICK_REGIMES if quick else REGIMES
    results = {
        "machine": info,
        "bandwidth": bw,
        "torch": has_torch,
        "quick": quick,
        "repeats": repeats,
        "regimes": {},
    }
    t0 = time.perf_counter()
    for name in args.regimes.split(","):
        results["regimes"][name] = run_regime(
            name,
            table[name],
            impls,
            repeats=repeats,
            warmup=warmup,
            bandwidth=bw["numpy_copy"],
            has_torch=bool(has_torch),
            threads=args.threads,
            log=log,
        )
    if bench_hsoftmax is not None and not args.no_hsoftmax:
        cases = bench_hsoftmax.QUICK if quick else bench_hsoftmax.CASES
        results["hsoftmax"] = []
        for name, (vocab, batch, width) in cases.items():
            row = bench_hsoftmax.run_case(
                name, vocab, batch, width, warmup=warmup, repeats=max(3, repeats)
            )
            for k in [k for k in row if k.endswith("_times_ms")]:
                del row[k]
            results["hsoftmax"].append(row)
            log(
                f"\nh_softmax {name}: grad of h_softmax_loss {row['hsoftmax_ms']:.1f} ms, "
                f"full softmax {row['full_ms']:.1f} ms: {row['speedup']:.1f}x; SGD step "
                f"{row['hsoftmax_step_ms']:.1f} ms vs {row['full_step_ms']:.1f} ms: "
                f"{row['step_speedup']:.1f}x"
            )
    results["summary"] = summarize(results)
    results["wall_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    try:
        plot(results, os.path.join(args.out, "results.png"))
    except ImportError:
        log("matplotlib not installed - no plot (pip install -e '.[bench]')")
    log("\n" + md)
    log(f"wrote {args.out}/results.json, results.md, results.png in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
