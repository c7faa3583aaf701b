"""Scaling out: per-device weight memory and step time on 1, 2, 4 and 8 devices.

Two training steps (gradient + SGD update), each run by ``blocksparse_jax.parallel``
on a ``(1, n)`` mesh (the weights split ``n`` ways over ``model``), against the
single-device function measured in the same run:

* ``gemv``: ``sum(sparse_block_gemv(o, W, h, ...) ** 2)`` with ``W`` of
  ``(32, 32, 128, 128)`` float32 (64 MiB);
* ``h_softmax``: ``h_softmax_loss`` over 65,536 outputs (256 classes of 256,
  ``n_in=256``; ``W2`` is 64 MiB).

Reported per device count: the bytes of weights one device holds (its shard of
``W`` or of ``W1``/``b1``/``W2``/``b2``), XLA's per-device compiled memory
(arguments + temporaries, from ``memory_analysis()``), compile time apart, and
the median steady-state step time with its ratio to the single-device function.
Also one ``(n, 1)`` data-parallel row for comparison.  Each step is called as
the README's multi-device training loop calls it, ``loss, params =
jax.jit(step)(params, ...)`` with ``params`` fed back (no donation), every call
ending in ``block_until_ready``; the layouts of a case are timed alternately.

The devices are forced host CPU devices (``--xla_force_host_platform_device_count``,
set below before JAX is imported), so on a machine with fewer cores than
devices they share the cores: the memory figures are what a real mesh gets,
the times show the overhead of the split, not a speed-up.

    python3 -m benchmarks.bench_parallel [--quick] [--out PATH]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import blocksparse_jax as bsj  # noqa: E402
from benchmarks._machine import machine_info  # noqa: E402
from benchmarks._timing import compile_stats, time_round_robin, training_loop  # noqa: E402
from blocksparse_jax import parallel  # noqa: E402

LR = 0.01
MIB = 2**20


def gemv_case(quick: bool):
    batch, i_blocks, o_blocks, i_win, o_win, size = (
        (64, 16, 16, 4, 4, 64) if quick else (256, 32, 32, 4, 4, 128)
    )
    rng = np.random.default_rng(0)
    arrays = dict(
        W=jnp.asarray(rng.standard_normal((i_blocks, o_blocks, size, size)), jnp.float32),
        h=jnp.asarray(rng.standard_normal((batch, i_win, size)), jnp.float32),
        o=jnp.zeros((batch, o_win, size), jnp.float32),
        ii=jnp.asarray(rng.integers(0, i_blocks, (batch, i_win)), jnp.int32),
        oi=jnp.asarray(rng.integers(0, o_blocks, (batch, o_win)), jnp.int32),
    )
    name = f"gemv W=({i_blocks},{o_blocks},{size},{size}) batch={batch} win={i_win}x{o_win} f32"

    def step_for(mesh):
        def loss(W, a):
            if mesh is None:
                out = bsj.sparse_block_gemv(a["o"], W, a["h"], a["ii"], a["oi"])
            else:
                out = parallel.sparse_block_gemv(a["o"], W, a["h"], a["ii"], a["oi"], mesh=mesh)
            return jnp.sum(out**2)

        def step(W, a):
            value, g = jax.value_and_grad(loss)(W, a)
            return value, W - LR * g

        return step

    def place(mesh):
        W = arrays["W"]
        if mesh is not None:
            W = jax.device_put(W, NamedSharding(mesh, P(None, "model")))
        data = {k: v for k, v in arrays.items() if k != "W"}
        if mesh is not None:
            data = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in data.items()}
        return (W, data), W

    return name, step_for, place


def hsoftmax_case(quick: bool):
    n_in, n_out, batch = (64, 4096, 64) if quick else (256, 65536, 256)
    params = bsj.h_softmax_init(jax.random.key(0), n_in, n_out)
    x = jax.random.normal(jax.random.key(1), (batch, n_in))
    target = jax.random.randint(jax.random.key(2), (batch,), 0, n_out)
    C, K = params.W2.shape[0], params.W2.shape[2]
    name = f"h_softmax n_outputs={n_out} ({C}x{K}) n_in={n_in} batch={batch} f32"

    def step_for(mesh):
        def loss(p, x, t):
            if mesh is None:
                return bsj.h_softmax_loss(x, p, t, n_outputs=n_out)
            return parallel.h_softmax_loss(x, p, t, n_outputs=n_out, mesh=mesh)

        def step(p, x, t):
            value, g = jax.value_and_grad(loss)(p, x, t)
            return value, jax.tree.map(lambda a, b: a - LR * b, p, g)

        return step

    def place(mesh):
        if mesh is None:
            return (params, x, target), params
        p = parallel.shard_params(params, mesh)
        batch_sharding = NamedSharding(mesh, P("data"))
        return (p, jax.device_put(x, batch_sharding), jax.device_put(target, batch_sharding)), p

    return name, step_for, place


def _shard_bytes(tree) -> int:
    """Bytes of ``tree`` held by one device (its first addressable shards)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shards = getattr(a, "addressable_shards", None)
        total += shards[0].data.nbytes if shards else a.nbytes
    return total


