"""Output heads at 589,824 words: the logits-free exact softmax against the naive one, PyTorch
and Cut Cross-Entropy; the gradient filter on a peaked distribution; training steps.

Batch 256, width 128, float32, no bias, targets drawn from Zipf's law (``p(rank
r) ~ 1 / r``, the ids sorted by frequency).  Three races, each alternated in
one process (``time_round_robin``), medians reported with ratios taken in the
same run:

* **gradient**: the value and the gradient (``x`` and ``W``) of the mean
  cross-entropy, as

  - ``naive_jax``: ``logsumexp(x @ W) - (x @ W)[target]`` under
    ``jax.value_and_grad`` (the ``(batch, vocab)`` logits in memory);
  - ``full``: :func:`blocksparse_jax.full_softmax_loss` (logits-free);
  - ``torch_eager``: PyTorch's ``F.cross_entropy(F.linear(x, W))`` and
    ``torch.autograd.grad``, eager (torch installed);
  - ``cce_torch_compile``: ``cut_cross_entropy.linear_cross_entropy(x, W,
    target, impl="torch_compile")`` (Cut Cross-Entropy's CPU path: a compiled
    PyTorch graph that builds the logits; the package installed).

* **filter**: the gradient filter on two *peaked* problems: ``x = [1, u]`` with
  ``u`` a random unit vector; ``W``'s first row ``log p(rank)`` for a prior
  ``p(rank) ~ rank**-exponent``, the others ``N(0, 0.1**2)``; targets drawn
  from the prior, and ``boost * u[b]`` added to the column of example ``b``'s
  target.  ``zipf1`` (exponent 1, boost 6: a mean cross-entropy of 4.4 nats,
  like the demo's model after training, with the heavy tail of a unigram
  prior) and ``zipf2`` (exponent 2, boost 2: 1.35 nats, a confident model).
  For each and each ``filter_eps`` in ``FILTER_EPS``, by the library's rule
  and by Cut Cross-Entropy's (:func:`filter_analysis`): the share of the
  chunks kept, the probability left out, and the gradient's error against the
  exact one.  On ``zipf2``, the gradient unfiltered and with each
  ``filter_eps`` is timed beside ``cce_torch_compile`` (its CPU path has no
  filter).

* **steps**: one training step with Adam, parameters and optimizer state
  donated, timed as a training loop runs it: in each round each contender
  makes at least ``STEP_BURST`` steps in a row, and as many as fill
  ``STEP_BURST_S`` seconds, and the second half of them are timed (the steps
  just after the 0.2 s pause that separates contenders run slower for a few
  steps); the first step after the pause is reported apart
  (``ms_after_pause``).  The contenders: the exact softmax
  (``full_softmax_loss`` + dense ``optax.adam``, ``W`` in both layouts; the
  ratios are taken against the column layout and against the faster of the
  two), the sampled softmax (1,024 classes, ``sampled_softmax_loss``) with
  dense ``optax.adam`` and with ``value_and_sparse_grad`` +
  ``lazy(optax.adam)``, the latter in both layouts
  (``FullSoftmaxParams``, ``W (n_in, n_outputs)``, and
  ``FullSoftmaxRowParams``, ``W (n_outputs, n_in)``), and the hierarchical
  softmax (``h_softmax_loss`` over ``training_classes`` classes, the count
  recommended for training, ``value_and_sparse_grad`` + ``lazy(optax.adam)``).

With ``--dots`` also XLA's speed on the three matrix products of the
gradient, a chunk of 4,096 outputs at a time over the whole vocabulary
(``x @ W_c``, ``G @ W_c^T``, ``x^T @ G``; :func:`dots_race`).  Results are printed and written to ``bench_heads.json`` next to
this file.

    python3 -m benchmarks.bench_heads [--quick] [--rounds N] [--dots]
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
    FullSoftmaxParams,
    full_softmax_loss,
    h_softmax_init,
    h_softmax_loss,
    sampled_softmax_loss,
    value_and_sparse_grad,
)

VOCAB, BATCH, WIDTH = 589_824, 256, 128
QUICK_VOCAB = 65_536
FILTER_EPS = (1e-8, 1e-6, 1e-4)
N_SAMPLED = 1024
DOT_CHUNK = 4096
# Seconds of pause after every timed call: XLA's worker threads keep spinning for a while
# after a call returns, and a PyTorch call started then runs several times slower.
SETTLE_S = 0.2
# Steps in a row per contender and round in the steps race: at least this many, and
# as many as fill this many seconds; the second half of them are timed.
STEP_BURST = 3
STEP_BURST_S = 0.5


def zipf_targets(vocab: int, batch: int, rng) -> np.ndarray:
    p = 1.0 / np.arange(1, vocab + 1)
    return rng.choice(vocab, size=batch, p=p / p.sum()).astype(np.int32)


def random_problem(vocab, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, WIDTH)).astype(np.float32)
    W = (rng.standard_normal((WIDTH, vocab)) / math.sqrt(WIDTH)).astype(np.float32)
    return x, W, zipf_targets(vocab, BATCH, rng)


def peaked_problem(vocab, exponent, boost, seed=0, noise=0.1):
    """See the module's docstring: a prior ``rank**-exponent``, targets drawn from it, boosted."""
    rng = np.random.default_rng(seed)
    prior = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    prior /= prior.sum()
    t = rng.choice(vocab, size=BATCH, p=prior).astype(np.int32)
    u = rng.standard_normal((BATCH, WIDTH - 1))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x = np.concatenate([np.ones((BATCH, 1)), u], axis=1).astype(np.float32)
    W = np.empty((WIDTH, vocab), np.float32)
    W[0] = np.log(prior)
    W[1:] = noise * rng.standard_normal((WIDTH - 1, vocab))
    np.add.at(W[1:].T, t, boost * u)
    return x, W, t


