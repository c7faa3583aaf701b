"""A table larger than one device's memory, sharded by rows: step time and memory on 1-8 devices.

The documented sparse step (``embedding_lookup`` + ``value_and_sparse_grad`` +
``optim.rowwise_adagrad``, or ``--optimizer lazy_adam``, + ``apply_updates``;
``jax.jit``, table and optimizer state donated), unchanged: the table is placed
with its rows split over the devices (``NamedSharding(mesh, P("devices"))`` on a
one-axis mesh of ``n`` devices) and each step's Zipf ids split the same way (each
device feeds ``1/n`` of the batch), and XLA partitions the step.  Per device
count: the bytes of table and state one device holds, XLA's per-device compiled
memory (arguments, temporaries), the collectives of the compiled step with their
sizes, compile time apart, and the median step time.

On a CPU the devices are forced host devices (``--xla_force_host_platform_device_count=8``,
set below before JAX starts; it changes nothing on GPUs), which share the
machine's cores: the memory figures are what real devices get; the times show
what the split costs, not a speed-up.  "One device's share" of memory is the
device's memory on a GPU or TPU (``memory_stats()["bytes_limit"]``) and the
machine's memory over the forced device count on a CPU; the default table
(16,777,216 x 64 float32, 4 GiB) is larger than that share here.  A device
count whose shard would not fit a device is skipped with a line saying so.

    python3 -m benchmarks.bench_embedding_scaling [--quick] [--rows N --dim D --lookups L]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks._machine import machine_info  # noqa: E402
from benchmarks._timing import compile_stats, time_round_robin  # noqa: E402
from benchmarks.bench_sparse_training import zipf_ids  # noqa: E402
from blocksparse_jax import embedding_lookup, value_and_sparse_grad  # noqa: E402
from blocksparse_jax.optim import apply_updates, lazy, rowwise_adagrad  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 2**30
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "bf16": 2, "f16": 2, "pred": 1}


def collectives(hlo: str) -> list[dict]:
    """Every collective of a compiled module: its kind and result bytes (tuples summed)."""
    found = []
    pattern = r"= \(?([^=]*?)\)? (" + "|".join(COLLECTIVES) + r")(?:-start)?\("
    for m in re.finditer(pattern, hlo):
        nbytes = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            size = math.prod(int(d) for d in dims.split(",") if d)
            nbytes += size * _DTYPE_BYTES.get(dtype, 4)
        found.append({"op": m.group(2), "bytes": nbytes})
    return found


def device_share_bytes() -> tuple[int, str]:
    """One device's memory: its ``bytes_limit``, or on a CPU the host's memory over the devices."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), "the device's bytes_limit"
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // len(jax.devices()), f"host memory / {len(jax.devices())} devices"


def loss_fn(table, ids, w):
    return jnp.mean(jnp.tanh(embedding_lookup(table, ids) @ w))


