"""The demo's outputs: the printed summary, ``metrics.json`` and ``loss.png``."""

from __future__ import annotations

import json
import math
import os

import numpy as np

from blocksparse_jax.demo._corpus import detokenize


def _show(token: str) -> str:
    return "\\n" if token == "\n" else token


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


#: How the summary names each output layer (``--output``).
NAMES = {
    "hsoftmax": "h_softmax",
    "full": "full softmax",
    "naive": "naive softmax",
    "filtered": "filtered softmax",
    "sampled": "sampled softmax",
    "adaptive": "adaptive softmax",
}
_TITLES = {"hsoftmax": "hierarchical softmax"}

# The functions the predictions and samples of each output layer come from.
_DECODERS = {
    "hsoftmax": ("h_softmax_top_k", "h_softmax_sample"),
    "adaptive": ("adaptive_softmax_top_k", "categorical over adaptive_log_softmax"),
}
_EXACT_DECODERS = ("full_softmax_top_k", "full_softmax_sample")


def summary(m: dict) -> str:
    """The end-of-run summary as text."""
    mo = m["model"]
    kind = m.get("output", "hsoftmax")
    name = NAMES[kind]
    full = m["val_ppl_full"] is not None and kind != "full"
    top_k_fn, sample_fn = _DECODERS.get(kind, _EXACT_DECODERS)
    title = _TITLES.get(kind, name)
    w = max(14, len(name) + 2)  # the model's column
    lines = [
        "",
        f"== blocksparse_jax demo: {title} vs full softmax =="
        if kind != "full"
        else "== blocksparse_jax demo: full softmax ==",
        f"corpus      {m['corpus']}",
        f"            {m['corpus_files']:,} files, {m['train_tokens']:,} training / "
        f"{m['val_tokens']:,} validation tokens (split {m['corpus_split']}), "
        f"{m['distinct_tokens']:,} distinct",
        f"vocabulary  {m['vocab_size']:,} tokens (<unk> included); h_softmax: "
        f"{mo['n_classes']} frequency classes x {mo['n_outputs_per_class']} slots",
        f"model       previous {mo['context']} tokens -> {mo['context']} x {mo['embed']} embeddings "
        f"-> {mo['hidden']} tanh -> output; {mo['optimizer']}, {m['steps']:,} steps x "
        f"{m['batch_size']} tokens",
        "",
        f"{'':28}{name:>{w}}" + (f"{'full softmax':>16}" if kind != "full" else ""),
        f"{'validation perplexity':28}{m[f'val_ppl_{kind}']:>{w}.1f}"
        + (_fmt(m["val_ppl_full"], ">16.1f", f"{chr(45):>16}") if kind != "full" else "")
        + f"   (unigram: {m['val_ppl_unigram']:.1f}; {m['val_eval_tokens']:,} validation tokens)",
        f"{'training tokens/s':28}"
        + _fmt(m[f"tokens_per_s_{kind}"], f">{w},.0f", f"{chr(45):>{w}}")
        + (_fmt(m["tokens_per_s_full"], ">16,.0f", f"{chr(45):>16}") if kind != "full" else "")
        + (f"   speedup {m['speedup']:.1f}x" if m["speedup"] else ""),
        f"{'first step (compilation)':28}{m[f'compile_s_{kind}']:>{w - 1}.1f}s"
        + (f"{m['compile_s_full']:>15.1f}s" if full else ""),
    ]
    lines += _touched_lines(m)
    lines += [
        "",
        f"next-token predictions of the {name} model ({top_k_fn}, k=5):",
    ]
    for p in m["top5"]:
        ctx = " ".join(_show(t) for t in p["context"])
        top = "  ".join(f"{_show(t)} {prob:.2f}" for t, prob in p["top"])
        lines.append(f"  [{ctx}]  ->  {top}   (actual: {_show(p['actual'])})")
    n = len(m["samples"][0]["sample"]) if m["samples"] else 0
    lines += ["", f"sampled continuations ({sample_fn}, {n} tokens after the [prompt]):"]
    for s in m["samples"]:
        ctx = " ".join(_show(t) for t in s["context"])
        body = detokenize(s["sample"]).replace("\n", "\n      ")
        lines.append(f"  [{ctx}] {body}")
    lines.append(f"\ntotal time {m['wall_s']:.0f} s")
    return "\n".join(lines)


