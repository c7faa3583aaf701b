"""Embedding tables at recommender scale: our sparse steps against FBGEMM and PyTorch.

One table, ``loss = mean(tanh(table[ids] @ w))`` over Zipf-distributed ids (the
generator of ``bench_sparse_training``), one training step per call:

* ``rowwise_adagrad``: ``embedding_lookup`` + ``value_and_sparse_grad`` +
  ``optim.rowwise_adagrad`` + ``optim.apply_updates``;
* ``fbgemm_rowwise_adagrad``: FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``
  (``ComputeDevice.CPU``, ``PoolingMode.NONE``, ``EXACT_ROWWISE_ADAGRAD``): its
  fused CPU kernel updates the table inside the backward pass;
* ``lazy_adam``: the same with ``optim.lazy(optax.adam)``;
* ``torch_sparse_adam``: ``nn.Embedding(sparse=True)`` + ``optim.SparseAdam``;
* ``dense_adam``: ``jax.value_and_grad`` + ``optax.adam`` + ``optax.apply_updates``.

Our steps (and dense Adam) are called in the documented form: ``jax.jit`` with
the parameters and the optimizer state donated, returning the loss, the new
parameters and the new state, fed back into the next call.  PyTorch and FBGEMM
run with ``--torch-threads`` threads (PyTorch's fastest setting here is one;
both are run with each count in ``--torch-threads`` when it lists several).

The contenders of a race alternate in one process (``time_round_robin``: a new
random order each round, an untimed pause of ``--settle`` seconds after every
call, medians).  A case runs three races one after the other, each holding only
its own tables (all five would not fit in memory at 16,777,216 x 32): row-wise
Adagrad (ours against FBGEMM), Adam (lazy against ``SparseAdam``), and dense
Adam (against our row-wise Adagrad, measured again as the link between races).
A race whose tables would not fit in the memory available (``MemAvailable``)
is skipped with a line saying so.  Reported per contender: the median step,
the optimizer state's bytes, and for the JAX steps XLA's compiled temporaries.

    python3 -m benchmarks.bench_embeddings [--quick] [--cases 4194304x64x4096,...]
        [--races rowwise_adagrad,adam,dense_adam]

Results go to ``bench_embeddings.json`` next to this file (a run of some cases
or races replaces those and keeps the others; ``--quick``: small sizes, nothing
written).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._machine import machine_info
from benchmarks._timing import compile_stats, time_round_robin, training_loop
from benchmarks.bench_sparse_training import dense_step, lazy_step, zipf_ids
from blocksparse_jax import embedding_lookup
from blocksparse_jax.optim import lazy, rowwise_adagrad

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 0.01
EPS = 1e-8
CASES = ["4194304x64x4096", "4194304x64x65536", "16777216x32x4096", "16777216x32x65536"]
QUICK_CASES = ["65536x32x1024"]


def loss_fn(table, ids, w):
    return jnp.mean(jnp.tanh(embedding_lookup(table, ids) @ w))


class JaxContender:
    """A documented step, jitted with ``(params, opt_state)`` donated; its compile stats."""

    def __init__(self, name, step, params, tx, ids, w):
        state = (params, tx.init(params))
        jitted = jax.jit(step, donate_argnums=(0,))
        stats = compile_stats(jitted, state, ids, w)
        self.name, self.temp_bytes = name, stats["temp_bytes"]
        self.state_bytes = sum(a.nbytes for a in jax.tree.leaves(state[1]))
        self.run = training_loop(jitted, state, ids, w, state_argnum=0, state_out=1, copy=False)


class FbgemmContender:
    """FBGEMM's table-batched embedding with its fused row-wise Adagrad (CPU)."""

    def __init__(self, torch, table, ids, w, threads):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        self.name = f"fbgemm_rowwise_adagrad_{threads}t"
        self.torch, self.threads = torch, threads
        self.emb = SplitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(*table.shape, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=LR,
            eps=EPS,
            pooling_mode=PoolingMode.NONE,
        )
        with torch.no_grad():
            self.emb.split_embedding_weights()[0].copy_(torch.from_numpy(table))
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.offsets = torch.arange(ids.size + 1, dtype=torch.int64)
        self.w = torch.from_numpy(np.array(w))
        self.state_bytes = sum(
            t.numel() * t.element_size() for t in self.emb.split_optimizer_states()[0]
        )
        self.temp_bytes = None

    def run(self):
        """One step: forward, backward (the update runs inside it); synchronous on the CPU."""
        self.torch.set_num_threads(self.threads)
        loss = self.torch.mean(self.torch.tanh(self.emb(self.ids, self.offsets) @ self.w))
        loss.backward()
        return loss


