"""How long each training step takes after a pause, call by call.

The steps race of ``bench_heads`` alternates its contenders with a pause between
them.  This script measures what a pause costs the steps that follow it: for
the hierarchical softmax's lazy Adam step and the exact softmax's dense Adam
step of that race (589,824 words, batch 256, width 128, parameters and
optimizer state donated), it pauses ``--pause`` seconds, then runs ``--steps``
steps in a row, each ending in ``jax.block_until_ready``, ``--rounds`` times
(the two contenders alternated), and reports the median time of each step
position after the pause.

    python3 -m benchmarks.bench_after_pause [--pause S] [--steps N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from benchmarks._machine import machine_info
from benchmarks._timing import _timed
from benchmarks.bench_heads import BATCH, VOCAB, WIDTH, _step_runner, adam_step, random_problem


def step_runners(vocab: int):
    """``{name: runner}``: the steps race's lazy hierarchical step and dense exact step."""
    import jax.numpy as jnp
    import optax

    from blocksparse_jax import FullSoftmaxParams, full_softmax_loss, h_softmax_init, h_softmax_loss
    from blocksparse_jax.optim import lazy, training_classes

    x, W, t = random_problem(vocab)
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    n_classes = training_classes(vocab, n_in=WIDTH, batch=BATCH)
    hs = h_softmax_init(jax.random.key(1), WIDTH, vocab, n_classes=n_classes)
    exact = FullSoftmaxParams(jnp.asarray(W), jnp.zeros((vocab,), jnp.float32))
    hs_step = adam_step(lambda p: h_softmax_loss(xj, p, tj), lazily=True)
    exact_step = adam_step(lambda p: full_softmax_loss(xj, p, tj), lazily=False)
    return {
        "hsoftmax_lazy_adam": _step_runner(hs_step, hs, lazy(optax.adam(1e-3)).init(hs)),
        "exact_adam": _step_runner(exact_step, exact, optax.adam(1e-3).init(exact)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pause", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "bench_after_pause.json")
    )
    args = p.parse_args(argv)
    runners = step_runners(VOCAB)
    for run in runners.values():
        for _ in range(3):
            _timed(run)
    load = os.getloadavg()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            steps = args.steps if name == "hsoftmax_lazy_adam" else min(args.steps, 4)
            time.sleep(args.pause)
            times[name].append([_timed(run) for _ in range(steps)])
    ms = {
        name: [1e3 * float(v) for v in np.median(np.array(ts), axis=0)]
        for name, ts in times.items()
    }
    for name, row in ms.items():
        print(f"{name}: ms of each step after a {args.pause} s pause")
        print("  " + " ".join(f"{v:.1f}" for v in row))
    result = dict(
        benchmark="after_pause",
        machine=machine_info(),
        vocab=VOCAB,
        batch=BATCH,
        width=WIDTH,
        pause_s=args.pause,
        rounds=args.rounds,
        ms_by_position=ms,
        load_average={"start": load, "end": os.getloadavg()},
    )
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