def _touched_lines(m: dict) -> list[str]:
    """The mean fraction of each sparse parameter's blocks a training step touched."""
    rows = []
    model = m.get("output", "hsoftmax")
    for kind in dict.fromkeys((model, "full")):
        touched = m.get(f"touched_{kind}")
        if touched:
            parts = [f"{path.rsplit('.', 1)[-1]} {frac:.1%}" for path, frac in touched.items()]
            sparse_out = any(".out." in path for path in touched)
            dense = "" if sparse_out else "   (output layer: dense)"
            rows.append(f"  {NAMES[kind]:18}{'   '.join(parts)}{dense}")
    if not rows:
        return []
    return ["", "blocks a step touches (mean; lazy Adam updates these only):", *rows]


def _smooth(x: np.ndarray, half: int = 10) -> np.ndarray:
    """A centred moving average over ``2 * half + 1`` steps (fewer at the ends)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(len(x))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(x))
    return (c[hi] - c[lo]) / (hi - lo)


def plot_losses(path: str, m: dict) -> bool:
    """Writes both training-loss curves to ``path``; False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    model = m.get("output", "hsoftmax")
    curves = [(NAMES[model], model, "C0")]
    if m["loss_full"] and model != "full":
        curves.append(("full softmax", "full", "C1"))
    for name, kind, color in curves:
        y = np.asarray(m[f"loss_{kind}"], dtype=np.float64)
        ppl, tps = m[f"val_ppl_{kind}"], m[f"tokens_per_s_{kind}"]
        steps = np.arange(1, len(y) + 1)
        by_step.plot(steps, y, color=color, alpha=0.2, linewidth=0.7)
        by_step.plot(steps, _smooth(y), color=color, label=f"{name} (training, smoothed)")
        by_step.plot([len(y)], [math.log(ppl)], "o", color=color, label=f"{name} validation")
        if tps:
            seconds = steps * (m["batch_size"] / tps)
            by_time.plot(seconds, _smooth(y), color=color, label=f"{name} ({tps:,.0f} tokens/s)")
            by_time.plot([seconds[-1]], [math.log(ppl)], "o", color=color)
    for ax in (by_step, by_time):
        ax.axhline(
            math.log(m["val_ppl_unigram"]),
            color="gray",
            linestyle="--",
            linewidth=1,
            label="unigram validation" if ax is by_step else None,
        )
        ax.grid(alpha=0.3)
    by_step.set_xlabel("training step")
    by_step.set_ylabel("cross-entropy (nats/token)")
    by_step.legend(fontsize=8)
    by_time.set_xlabel("training time (s, at the measured tokens/s)")
    if any(not line.get_label().startswith("_") for line in by_time.get_lines()):
        by_time.legend(fontsize=8)
    else:  # one step per session: the only step compiled, none was timed
        by_time.text(
            0.5, 0.5, "no timed steps", ha="center", va="center", transform=by_time.transAxes
        )
    speed = f"; {NAMES[model]} trains {m['speedup']:.1f}x faster" if m["speedup"] else ""
    fig.suptitle(
        f"next-token model on {m['vocab_size']:,} tokens: validation perplexity "
        f"{m[f'val_ppl_{model}']:.0f} ({NAMES[model]})"
        + (f" vs {m['val_ppl_full']:.0f} (full)" if m["val_ppl_full"] and model != "full" else "")
        + f", unigram {m['val_ppl_unigram']:.0f}{speed}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_outputs(out_dir: str, m: dict) -> str | None:
    """Writes ``metrics.json``, ``summary.txt`` and, with matplotlib, ``loss.png``; returns the plot's path."""
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(m, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    with open(os.path.join(out_dir, "summary.txt"), "w", encoding="utf-8") as fh:
        fh.write(summary(m).lstrip("\n") + "\n")
    plot = os.path.join(out_dir, "loss.png")
    return plot if plot_losses(plot, m) else None