#: The filter race's problems: name -> (exponent, boost).
PEAKED = {"zipf1": (1.0, 6.0), "zipf2": (2.0, 2.0)}
#: The one the race times (the other is analysed only).
TIMED = "zipf2"


def naive_loss(x, W, t):
    logits = x @ W
    picked = jnp.take_along_axis(logits, t[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)


def jax_grad(loss, x, W, t):
    """A jitted runner of ``value_and_grad(loss)`` w.r.t. ``x`` and ``W``, and its compile stats."""
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    args = (jnp.asarray(x), jnp.asarray(W), jnp.asarray(t))
    stats = compile_stats(f, *args)
    return call(f, *args), stats


def full_grad(x, W, t, **kw):
    return jax_grad(
        lambda x, W, t: full_softmax_loss(x, FullSoftmaxParams(W, None), t, **kw), x, W, t
    )


def torch_contenders(x, W, t, *, cce: bool):
    """``{name: runner}`` of PyTorch's eager loss and Cut Cross-Entropy's CPU path, if installed."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}, "torch not installed"
    xt = torch.from_numpy(x).requires_grad_(True)
    Wt = torch.from_numpy(np.ascontiguousarray(W.T)).requires_grad_(True)  # (vocab, width)
    tt = torch.from_numpy(t.astype(np.int64))

    def eager():
        loss = F.cross_entropy(F.linear(xt, Wt), tt)
        return loss, *torch.autograd.grad(loss, [xt, Wt])

    runners, note = {"torch_eager": eager}, f"torch {torch.__version__}"
    if cce:
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            return runners, note + f"; cut-cross-entropy not importable ({e})"

        def cce_compiled():
            loss = linear_cross_entropy(xt, Wt, tt, impl="torch_compile")
            return loss, *torch.autograd.grad(loss, [xt, Wt])

        runners["cce_torch_compile"] = cce_compiled
    return runners, note


def _median_ms(times):
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def gradient_race(vocab, *, warmup, rounds):
    x, W, t = random_problem(vocab)
    runners, stats = {}, {}
    runners["naive_jax"], stats["naive_jax"] = jax_grad(naive_loss, x, W, t)
    runners["full"], stats["full"] = full_grad(x, W, t)
    torch_runners, note = torch_contenders(x, W, t, cce=True)
    runners.update(torch_runners)
    ms = _median_ms(time_round_robin(runners, warmup=warmup, repeats=rounds, settle_s=SETTLE_S))
    row = dict(race="gradient", vocab=vocab, batch=BATCH, width=WIDTH, torch=note, ms=ms)
    row["temp_mb"] = {k: s["temp_bytes"] / 2**20 for k, s in stats.items()}
    row["compile_s"] = {k: s["compile_s"] for k, s in stats.items()}
    row["full_speedup"] = {k: v / ms["full"] for k, v in ms.items()}
    return row


def filter_analysis(x, W, b, t, eps: float, chunk: int) -> dict:
    """What the gradient filter leaves out at ``eps``, by our rule and by Cut Cross-Entropy's.

    ``mass`` (``full_softmax_loss(filter_eps=eps)``): the chunks of least
    probability are skipped while, for every example, the probability they
    hold together stays at most ``eps``.  ``entry`` (Cut Cross-Entropy's):
    every chunk whose softmax is below ``eps`` for every example is skipped.
    For each rule: the share of the chunks kept, the probability each example
    has in the skipped chunks (mean and largest), and the error of the mean
    loss's gradient (``W`` and ``x``) against the exact one: relative
    Frobenius norm.  ``library_vs_mass``: the largest difference between
    ``full_softmax_loss``'s filtered gradient of ``W`` and the ``mass`` rule's
    reference (float32 rounding).
    """
    V = W.shape[1]
    n_chunks = -(-V // chunk)

    @jax.jit
    def stats(x, W, b):
        z = x @ W if b is None else x @ W + b[None, :]
        p = jax.nn.softmax(z, axis=1)
        padded = jnp.pad(p, ((0, 0), (0, n_chunks * chunk - V))).reshape(-1, n_chunks, chunk)
        return padded.sum(2), padded.max(2)

    mass, peak = (np.asarray(a, np.float64) for a in stats(x, W, b))
    worst = mass.max(0)
    order = np.argsort(worst, kind="stable")
    kept_mass = np.ones(n_chunks, bool)
    kept_mass[order] = ~(np.cumsum(worst[order]) <= eps)
    rules = {"mass": kept_mass, "entry": (peak >= eps).any(0)}

    @jax.jit
    def masked_grads(x, W, b, keep_cols):
        def loss(x, W):
            z = x @ W if b is None else x @ W + b[None, :]
            lse = jax.nn.logsumexp(z, axis=1)
            p = jax.lax.stop_gradient(jnp.exp(z - lse[:, None]))
            # The gradient of this surrogate is the mean loss's with p replaced by p * keep_cols.
            picked = jnp.take_along_axis(z, t[:, None], axis=1)[:, 0]
            return jnp.mean(jnp.sum(p * keep_cols[None, :] * z, axis=1) - picked)

        return jax.grad(loss, argnums=(0, 1))(x, W)

    exact = masked_grads(x, W, b, jnp.ones((V,), jnp.float32))
    out = {"chunk": chunk}
    for name, kept in rules.items():
        keep_cols = jnp.asarray(np.repeat(kept, chunk)[:V], jnp.float32)
        dropped = mass[:, ~kept].sum(1)
        got = masked_grads(x, W, b, keep_cols)
        row = {
            "chunks_kept": float(kept.mean()),
            "dropped_mass_mean": float(dropped.mean()),
            "dropped_mass_max": float(dropped.max()),
        }
        for label, a, e in (("W", got[1], exact[1]), ("x", got[0], exact[0])):
            a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
            row[f"{label}_rel"] = float(np.linalg.norm(a - e) / np.linalg.norm(e))
        out[name] = row
        if name == "mass":
            lib = jax.jit(
                jax.grad(
                    lambda W: full_softmax_loss(
                        x, FullSoftmaxParams(W, b), t, filter_eps=eps, chunk_size=chunk
                    )
                )
            )(W)
            out["library_vs_mass"] = float(np.max(np.abs(np.asarray(lib) - np.asarray(got[1]))))
    return out


def filter_race(vocab, *, warmup, rounds):
    from blocksparse_jax.full import _core

    chunk = _core.chunk_size(BATCH, vocab)
    row = dict(race="filter", vocab=vocab, batch=BATCH, width=WIDTH, chunk=chunk, problems={})
    for name, (exponent, boost) in PEAKED.items():
        x, W, t = (jnp.asarray(a) for a in peaked_problem(vocab, exponent, boost))
        row["problems"][name] = dict(
            exponent=exponent,
            boost=boost,
            mean_nll=float(jax.jit(naive_loss)(x, W, t)),
            errors={f"{eps:g}": filter_analysis(x, W, None, t, eps, chunk) for eps in FILTER_EPS},
        )
    x, W, t = peaked_problem(vocab, *PEAKED[TIMED])
    runners = {}
    runners["full_peaked"], _ = full_grad(x, W, t)
    for eps in FILTER_EPS:
        runners[f"filtered_{eps:g}"], _ = full_grad(x, W, t, filter_eps=eps)
    torch_runners, note = torch_contenders(x, W, t, cce=True)
    if "cce_torch_compile" in torch_runners:
        runners["cce_torch_compile"] = torch_runners["cce_torch_compile"]
    ms = _median_ms(time_round_robin(runners, warmup=warmup, repeats=rounds, settle_s=SETTLE_S))
    row.update(timed=TIMED, torch=note, ms=ms)
    row["speedup_over_unfiltered"] = {k: ms["full_peaked"] / v for k, v in ms.items()}
    return row


def steps_race(vocab, *, warmup, rounds):
    import optax

    from blocksparse_jax.optim import lazy, training_classes

    x, W, t = random_problem(vocab)
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    params = FullSoftmaxParams(jnp.asarray(W), jnp.zeros((vocab,), jnp.float32))
    adam = optax.adam(1e-3)
    dense_step = lambda loss_fn: adam_step(loss_fn, lazily=False)
    lazy_step = lambda loss_fn: adam_step(loss_fn, lazily=True)
    exact = dense_step(lambda p, key: full_softmax_loss(xj, p, tj))
    rows = params.to_rows()
    sampled_loss = lambda p, key: sampled_softmax_loss(key, xj, p, tj, n_sampled=N_SAMPLED)
    sampled = dense_step(sampled_loss)
    tx = lazy(adam)
    sampled_lazy = lazy_step(sampled_loss)
    n_classes = training_classes(vocab, n_in=WIDTH, batch=BATCH)  # the recommended count
    hs_params = h_softmax_init(jax.random.key(1), WIDTH, vocab, n_classes=n_classes)
    hs_step = lazy_step(lambda p: h_softmax_loss(xj, p, tj))
    key = jax.random.key(2)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    runners = {
        "exact_adam": _step_runner(exact, copy(params), adam.init(params), key),
        "exact_adam_rows": _step_runner(exact, copy(rows), adam.init(rows), key),
        "sampled_adam": _step_runner(sampled, copy(params), adam.init(params), key),
        "sampled_lazy_adam": _step_runner(sampled_lazy, copy(params), tx.init(params), key),
        "sampled_lazy_adam_rows": _step_runner(sampled_lazy, copy(rows), tx.init(rows), key),
        "hsoftmax_lazy_adam": _step_runner(hs_step, hs_params, tx.init(hs_params)),
    }
    first: dict[str, list[float]] = {}
    times = time_round_robin(
        runners,
        warmup=warmup,
        repeats=rounds,
        settle_s=SETTLE_S,
        burst=STEP_BURST,
        burst_s=STEP_BURST_S,
        first_calls=first,
    )
    ms, ms_after_pause = _median_ms(times), _median_ms(first)
    row = dict(
        race="steps",
        vocab=vocab,
        batch=BATCH,
        width=WIDTH,
        n_sampled=N_SAMPLED,
        hsoftmax_classes=n_classes,
        burst=STEP_BURST,
        burst_s=STEP_BURST_S,
        ms=ms,
        ms_after_pause=ms_after_pause,
    )
    row["exact_adam_over"] = {k: ms["exact_adam"] / v for k, v in ms.items()}
    row["exact_adam_over_after_pause"] = {
        k: ms_after_pause["exact_adam"] / v for k, v in ms_after_pause.items()
    }
    fastest_exact = min(ms["exact_adam"], ms["exact_adam_rows"])
    row["fastest_exact_adam_over"] = {k: fastest_exact / v for k, v in ms.items()}
    return row


def adam_step(loss_fn, *, lazily: bool):
    """``loss_fn(params, *key)``'s jitted Adam step, parameters and state donated.

    Dense: ``jax.value_and_grad`` + ``optax.adam``; ``lazily``:
    ``value_and_sparse_grad`` + ``lazy(optax.adam)`` + ``optim.apply_updates``.
    The step returns ``(params, opt_state, loss)``.
    """
    import optax

    from blocksparse_jax.optim import apply_updates, lazy

    tx = lazy(optax.adam(1e-3)) if lazily else optax.adam(1e-3)
    grad_fn = value_and_sparse_grad if lazily else jax.value_and_grad
    apply = apply_updates if lazily else optax.apply_updates

    def step(params, opt_state, *key):
        loss, grads = grad_fn(loss_fn)(params, *key)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return apply(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _step_runner(step, params, opt_state, *extra):
    state = [params, opt_state]

    def run():
        out = step(state[0], state[1], *extra)
        state[0], state[1] = out[0], out[1]
        return out

    return run


def dots_race(vocab, *, warmup, rounds):
    """The three products of the logits-free gradient, a chunk at a time over the vocabulary.

    Each loop computes one product per chunk of ``DOT_CHUNK`` columns, as the
    gradient does: ``x @ W_c`` (summed, so that it is used), ``G @ W_c^T``
    (accumulated) and ``x^T @ G`` (written into a ``W``-shaped buffer).  ``G``
    is a different slice of a wider array at every chunk, so that XLA cannot
    hoist a product out of the loop.
    """
    from jax import lax

    x, W, _ = random_problem(vocab)
    n = vocab // DOT_CHUNK
    G = np.random.default_rng(1).standard_normal((BATCH, DOT_CHUNK + 64)).astype(np.float32)
    xj, Wj, Gj = jnp.asarray(x), jnp.asarray(W), jnp.asarray(G)

    def loop(body, init):
        return jax.jit(lambda *a: lax.fori_loop(0, n, lambda i, acc: body(i, acc, *a), init))

    def W_c(W, i):
        return lax.dynamic_slice_in_dim(W, i * DOT_CHUNK, DOT_CHUNK, axis=1)

    def G_c(G, i):
        return lax.dynamic_slice_in_dim(G, i % 64, DOT_CHUNK, axis=1)

    def logits(i, acc, x, W):
        return acc + jnp.sum(x @ W_c(W, i), axis=1)

    def dx(i, acc, G, W):
        return acc + G_c(G, i) @ W_c(W, i).T

    def dW(i, acc, x, G):
        return lax.dynamic_update_slice_in_dim(acc, x.T @ G_c(G, i), i * DOT_CHUNK, axis=1)

    runners = {
        "x_Wc": call(loop(logits, jnp.zeros((BATCH,))), xj, Wj),
        "G_WcT": call(loop(dx, jnp.zeros((BATCH, WIDTH))), Gj, Wj),
        "xT_G": call(loop(dW, jnp.zeros((WIDTH, vocab))), xj, Gj),
    }
    ms = _median_ms(time_round_robin(runners, warmup=warmup, repeats=rounds))
    flop = 2.0 * BATCH * WIDTH * vocab
    return dict(
        race="dots",
        vocab=vocab,
        chunk=DOT_CHUNK,
        ms=ms,
        gflops={k: flop / (v * 1e-3) / 1e9 for k, v in ms.items()},
    )


def print_filter(eps, e: dict) -> None:
    for rule in ("mass", "entry"):
        r = e[rule]
        print(
            f"  eps {eps} ({rule} rule): chunks kept {r['chunks_kept']:.1%}, dropped probability "
            f"{r['dropped_mass_mean']:.1e} (max {r['dropped_mass_max']:.1e}), W rel err "
            f"{r['W_rel']:.1e}, x rel err {r['x_rel']:.1e}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_VOCAB:,} words (a smoke test)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--races", default="gradient,filter,steps")
    p.add_argument("--dots", action="store_true", help="also XLA's speed on the three products")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bench_heads.json"))
    args = p.parse_args(argv)
    vocab = QUICK_VOCAB if args.quick else VOCAB
    races = args.races.split(",") + (["dots"] if args.dots else [])
    funcs = dict(gradient=gradient_race, filter=filter_race, steps=steps_race, dots=dots_race)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"vocab {vocab:,}, batch {BATCH}, width {WIDTH}, float32; medians of {args.rounds} "
        f"alternating rounds after {args.warmup} warm-up call(s)"
    )
    rows, load_start = [], os.getloadavg()
    for race in races:
        race_load = os.getloadavg()
        row = funcs[race](vocab, warmup=args.warmup, rounds=args.rounds)
        row["rounds"] = args.rounds
        row["load_average"] = {"start": race_load, "end": os.getloadavg()}
        rows.append(row)
        print(f"\n[{race}]")
        for name, v in row["ms"].items():
            pause = row.get("ms_after_pause", {}).get(name)
            after = f"   ({pause:.1f} ms after a pause)" if pause is not None else ""
            print(f"  {name:22} {v:10.1f} ms{after}")
        for key in (
            "full_speedup",
            "speedup_over_unfiltered",
            "exact_adam_over",
            "exact_adam_over_after_pause",
            "fastest_exact_adam_over",
            "gflops",
        ):
            if key in row:
                print(f"  {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in row[key].items()))
        for name, prob in row.get("problems", {}).items():
            print(
                f"  {name} (prior rank**-{prob['exponent']:g}, boost {prob['boost']:g}): mean "
                f"NLL {prob['mean_nll']:.2f} nats"
            )
            for eps, e in prob["errors"].items():
                print_filter(eps, e)
        print(flush=True)
    result = dict(
        benchmark="output_heads",
        machine=machine_info(),
        rounds=args.rounds,
        rows=rows,
        load_average={"start": load_start, "end": os.getloadavg()},
        note="each row carries the rounds and the load average of the run that measured it",
    )
    if not args.quick:
        if os.path.exists(args.out):  # keep the races this run did not measure
            with open(args.out) as fh:
                kept = [r for r in json.load(fh).get("rows", []) if r.get("race") not in races]
            result["rows"] = kept + rows
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