class TorchSparseAdamContender:
    """``nn.Embedding(sparse=True)`` + ``optim.SparseAdam``."""

    def __init__(self, torch, table, ids, w, threads):
        self.name = f"torch_sparse_adam_{threads}t"
        self.torch, self.threads = torch, threads
        self.emb = torch.nn.Embedding(*table.shape, sparse=True)
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(table))
        self.opt = torch.optim.SparseAdam(self.emb.parameters(), lr=LR)
        self.ids = torch.from_numpy(ids.astype(np.int64))
        self.w = torch.from_numpy(np.array(w))
        self.temp_bytes = None
        self.state_bytes = None  # known after the first step (the moments are made lazily)

    def run(self):
        self.torch.set_num_threads(self.threads)
        self.opt.zero_grad()
        loss = self.torch.mean(self.torch.tanh(self.emb(self.ids) @ self.w))
        loss.backward()
        self.opt.step()
        return loss

    def measure_state(self):
        state = self.opt.state[self.emb.weight]
        self.state_bytes = sum(
            t.numel() * t.element_size() for t in state.values() if self.torch.is_tensor(t)
        )


def _race(contenders, *, warmup, repeats, settle_s):
    times = time_round_robin(
        {c.name: c.run for c in contenders}, warmup=warmup, repeats=repeats, settle_s=settle_s
    )
    for c in contenders:
        if isinstance(c, TorchSparseAdamContender):
            c.measure_state()
    return {
        c.name: {
            "ms": 1e3 * statistics.median(times[c.name]),
            "ms_all": [round(1e3 * t, 3) for t in times[c.name]],
            "state_bytes": c.state_bytes,
            "temp_bytes": c.temp_bytes,
        }
        for c in contenders
    }


def _table(n_rows, dim):
    """The initial table (the same for every contender), float32 throughout."""
    table = np.random.default_rng(3).standard_normal((n_rows, dim), dtype=np.float32)
    table *= np.float32(0.1)
    return table


def _available_bytes() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping or killing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


# The bytes each contender holds, in tables: the table and its optimizer state, plus
# dense Adam's gradient and update.
_RESIDENT_TABLES = {"rowwise_adagrad": 1, "fbgemm": 1, "lazy_adam": 3, "torch": 3, "dense_adam": 5}


def bench_case(n_rows, dim, lookups, *, races, torch, threads, warmup, repeats, settle_s):
    rng = np.random.default_rng(2)
    ids_np = zipf_ids(rng, n_rows, lookups)
    w_np = rng.standard_normal((dim,)).astype(np.float32)
    ids, w = jnp.asarray(ids_np), jnp.asarray(w_np)
    table_bytes = n_rows * dim * 4
    row = {
        "table": [n_rows, dim],
        "lookups": lookups,
        "distinct": int(np.unique(ids_np).size),
        "table_bytes": table_bytes,
        "settle_s": settle_s,
        "repeats": repeats,
        "races": {},
        "skipped": {},
    }
    rowwise, ladam, adam = rowwise_adagrad(LR, eps=EPS), lazy(optax.adam(LR)), optax.adam(LR)

    def jax_contender(name, step, tx):
        return JaxContender(name, step, jnp.asarray(_table(n_rows, dim)), tx, ids, w)

    def ours_rowwise():
        return jax_contender("rowwise_adagrad", lazy_step(loss_fn, rowwise), rowwise)

    plans = {
        "rowwise_adagrad": (
            ["rowwise_adagrad"] + ["fbgemm"] * len(threads) * (torch is not None),
            lambda: (
                [ours_rowwise()]
                + [
                    FbgemmContender(torch, _table(n_rows, dim), ids_np, w_np, t)
                    for t in (threads if torch is not None else [])
                ]
            ),
        ),
        "adam": (
            ["lazy_adam"] + ["torch"] * len(threads) * (torch is not None),
            lambda: (
                [jax_contender("lazy_adam", lazy_step(loss_fn, ladam), ladam)]
                + [
                    TorchSparseAdamContender(torch, _table(n_rows, dim), ids_np, w_np, t)
                    for t in (threads if torch is not None else [])
                ]
            ),
        ),
        "dense_adam": (
            ["dense_adam", "rowwise_adagrad"],
            lambda: [jax_contender("dense_adam", dense_step(loss_fn, adam), adam), ours_rowwise()],
        ),
    }
    for name in races:
        kinds, make = plans[name]
        need = (sum(_RESIDENT_TABLES[k] for k in kinds) + 1) * table_bytes  # + one in transit
        if need > _available_bytes():
            row["skipped"][name] = (
                f"needs about {need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB available"
            )
            print(name, "skipped:", row["skipped"][name])
            continue
        contenders = make()
        gc.collect()
        row["races"][name] = _race(contenders, warmup=warmup, repeats=repeats, settle_s=settle_s)
        row["races"][name]["load"] = os.getloadavg()
        print(
            name,
            json.dumps(
                {k: round(v["ms"], 3) for k, v in row["races"][name].items() if k != "load"}
            ),
        )
        del contenders
        gc.collect()
    return row


