"""Sparse training: dense ``jax.grad`` + ``optax.adam`` against ``value_and_sparse_grad`` + ``lazy(adam)``.

Every step is timed in the call form the docs show: jitted, parameters and
optimizer state donated, returning everything a user keeps (loss, new
parameters, new state).  Contenders of one case alternate in one process;
medians of ``--repeats`` calls, each ending in ``block_until_ready``; compile
time is measured apart.  XLA's temp memory comes from the compiled memory analysis.

Sections:

* ``hsoftmax``: the hierarchical softmax (width 128) at vocabularies 65,536 /
  589,824 / 4,194,304 and batch 64 / 256 / 1,024: dense Adam (default
  classes), lazy Adam (default classes), lazy Adam (``training_classes``), the
  full softmax with dense Adam; plus ``h_softmax_sgd_step`` as documented.
* ``layers``: ``sparse_block_dot`` layers (regimes S1-S4 of ``bench_gemv`` and
  an embedding-like layer with many blocks and few touched), dense Adam against
  lazy Adam, with the touched fraction.
* ``embedding``: a 4,194,304 x 64 table, 4,096 Zipf-distributed lookups per
  step, Adam: ``jax.grad`` + ``optax.adam``, lazy, and PyTorch's
  ``nn.Embedding(sparse=True)`` + ``optim.SparseAdam`` when torch is installed.
  JAX runs with its default thread pool, PyTorch with one thread (its fastest
  setting here).

In every section each timed call is followed by an untimed pause of
``SETTLE_S``, so that no contender runs while the previous one's background
work (a dense step freeing its weight-sized gradient) finishes.

Run::

    python3 -m benchmarks.bench_sparse_training [--quick] [--sections hsoftmax,layers,embedding]

Results go to ``bench_sparse_training.json`` next to this file (and a plot,
``bench_sparse_training.png``, when matplotlib is installed); a run of some
sections replaces those sections of an existing results file and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._timing import compile_stats, time_round_robin, training_loop
from blocksparse_jax import (
    embedding_lookup,
    h_softmax_init,
    h_softmax_loss,
    h_softmax_sgd_step,
    sparse_block_dot,
    value_and_sparse_grad,
)
from blocksparse_jax.optim import apply_updates, lazy, training_classes

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH = 128
LR = 1e-3
# Every race pauses this long after every timed call: a dense step's weight-sized
# gradient is freed after its outputs are ready (tens of ms of work for 1 GiB), which
# would otherwise run during the next contender's step.
SETTLE_S = 0.3


# --------------------------------------------------------------------------------------
# Timing: benchmarks._timing, each contender a training loop that donates its state
# --------------------------------------------------------------------------------------


class Contender:
    """A jitted step ``state -> (loss, state)`` (state donated): compile stats and a runner."""

    def __init__(self, name, step, state, rest, *, donate=True):
        jitted = jax.jit(step, donate_argnums=(0,) if donate else ())
        stats = compile_stats(jitted, state, *rest)
        self.name, self.compile_s, self.temp = name, stats["compile_s"], stats["temp_bytes"]
        # The state is freshly built for this contender: donated as is, not copied first.
        self.run = training_loop(jitted, state, *rest, state_argnum=0, state_out=1, copy=False)


def race(contenders, *, warmup, repeats, settle_s=0.0):
    """``{name: median ms}`` of the contenders, timed alternately by ``time_round_robin``."""
    runners = {c.name: c.run for c in contenders}
    times = time_round_robin(runners, warmup=warmup, repeats=repeats, settle_s=settle_s)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------
# Steps (the documented call forms)
# --------------------------------------------------------------------------------------


def dense_step(loss_fn, tx, apply=optax.apply_updates):
    """``jax.value_and_grad`` + ``tx``: state = (params, opt_state)."""

    def step(state, *data):
        params, opt = state
        loss, g = jax.value_and_grad(loss_fn)(params, *data)
        u, opt = tx.update(g, opt, params)
        return loss, (apply(params, u), opt)

    return step


def lazy_step(loss_fn, tx):
    """``value_and_sparse_grad`` + ``lazy(tx)`` + ``optim.apply_updates``."""

    def step(state, *data):
        params, opt = state
        loss, g = value_and_sparse_grad(loss_fn)(params, *data)
        u, opt = tx.update(g, opt, params)
        return loss, (apply_updates(params, u), opt)

    return step


def _swap(step):
    """Puts the loss second so that ``Contender`` finds the new state at ``out[1]``."""

    def f(state, *data):
        loss, new = step(state, *data)
        return loss, new

    return f


def zipf_ids(rng, n, size, a=1.1):
    """``size`` Zipf-distributed ids in ``[0, n)`` (rank 0 the most frequent)."""
    ids = rng.zipf(a, size=size * 2)
    ids = ids[ids <= n][:size] - 1
    while ids.size < size:
        more = rng.zipf(a, size=size)
        ids = np.concatenate([ids, more[more <= n] - 1])[:size]
    return ids.astype(np.int32)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def full_softmax_loss(params, x, t):
    logits = x @ params["W"] + params["b"]
    return jnp.mean(
        jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, t[:, None], 1)[:, 0]
    )


def bench_hsoftmax(
    vocab, batch, *, warmup, repeats, full=True, dense=True, default_lazy=True, targets="uniform"
):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, WIDTH)), jnp.float32)
    if targets == "uniform":  # every class equally likely: the most blocks a step can touch
        t = jnp.asarray(rng.integers(0, vocab, batch), jnp.int32)
    else:  # Zipf over the output ids (frequent words share the first classes)
        t = jnp.asarray(zipf_ids(rng, vocab, batch))
    key = jax.random.key(0)
    C_train = training_classes(vocab, n_in=WIDTH, batch=batch)
    adam = optax.adam(LR)
    ltx = lazy(optax.adam(LR))
    loss = lambda p, x, t: h_softmax_loss(x, p, t, n_outputs=vocab)
    row = {"vocab": vocab, "batch": batch, "width": WIDTH, "training_classes": C_train}
    row["targets"] = targets
    contenders = []
    shapes = jax.eval_shape(lambda: h_softmax_init(key, WIDTH, vocab))
    row["default_classes"] = int(shapes.W1.shape[1])
    row["W2_bytes"] = int(np.prod(shapes.W2.shape) * 4)
    classes = np.asarray(t) // shapes.W2.shape[2]
    row["touched_fraction_default"] = float(np.unique(classes).size / shapes.W1.shape[1])
    if dense:
        pd = h_softmax_init(key, WIDTH, vocab)
        contenders.append(
            Contender("dense_adam", dense_step(loss, adam), (pd, adam.init(pd)), (x, t))
        )
    else:  # compiled only (memory analysis), not run
        st = (shapes, jax.eval_shape(adam.init, shapes))
        c = compile_stats(jax.jit(dense_step(loss, adam), donate_argnums=0), st, x, t)
        row["dense_adam_temp_bytes_compiled_only"] = c["temp_bytes"]
    if default_lazy:
        p0 = h_softmax_init(key, WIDTH, vocab)
        contenders.append(Contender("lazy_adam", lazy_step(loss, ltx), (p0, ltx.init(p0)), (x, t)))
    else:
        st = (shapes, jax.eval_shape(ltx.init, shapes))
        c = compile_stats(jax.jit(lazy_step(loss, ltx), donate_argnums=0), st, x, t)
        row["lazy_adam_temp_bytes_compiled_only"] = c["temp_bytes"]
    pt = h_softmax_init(key, WIDTH, vocab, n_classes=C_train)
    row["touched_fraction_training"] = float(
        np.unique(np.asarray(t) // pt.W2.shape[2]).size / C_train
    )
    contenders.append(
        Contender("lazy_adam_training_classes", lazy_step(loss, ltx), (pt, ltx.init(pt)), (x, t))
    )
    if full:
        pf = {
            "W": jax.random.normal(key, (WIDTH, vocab), jnp.float32) / np.sqrt(WIDTH),
            "b": jnp.zeros((vocab,), jnp.float32),
        }
        contenders.append(
            Contender(
                "full_softmax_adam",
                dense_step(full_softmax_loss, adam),
                (pf, adam.init(pf)),
                (x, t),
            )
        )

    # h_softmax_sgd_step as the README documents it: (loss, params, dx) kept.
    def sgd(params, x, t):
        loss, params, dx = h_softmax_sgd_step(x, params, t, 0.1, n_outputs=vocab)
        return loss, params, dx

    sgd_c = compile_stats(jax.jit(sgd, donate_argnums=0), shapes, x, t)
    row["sgd_step_temp_bytes"] = sgd_c["temp_bytes"]

    row["settle_s"] = SETTLE_S
    row["ms"] = race(contenders, warmup=warmup, repeats=repeats, settle_s=SETTLE_S)
    row["temp_bytes"] = {c.name: int(c.temp) for c in contenders}
    row["compile_s"] = {c.name: round(c.compile_s, 2) for c in contenders}
    ms = row["ms"]
    if "dense_adam" in ms and "lazy_adam" in ms:
        row["speedup_lazy_vs_dense"] = ms["dense_adam"] / ms["lazy_adam"]
        row["speedup_training_vs_dense"] = ms["dense_adam"] / ms["lazy_adam_training_classes"]
    if "full_softmax_adam" in ms and "lazy_adam_training_classes" in ms:
        row["speedup_training_vs_full"] = ms["full_softmax_adam"] / ms["lazy_adam_training_classes"]
    return row


LAYERS = {
    # (batch, i_blocks, o_blocks, i_win, o_win, i_size, o_size): bench_gemv's regimes
    "S1": (512, 1, 1000, 1, 1, 256, 1000),
    "S2": (256, 32, 32, 4, 4, 128, 128),
    "S3": (64, 8, 8, 2, 2, 512, 512),
    "S4": (1024, 256, 256, 8, 8, 16, 16),
    "E1": (256, 1, 65536, 1, 1, 128, 16),  # embedding-like: many blocks, few touched
}


def layer_problem(shape):
    """``(W, b, h, ii, oi, loss(params, h))`` of a layer of ``LAYERS``' shape, random windows."""
    batch, ib, ob, iw, ow, isz, osz = shape
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.standard_normal((ib, ob, isz, osz)) / np.sqrt(isz * iw), jnp.float32)
    b = jnp.zeros((ob, osz), jnp.float32)
    h = jnp.asarray(rng.standard_normal((batch, iw, isz)), jnp.float32)
    ii = jnp.asarray(rng.integers(0, ib, (batch, iw)), jnp.int32)
    oi = jnp.asarray(rng.integers(0, ob, (batch, ow)), jnp.int32)
    loss = lambda p, h: jnp.mean(jnp.tanh(sparse_block_dot(p["W"], h, ii, p["b"], oi)) ** 2)
    return W, b, h, ii, oi, loss


