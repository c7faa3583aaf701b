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


def summary(m: dict) -> str:
    """The end-of-run summary as text."""
    mo = m["model"]
    full = m["val_ppl_full"] is not None
    lines = [
        "",
        "== blocksparse_jax demo: hierarchical softmax vs full softmax ==",
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
        f"{'':28}{'h_softmax':>14}{'full softmax':>16}",
        f"{'validation perplexity':28}{m['val_ppl_hsoftmax']:>14.1f}"
        f"{_fmt(m['val_ppl_full'], '>16.1f', f'{chr(45):>16}')}"
        f"   (unigram: {m['val_ppl_unigram']:.1f}; {m['val_eval_tokens']:,} validation tokens)",
        f"{'training tokens/s':28}{_fmt(m['tokens_per_s_hsoftmax'], '>14,.0f', f'{chr(45):>14}')}"
        f"{_fmt(m['tokens_per_s_full'], '>16,.0f', f'{chr(45):>16}')}"
        + (f"   speedup {m['speedup']:.1f}x" if m["speedup"] else ""),
        f"{'first step (compilation)':28}{m['compile_s_hsoftmax']:>13.1f}s"
        + (f"{m['compile_s_full']:>15.1f}s" if full else ""),
        "",
        "next-token predictions of the h_softmax model (h_softmax_top_k, k=5):",
    ]
    for p in m["top5"]:
        ctx = " ".join(_show(t) for t in p["context"])
        top = "  ".join(f"{_show(t)} {prob:.2f}" for t, prob in p["top"])
        lines.append(f"  ... {ctx}  ->  {top}   (actual: {_show(p['actual'])})")
    lines += ["", "sampled continuations (h_softmax_sample), after '...':"]
    for i, s in enumerate(m["samples"], 1):
        text = detokenize(s["context"]) + " ... " + detokenize(s["sample"])
        body = text.strip("\n").replace("\n", "\n      ")
        lines.append(f"  [{i}] {body}")
    lines.append(f"\ntotal time {m['wall_s']:.0f} s")
    return "\n".join(lines)


def _ema(x: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    out, acc = np.empty_like(x), x[0]
    for i, v in enumerate(x):
        acc = acc + alpha * (v - acc) if i else v
        out[i] = acc
    return out


def plot_losses(path: str, m: dict) -> bool:
    """Writes both training-loss curves to ``path``; False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves = [("h_softmax", m["loss_hsoftmax"], m["val_ppl_hsoftmax"], "C0")]
    if m["loss_full"]:
        curves.append(("full softmax", m["loss_full"], m["val_ppl_full"], "C1"))
    for name, losses, ppl, color in curves:
        y = np.asarray(losses, dtype=np.float64)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, _ema(y), color=color, label=f"{name} (train, smoothed)")
        ax.plot(
            [len(y)], [math.log(ppl)], "o", color=color, label=f"{name} validation ({ppl:.0f} ppl)"
        )
    ax.axhline(
        math.log(m["val_ppl_unigram"]),
        color="gray",
        linestyle="--",
        label=f"unigram validation ({m['val_ppl_unigram']:.0f} ppl)",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats/token)")
    speed = f", {m['speedup']:.1f}x the full softmax's tokens/s" if m["speedup"] else ""
    ax.set_title(f"h_softmax language model, vocabulary {m['vocab_size']:,}{speed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_outputs(out_dir: str, m: dict) -> str | None:
    """Writes ``metrics.json`` and, with matplotlib, ``loss.png``; returns the plot's path."""
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as fh:
        json.dump(m, fh, indent=1, ensure_ascii=False)
        fh.write("\n")
    with open(os.path.join(out_dir, "summary.txt"), "w", encoding="utf-8") as fh:
        fh.write(summary(m).lstrip("\n") + "\n")
    plot = os.path.join(out_dir, "loss.png")
    return plot if plot_losses(plot, m) else None
