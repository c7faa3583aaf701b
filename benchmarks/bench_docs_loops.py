"""The training loops of the README and the guides, timed as they are written.

Each documented loop's code block is run from its markdown file (so what is
timed cannot drift from what users read), then its step function is timed on
the block's own arrays, feeding each step's outputs into the next as the loop
does, against:

* ``dense``: the same loss with ``jax.value_and_grad`` + ``optax.adam`` +
  ``optax.apply_updates``, jitted with parameters and optimizer state donated;
* ``plain``: for the layers guide's Flax and Equinox scripts, the same step
  written with the functional API (``embedding_lookup`` + ``h_softmax_loss`` on
  plain arrays) in a plain donated ``jax.jit``: the framework's overhead.

Cases (the docs' own sizes, and the recommender table of the sparse-training
guide's opening step at 1,000,000 x 32):

* ``readme``: the README's ``train_step`` (hierarchical softmax, 100,000
  words, batch 64, lazy Adam);
* ``guide_lm``: the sparse-training guide's language model (``lazy_train_step``,
  65,536 words, batch 256);
* ``guide_rnn``: its recurrent language model (``lax.scan`` over 8 steps);
* ``flax``, ``equinox``: the layers guide's sparse scripts (Embed + HSoftmax);
* ``table``: the README's ``train_step`` on a 1,000,000 x 32 embedding table
  looked up 4,096 times (Zipf ids), lazy Adam;
* ``heads_sampled``: the heads guide's sampled softmax trained lazily (``W``
  in rows, 50,000 words, batch 32, 512 samples; one key for every step).

Medians of alternated calls (``benchmarks._timing.time_round_robin``), an
untimed pause after every call.  Run::

    python3 -m benchmarks.bench_docs_loops [--cases readme,flax,...] [--repeats 15]

Results go to ``bench_docs_loops.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._machine import machine_info
from benchmarks._timing import compile_stats, time_round_robin

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTLE_S = 0.2


def blocks(page: str) -> list[tuple[str | None, str]]:
    """``(title, code)`` of every python block of a markdown page."""
    text = open(os.path.join(ROOT, page)).read()
    pattern = r'```python(?: title="([^"]+)")?\n(.*?)```'
    return [(m.group(1), m.group(2)) for m in re.finditer(pattern, text, re.S)]


def run_block(code: str, ns: dict | None = None, *, replace: dict | None = None) -> dict:
    """Runs a block (its loop shortened to 3 steps) in ``ns``; returns the namespace."""
    ns = {} if ns is None else ns
    code = re.sub(r"range\(100\)", "range(3)", code)
    for old, new in (replace or {}).items():
        code = code.replace(old, new)
    exec(compile(code, "<doc block>", "exec"), ns)
    return ns


def carried(step, state: list, rest: tuple, n_state: int):
    """A runner of ``step(*state, *rest)`` whose first ``n_state`` outputs feed the next call."""

    def run():
        out = step(*state, *rest)
        state[:] = list(out[:n_state])
        return out

    return run


def dense_twin(loss_fn, params, rest):
    """``loss_fn``'s step with dense gradients and ``optax.adam``, jitted and donated."""
    tx = optax.adam(1e-3)

    def step(params, opt_state, *data):
        loss, g = jax.value_and_grad(loss_fn)(params, *data)
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params)
    return step, [params, tx.init(params)], rest


# --------------------------------------------------------------------------------------
# Cases: each returns {name: (step, state, rest)}
# --------------------------------------------------------------------------------------


def _readme_ns():
    ns: dict = {}
    for _, code in blocks("README.md"):
        if "train_step" in code or "h_softmax_init" in code and "V, n_in, batch" in code:
            run_block(code, ns)
    return ns


def case_readme():
    ns = _readme_ns()
    step, state = ns["train_step"], [ns["params"], ns["opt_state"]]
    rest = (ns["x"], ns["target"])
    return {
        "documented (lazy)": (step, state, rest),
        "dense": dense_twin(ns["loss_fn"], ns["params"], rest),
    }


def case_table():
    from benchmarks.bench_sparse_training import zipf_ids
    from blocksparse_jax import embedding_lookup

    ns = _readme_ns()
    rng = np.random.default_rng(0)
    n, d = 1_000_000, 32
    table = jnp.asarray(rng.standard_normal((n, d)) * 0.1, jnp.float32)
    ids = jnp.asarray(zipf_ids(rng, n, 4096))
    w = jnp.asarray(rng.standard_normal((d,)), jnp.float32)
    loss_fn = lambda p, ids, w: jnp.mean(jnp.tanh(embedding_lookup(p, ids) @ w))
    # The README's train_step, its loss swapped for the table's.
    code = next(c for _, c in blocks("README.md") if "def train_step" in c)
    code = code.replace("loss_fn = lambda p, x, t: h_softmax_loss(x, p, t)\n", "")
    code = code.replace("params, opt_state, loss = train_step(params, opt_state, x, target)", "")
    tns = run_block(code, {**ns, "loss_fn": loss_fn, "params": table})
    state = [jnp.copy(table), tns["opt_state"]]
    return {
        "documented (lazy)": (tns["train_step"], state, (ids, w)),
        "dense": dense_twin(loss_fn, table, (ids, w)),
    }