def bench_layer(name, shape, *, warmup, repeats):
    _, ib, ob, *_ = shape
    W, b, h, ii, oi, loss = layer_problem(shape)
    adam, ltx = optax.adam(LR), lazy(optax.adam(LR))
    pd = {"W": W, "b": b}
    pl = {"W": W + 0, "b": b + 0}
    cs = [
        Contender("dense_adam", dense_step(loss, adam), (pd, adam.init(pd)), (h,)),
        Contender("lazy_adam", lazy_step(loss, ltx), (pl, ltx.init(pl)), (h,)),
    ]
    pairs = np.unique(np.asarray(ii)[:, :, None] * ob + np.asarray(oi)[:, None, :])
    row = {"layer": name, "shape": shape, "touched_fraction": float(pairs.size / (ib * ob))}
    row["settle_s"] = SETTLE_S
    row["ms"] = race(cs, warmup=warmup, repeats=repeats, settle_s=SETTLE_S)
    row["temp_bytes"] = {c.name: int(c.temp) for c in cs}
    row["speedup"] = row["ms"]["dense_adam"] / row["ms"]["lazy_adam"]
    return row


def bench_embedding(n, d, lookups, *, warmup, repeats):
    rng = np.random.default_rng(2)
    ids = jnp.asarray(zipf_ids(rng, n, lookups))
    w = jnp.asarray(rng.standard_normal((d,)), jnp.float32)
    table = jnp.asarray(rng.standard_normal((n, d)) * 0.1, jnp.float32)
    loss = lambda p, ids, w: jnp.mean(jnp.tanh(embedding_lookup(p, ids) @ w))
    adam, ltx = optax.adam(LR), lazy(optax.adam(LR))
    t2 = table + 0
    cs = [
        Contender("dense_adam", dense_step(loss, adam), (table, adam.init(table)), (ids, w)),
        Contender("lazy_adam", lazy_step(loss, ltx), (t2, ltx.init(t2)), (ids, w)),
    ]
    row = {
        "table": [n, d],
        "lookups": lookups,
        "distinct": int(np.unique(np.asarray(ids)).size),
        "temp_bytes": {c.name: int(c.temp) for c in cs},
    }
    torch_c = _torch_contender(np.asarray(table), np.asarray(ids), np.asarray(w))
    if torch_c is not None:
        cs.append(torch_c)
        row["torch_threads"] = torch_c.torch.get_num_threads()
    row["settle_s"] = SETTLE_S
    row["repeats"] = repeats
    row["ms"] = race(cs, warmup=warmup, repeats=repeats, settle_s=SETTLE_S)
    ms = row["ms"]
    row["speedup_lazy_vs_dense"] = ms["dense_adam"] / ms["lazy_adam"]
    if "torch_sparse_adam" in ms:
        row["lazy_vs_torch"] = ms["torch_sparse_adam"] / ms["lazy_adam"]
    return row


