"""How fast a lazy step of the tiny-block layer S4 could be at best, measured.

The layer S4 of ``bench_sparse_training`` (1,024 examples, windows of 8 x 8
blocks out of 256 x 256 blocks of 16 x 16, float32: a 64 MiB ``W``) touches 62%
of its blocks per step.  Any lazy Adam step does at least what every step does,
plus something on each touched block of ``W`` and of both moments.  This script
times, alternated in one process (medians, a pause after every call), with
parameters and state donated:

* ``dense_adam``: ``jax.value_and_grad`` + ``optax.adam`` + ``optax.apply_updates``;
* ``lazy_adam``: ``value_and_sparse_grad`` + ``lazy(optax.adam)`` + ``apply_updates``;
* ``common``: the loss and its gradient with respect to the layer's input
  ``h`` only (the forward gathers of ``W``'s blocks and the backward ones):
  what a step costs before any gradient of ``W`` exists;
* ``touch_floor``: ``W``, ``mu`` and ``nu`` each increased by 1 on the touched
  blocks (their indices given, sorted and distinct), in place: one gather and
  one scatter per array, the least any lazy update of those blocks can do,
  with no gradient to sum and no optimizer arithmetic.

``dense_adam / (common + touch_floor)`` bounds the speed-up of any lazy step
over the dense one on this machine.

    python3 -m benchmarks.bench_tiny_blocks_bound [--rounds N]
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

from benchmarks._machine import machine_info
from benchmarks._timing import time_round_robin
from benchmarks.bench_sparse_training import LAYERS, layer_problem
from blocksparse_jax import value_and_sparse_grad
from blocksparse_jax.optim import apply_updates, lazy

SHAPE = LAYERS["S4"]
SETTLE_S = 0.3
LR = 1e-3


def runners():
    _, ib, ob, _, _, isz, osz = SHAPE
    W, b, h, ii, oi, loss = layer_problem(SHAPE)  # bench_sparse_training's layer problem
    touched = np.unique(np.asarray(ii)[:, :, None] * ob + np.asarray(oi)[:, None, :])
    adam, ltx = optax.adam(LR), lazy(optax.adam(LR))

    def dense(p, s, h):
        value, g = jax.value_and_grad(loss)(p, h)
        u, s = adam.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    def lazy_step(p, s, h):
        value, g = value_and_sparse_grad(loss)(p, h)
        u, s = ltx.update(g, s, p)
        return apply_updates(p, u), s, value

    def common(p, h):
        return jax.value_and_grad(loss, argnums=1)(p, h)

    idx = jnp.asarray(touched, jnp.int32)

    def touch(arrays):
        def one(a):
            flat = a.reshape(ib * ob, isz, osz)
            kw = dict(indices_are_sorted=True, unique_indices=True)
            return flat.at[idx].add(1.0, **kw).reshape(a.shape)

        return [one(a) for a in arrays]

    def fresh():
        return {"W": W + 0, "b": b + 0}

    pd, pl = fresh(), fresh()
    dense_j = jax.jit(dense, donate_argnums=(0, 1))
    lazy_j = jax.jit(lazy_step, donate_argnums=(0, 1))
    common_j = jax.jit(common)
    touch_j = jax.jit(touch, donate_argnums=0)
    boxes = {
        "dense_adam": [pd, adam.init(pd)],
        "lazy_adam": [pl, ltx.init(pl)],
        "touch": [[W + 0, jnp.zeros_like(W), jnp.zeros_like(W)]],
    }

    def run_dense():
        p, s = boxes["dense_adam"]
        out = dense_j(p, s, h)
        boxes["dense_adam"] = list(out[:2])
        return out

    def run_lazy():
        p, s = boxes["lazy_adam"]
        out = lazy_j(p, s, h)
        boxes["lazy_adam"] = list(out[:2])
        return out

    def run_touch():
        out = touch_j(boxes["touch"][0])
        boxes["touch"] = [out]
        return out

    p_common = fresh()
    return (
        {
            "dense_adam": run_dense,
            "lazy_adam": run_lazy,
            "common": lambda: common_j(p_common, h),
            "touch_floor": run_touch,
        },
        touched.size / (ib * ob),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "bench_tiny_blocks_bound.json")
    )
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    runs, fraction = runners()
    times = time_round_robin(runs, warmup=2, repeats=args.rounds, settle_s=SETTLE_S)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    bound = ms["dense_adam"] / (ms["common"] + ms["touch_floor"])
    print(f"S4 {SHAPE}: {fraction:.0%} of the blocks touched")
    for k, v in ms.items():
        print(f"  {k:12} {v:8.1f} ms")
    print(f"  lazy step's speed-up over dense: {ms['dense_adam'] / ms['lazy_adam']:.2f}x")
    print(f"  bound, dense / (common + touch_floor): {bound:.2f}x")
    result = dict(
        benchmark="tiny_blocks_bound",
        machine=machine_info(),
        shape=SHAPE,
        touched_fraction=fraction,
        rounds=args.rounds,
        settle_s=SETTLE_S,
        ms=ms,
        speedup_lazy=ms["dense_adam"] / ms["lazy_adam"],
        bound=bound,
        load_average={"start": load_start, "end": os.getloadavg()},
    )
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