def case_guide_lm(index: int):
    code = [c for _, c in blocks("docs/sparse_training.md") if "lazy_train_step(loss_fn" in c][
        index
    ]
    ns = run_block(code)
    data = (ns["contexts"], ns["targets"]) if "contexts" in ns else (ns["words"],)
    step = lambda p, s, *d: ns["step"](p, s, *d)[:3]
    state = [ns["params"], ns["opt_state"]]
    return {
        "documented (lazy)": (step, state, data),
        "dense": dense_twin(ns["loss_fn"], ns["params"], data),
    }


def case_heads_sampled():
    from blocksparse_jax import sampled_softmax_loss

    code = next(c for t, c in blocks("docs/heads.md") if t == "sampled softmax, trained lazily")
    ns = run_block(code)
    key = jax.random.key(10)
    x, target = ns["x"], ns["target"]

    def loss_fn(p, key):
        return sampled_softmax_loss(key, x, p, target, n_sampled=512)

    return {
        "documented (lazy)": (ns["train_step"], [ns["params"], ns["opt_state"]], (key,)),
        "dense": dense_twin(loss_fn, ns["params"], (key,)),
    }


def case_layers(framework: str):
    from blocksparse_jax import embedding_lookup, h_softmax_loss
    from blocksparse_jax.optim import apply_updates, lazy

    title = f"train_{framework}_sparse.py"
    code = next(c for t, c in blocks("docs/layers.md") if t == title)
    ns = run_block(code)
    data = (ns["words"], ns["next_words"])
    documented = (ns["train_step"], [ns["params"], ns["opt_state"]], data)

    # The same model with the functional API: a table, HSoftmax's weights, the layout.
    model = ns["model"]
    softmax = model.softmax._state()
    table = model.embed._table()
    layout = (softmax.word_to_output, softmax.class_sizes)
    params = {"table": jnp.copy(table), "out": jax.tree.map(jnp.copy, softmax.params)}
    n_grid = softmax.config.n_grid

    def loss_fn(p, words, next_words):
        x = embedding_lookup(p["table"], words)
        t = layout[0][next_words]
        return h_softmax_loss(x, p["out"], t, n_outputs=n_grid, class_sizes=layout[1])

    tx = lazy(optax.adam(3e-2))
    from blocksparse_jax import value_and_sparse_grad

    @jax.jit
    def plain(params, opt_state, words, next_words):
        loss, g = value_and_sparse_grad(loss_fn)(params, words, next_words)
        u, opt_state = tx.update(g, opt_state, params)
        return apply_updates(params, u), opt_state, loss

    plain = jax.jit(plain, donate_argnums=(0, 1))
    return {
        "documented (lazy)": documented,
        "plain jax.jit (lazy)": (plain, [params, tx.init(params)], data),
        "dense": dense_twin(loss_fn, params, data),
    }


CASES = {
    "readme": case_readme,
    "table": case_table,
    "guide_lm": lambda: case_guide_lm(0),
    "guide_rnn": lambda: case_guide_lm(1),
    "flax": lambda: case_layers("flax"),
    "equinox": lambda: case_layers("equinox"),
    "heads_sampled": case_heads_sampled,
}


def bench(name: str, *, repeats: int) -> dict:
    with jax.numpy_dtype_promotion("standard"):
        contenders = CASES[name]()
    runners, temps = {}, {}
    for key, (step, state, rest) in contenders.items():
        try:
            temps[key] = compile_stats(step, *state, *rest)["temp_bytes"]
        except AttributeError:  # a step that is not a jitted function (wrapped by the doc)
            temps[key] = None
        runners[key] = carried(step, state, rest, 2)
    times = time_round_robin(runners, warmup=2, repeats=repeats, settle_s=SETTLE_S)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    row = {"case": name, "ms": ms, "temp_bytes": temps}
    if "dense" in ms:
        row["dense_over_documented"] = ms["dense"] / ms["documented (lazy)"]
    if "plain jax.jit (lazy)" in ms:
        row["documented_over_plain"] = ms["documented (lazy)"] / ms["plain jax.jit (lazy)"]
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=os.path.join(HERE, "bench_docs_loops.json"))
    args = p.parse_args(argv)
    rows, names = [], args.cases.split(",")
    for name in names:
        row = bench(name, repeats=args.repeats)
        row["load_average"] = os.getloadavg()
        print(json.dumps(row), flush=True)
        rows.append(row)
    if os.path.exists(args.out):  # keep the cases this run did not measure
        with open(args.out) as f:
            rows = [r for r in json.load(f)["rows"] if r["case"] not in names] + rows
    with open(args.out, "w") as f:
        json.dump({"machine": machine_info(), "settle_s": SETTLE_S, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