def _fbgemm_torch():
    try:
        import torch
        from fbgemm_gpu import split_table_batched_embeddings_ops_training  # noqa: F401
    except ImportError as e:
        print(f"FBGEMM / PyTorch not available ({e}): their contenders are skipped")
        return None
    return torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes; writes no results")
    p.add_argument("--cases", default=None, help="comma-separated ROWSxDIMxLOOKUPS")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--settle", type=float, default=0.3, help="untimed pause after every call (s)")
    p.add_argument("--torch-threads", default="1", help="comma-separated thread counts")
    p.add_argument("--races", default="rowwise_adagrad,adam,dense_adam")
    p.add_argument("--out", default=os.path.join(HERE, "bench_embeddings.json"))
    p.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    if args.report:
        with open(args.out) as f:
            print(markdown(json.load(f)))
        return
    cases = (args.cases or ",".join(QUICK_CASES if args.quick else CASES)).split(",")
    warmup, repeats = (1, 3) if args.quick else (2, args.repeats)
    torch = _fbgemm_torch()
    threads = [int(t) for t in args.torch_threads.split(",")]
    results = {"machine": machine_info(), "load_before": os.getloadavg(), "cases": []}
    for case in cases:
        n_rows, dim, lookups = (int(x) for x in case.split("x"))
        row = bench_case(
            n_rows,
            dim,
            lookups,
            races=args.races.split(","),
            torch=torch,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            settle_s=args.settle,
        )
        row["load_after"] = os.getloadavg()
        results["cases"].append(row)
    results["load_after"] = os.getloadavg()
    if args.quick:
        return
    if os.path.exists(args.out):  # a run of some cases or races replaces only those
        with open(args.out) as f:
            old = json.load(f)
        results["cases"] = _merge(old.get("cases", []), results["cases"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


_ROWS = [  # (race, contender prefix, label)
    ("rowwise_adagrad", "rowwise_adagrad", "ours: `rowwise_adagrad`"),
    ("rowwise_adagrad", "fbgemm_rowwise_adagrad", "FBGEMM `EXACT_ROWWISE_ADAGRAD` (fused CPU)"),
    ("adam", "lazy_adam", "ours: `lazy(optax.adam)`"),
    ("adam", "torch_sparse_adam", "PyTorch `Embedding(sparse=True)` + `SparseAdam`"),
    ("dense_adam", "dense_adam", "dense `jax.grad` + `optax.adam`"),
]


_REFERENCE = {"rowwise_adagrad": "fbgemm", "adam": "torch_sparse_adam", "dense_adam": "rowwise"}


def markdown(results) -> str:
    """The race's table: per case and contender the median step and its race's reference.

    ``vs ref`` is the reference's median over this one's, both from the same race:
    FBGEMM for row-wise Adagrad, ``SparseAdam`` for Adam, our row-wise Adagrad for dense Adam
    (above 1: faster than the reference).
    """
    lines = [
        "| table | lookups (distinct) | step | ms | vs ref | optimizer state | XLA temp |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in results["cases"]:
        label = f"{case['table'][0]:,} x {case['table'][1]}"
        for race, prefix, name in _ROWS:
            timed = {k: v for k, v in case["races"].get(race, {}).items() if isinstance(v, dict)}
            ref = next((v["ms"] for k, v in timed.items() if k.startswith(_REFERENCE[race])), None)
            for k, v in timed.items():
                if not k.startswith(prefix) or k.startswith(_REFERENCE[race]):
                    continue
                ratio = f"{ref / v['ms']:.2f}x" if ref else ""
                state = f"{v['state_bytes'] / 2**20:,.0f} MiB" if v["state_bytes"] else ""
                temp = f"{v['temp_bytes'] / 2**20:,.1f} MiB" if v["temp_bytes"] is not None else ""
                lines.append(
                    f"| {label} | {case['lookups']:,} ({case['distinct']:,}) | {name} | "
                    f"{v['ms']:,.2f} | {ratio} | {state} | {temp} |"
                )
            for k, v in timed.items():  # the reference itself
                if k.startswith(prefix) and k.startswith(_REFERENCE[race]) and race != "dense_adam":
                    state = f"{v['state_bytes'] / 2**20:,.0f} MiB" if v["state_bytes"] else ""
                    lines.append(
                        f"| {label} | {case['lookups']:,} ({case['distinct']:,}) | {name} | "
                        f"{v['ms']:,.2f} | 1.00x | {state} | |"
                    )
        for race, why in case.get("skipped", {}).items():
            lines.append(f"| {label} | {case['lookups']:,} | {race}: not run ({why}) | | | | |")
    return "\n".join(lines)


def _merge(old_cases, new_cases):
    """The old cases with the races this run measured replaced (by table and lookups)."""
    key = lambda c: (tuple(c["table"]), c["lookups"])  # noqa: E731
    merged = {key(c): c for c in old_cases}
    for c in new_cases:
        if key(c) in merged:
            races = {**merged[key(c)]["races"], **c["races"]}
            skipped = {
                k: v
                for k, v in {**merged[key(c)].get("skipped", {}), **c["skipped"]}.items()
                if k not in races
            }
            merged[key(c)] = {**merged[key(c)], **c, "races": races, "skipped": skipped}
        else:
            merged[key(c)] = c
    return list(merged.values())


if __name__ == "__main__":
    main()