class _TorchContender:
    name = "torch_sparse_adam"

    def __init__(self, torch, table, ids, w):
        # One thread: PyTorch's fastest setting on this 2-core machine (its two OpenMP threads
        # and JAX's thread pool contend when they alternate in one process).
        torch.set_num_threads(1)
        self.torch = torch
        self.emb = torch.nn.Embedding(*table.shape, sparse=True)
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(table.copy()))
        self.opt = torch.optim.SparseAdam(self.emb.parameters(), lr=LR)
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.w = torch.from_numpy(np.array(w))  # a writable copy

    def run(self):
        """One step (synchronous on the CPU); nothing for ``block_until_ready`` to wait on."""
        self.opt.zero_grad()
        loss = torch_tanh_mean(self.torch, self.emb(self.ids) @ self.w)
        loss.backward()
        self.opt.step()


def torch_tanh_mean(torch, y):
    return torch.mean(torch.tanh(y))


def _torch_contender(table, ids, w):
    try:
        import torch
    except ImportError:
        return None
    return _TorchContender(torch, table, ids, w)


# --------------------------------------------------------------------------------------


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in results.get("hsoftmax", []) if r["batch"] == 256]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("dense_adam", "lazy_adam", "lazy_adam_training_classes", "full_softmax_adam"):
        pts = [(r["vocab"], r["ms"][name]) for r in rows if name in r["ms"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary")
    ax.set_ylabel("step time (ms), batch 256, width 128")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="small sizes, few repeats; writes no results"
    )
    p.add_argument("--sections", default="hsoftmax,layers,embedding")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument(
        "--targets",
        default="uniform",
        choices=("uniform", "zipf"),
        help="h_softmax targets: uniform (most classes touched) or Zipf",
    )
    p.add_argument("--out", default=os.path.join(HERE, "bench_sparse_training.json"))
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    warmup, repeats = (1, 3) if args.quick else (2, args.repeats)
    results = {"machine": {"devices": str(jax.devices()), "jax": jax.__version__}}
    if "hsoftmax" in sections:
        grid = (
            [(16_384, 256)]
            if args.quick
            else [
                (65_536, 256),
                (589_824, 64),
                (589_824, 256),
                (589_824, 1_024),
                (4_194_304, 256),
            ]
        )
        results["hsoftmax"] = []
        for vocab, batch in grid:
            big = vocab > 1_000_000  # W2 of 2 GiB: only the training-classes lazy step runs
            row = bench_hsoftmax(
                vocab,
                batch,
                warmup=warmup,
                repeats=repeats,
                full=batch == 256 and not big,
                dense=not big,
                default_lazy=not big,
                targets=args.targets,
            )
            print(json.dumps(row), flush=True)
            results["hsoftmax"].append(row)
    if "layers" in sections:
        results["layers"] = []
        for name, shape in LAYERS.items():
            if args.quick and name != "S2":
                continue
            row = bench_layer(name, shape, warmup=warmup, repeats=repeats)
            print(json.dumps(row), flush=True)
            results["layers"].append(row)
    if "embedding" in sections:
        n = 65_536 if args.quick else 4_194_304
        row = bench_embedding(n, 64, 4_096, warmup=warmup, repeats=repeats)
        print(json.dumps(row), flush=True)
        results["embedding"] = row
    if args.quick:  # a smoke test: the committed results stay
        return
    if os.path.exists(args.out):  # keep the sections this run did not measure
        with open(args.out) as f:
            results = {**json.load(f), **results}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    _plot(results, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