def make_step(tx):
    def step(table, opt_state, ids, w):
        loss, grads = value_and_sparse_grad(loss_fn)(table, ids, w)
        updates, opt_state = tx.update(grads, opt_state, table)
        return apply_updates(table, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def measure(n_devices, args, tx, ids_np, w_np):
    mesh = jax.make_mesh((n_devices,), ("devices",), devices=jax.devices()[:n_devices])
    with jax.set_mesh(mesh):
        return _measure(mesh, n_devices, args, tx, ids_np, w_np)


def _measure(mesh, n_devices, args, tx, ids_np, w_np):
    rows = NamedSharding(mesh, P("devices"))

    # Made shard by shard on the host and placed: the whole table never exists in one
    # place (a jitted initialiser of the whole table runs unpartitioned on every forced CPU
    # device). Its values are a constant, which a step's time does not see.
    def shard(index):
        start, stop, _ = index[0].indices(args.rows)
        return np.full((stop - start, args.dim), 0.01, np.float32)

    table = jax.make_array_from_callback((args.rows, args.dim), rows, shard)
    opt_state = jax.jit(tx.init)(table)
    ids = jax.device_put(ids_np, rows)
    w = jax.device_put(w_np, NamedSharding(mesh, P()))
    step = make_step(tx)
    stats = compile_stats(step, table, opt_state, ids, w)
    mem = stats["compiled"].memory_analysis()
    hlo = stats["compiled"].as_text()
    carried = {"table": table, "opt_state": opt_state}
    del table, opt_state

    def run():
        out = step(carried["table"], carried["opt_state"], ids, w)
        carried["table"], carried["opt_state"] = out[0], out[1]
        return out

    times = time_round_robin(
        {"step": run}, warmup=args.warmup, repeats=args.repeats, settle_s=args.settle
    )["step"]
    shard = carried["table"].addressable_shards[0].data
    state_shard_bytes = sum(
        a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(carried["opt_state"]) if a.ndim
    )
    found = collectives(hlo)
    row = {
        "devices": n_devices,
        "table_shard_shape": list(shard.shape),
        "table_shard_bytes": shard.nbytes,
        "state_shard_bytes": state_shard_bytes,
        "xla_argument_bytes": int(mem.argument_size_in_bytes),
        "xla_temp_bytes": int(mem.temp_size_in_bytes),
        "xla_alias_bytes": int(mem.alias_size_in_bytes),
        "collectives": found,
        "largest_collective_bytes": max((c["bytes"] for c in found), default=0),
        "compile_s": round(stats["compile_s"], 2),
        "ms": 1e3 * statistics.median(times),
        "ms_min": 1e3 * min(times),
        "load": os.getloadavg(),
    }
    carried.clear()
    del stats, shard
    gc.collect()
    return row


def markdown(results) -> str:
    """The scaling table: per device count, what one device holds and the step's time."""
    mib = 2**20
    lines = [
        "| devices | table / device | state / device | XLA args / device | XLA temp / device "
        "| largest collective | step | vs 1 device |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = next((r["ms"] for r in results["rows"] if r["devices"] == 1), None)
    for r in results["rows"]:
        ratio = f"{r['ms'] / base:.2f}" if base else ""
        lines.append(
            f"| {r['devices']} | {r['table_shard_bytes'] / mib:,.0f} MiB | "
            f"{r['state_shard_bytes'] / mib:,.1f} MiB | {r['xla_argument_bytes'] / mib:,.0f} MiB | "
            f"{r['xla_temp_bytes'] / mib:,.1f} MiB | {r['largest_collective_bytes'] / mib:,.1f} MiB | "
            f"{r['ms']:,.1f} ms | {ratio} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small table; writes no results")
    p.add_argument("--rows", type=int, default=16_777_216)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lookups", type=int, default=65_536)
    p.add_argument(
        "--optimizer", default="rowwise_adagrad", choices=("rowwise_adagrad", "lazy_adam")
    )
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settle", type=float, default=0.1)
    p.add_argument("--out", default=os.path.join(HERE, "bench_embedding_scaling.json"))
    p.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    if args.report:
        with open(args.out) as f:
            print(markdown(json.load(f)))
        return
    if args.quick:
        args.rows, args.dim, args.lookups, args.repeats = 65_536, 16, 1_024, 3
    tx = rowwise_adagrad(0.01) if args.optimizer == "rowwise_adagrad" else lazy(optax.adam(1e-3))
    rng = np.random.default_rng(0)
    ids_np = zipf_ids(rng, args.rows, args.lookups)
    w_np = rng.standard_normal((args.dim,)).astype(np.float32)
    share, share_what = device_share_bytes()
    table_bytes = args.rows * args.dim * 4
    results = {
        "machine": machine_info(),
        "platform": jax.devices()[0].platform,
        "table": [args.rows, args.dim],
        "table_bytes": table_bytes,
        "lookups": args.lookups,
        "distinct": int(np.unique(ids_np).size),
        "optimizer": args.optimizer,
        "device_share_bytes": share,
        "device_share": share_what,
        "rows": [],
    }
    print(
        f"table {table_bytes / GIB:.2f} GiB, one device's share {share / GIB:.2f} GiB "
        f"({share_what}); {args.lookups} lookups, {results['distinct']} distinct rows"
    )
    for n in (int(d) for d in args.devices.split(",")):
        if n > len(jax.devices()):
            print(f"{n} devices: only {len(jax.devices())} available, skipped")
            continue
        if jax.devices()[0].platform != "cpu" and table_bytes / n > share:
            print(f"{n} devices: a shard of {table_bytes / n / GIB:.2f} GiB does not fit, skipped")
            continue
        t0 = time.perf_counter()
        row = measure(n, args, tx, ids_np, w_np)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        results["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "collectives"}), flush=True)
    if not args.quick:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