def measure(layouts, make_step, place, *, warmup: int, repeats: int) -> list[dict]:
    """One row per layout: weights and XLA memory per device, compile s, median step ms.

    The step of every layout is ``jax.jit``-ed as in the README's training loop,
    ``loss, params = step(params, ...)`` with ``params`` fed back; the layouts are
    timed alternately.
    """
    rows, runners = {}, {}
    for label, shape in layouts:
        mesh = None if shape is None else jax.make_mesh(shape, ("data", "model"))
        args, weights = place(mesh)
        step = jax.jit(make_step(mesh))
        stats = compile_stats(step, *args)
        rows[label] = dict(
            mesh=label,
            devices=1 if shape is None else shape[0] * shape[1],
            weight_bytes_per_device=_shard_bytes(weights),
            compiled_bytes_per_device=stats["argument_bytes"] + stats["temp_bytes"],
            compile_s=stats["compile_s"],
        )
        runners[label] = training_loop(step, *args, state_argnum=0, state_out=1)
    times = time_round_robin(runners, warmup=warmup, repeats=repeats)
    base_ms = 1e3 * statistics.median(times[layouts[0][0]])
    for label, row in rows.items():
        row["step_ms"] = 1e3 * statistics.median(times[label])
        row["ratio_to_single"] = row["step_ms"] / base_ms
    return list(rows.values())


LAYOUTS = [("single", None), *[(f"1x{n}", (1, n)) for n in (1, 2, 4, 8)], ("8x1", (8, 1))]


def print_rows(name, rows):
    print(f"\n{name}")
    print(
        f"{'mesh':>7} {'devices':>7} {'weights/dev MiB':>16} {'XLA mem/dev MiB':>16} "
        f"{'compile s':>9} {'step ms':>9} {'vs single':>9}"
    )
    for r in rows:
        print(
            f"{r['mesh']:>7} {r['devices']:>7} {r['weight_bytes_per_device'] / MIB:>16.2f} "
            f"{r['compiled_bytes_per_device'] / MIB:>16.2f} {r['compile_s']:>9.2f} "
            f"{r['step_ms']:>9.2f} {r['ratio_to_single']:>9.2f}",
            flush=True,
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats, no JSON")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="JSON path (default: bench_parallel.json here)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    info = machine_info()
    print(
        f"{info['cpu']}, {info['cores']} cores; jax {info['jax']}, {jax.device_count()} "
        f"{info['backend']} devices; medians of {repeats} alternated rounds"
    )
    results = []
    for make in (gemv_case, hsoftmax_case):
        name, make_step, place = make(args.quick)
        rows = measure(LAYOUTS, make_step, place, warmup=2, repeats=repeats)
        print_rows(name, rows)
        results += [dict(row, case=name) for row in rows]
    out = args.out or (
        None if args.quick else os.path.join(os.path.dirname(__file__), "bench_parallel.json")
    )
    if out:
        with open(out, "w") as f:
            json.dump(dict(machine=info, quick=args.quick, results=results), f, indent=1)
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
