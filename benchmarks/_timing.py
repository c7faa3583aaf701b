"""Timing shared by every benchmark: compile apart, contenders alternated, medians.

A contender is a *runner*, a function of no arguments that makes one call
exactly as a user makes it (the ``jax.jit`` form the documentation shows, every
output returned) and returns what the call returns.  :func:`compile_stats`
compiles the same call ahead of time to report compile seconds and XLA's
compiled memory apart from the steady state; :func:`time_round_robin` warms
every runner up, then times them in rounds, in a new random order each round,
so that load on a shared machine hits them alike.  Every timed call ends in
``jax.block_until_ready`` on all of its outputs.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Runner = Callable[[], Any]


def compile_stats(jitted, *args, **kwargs) -> dict:
    """Compile seconds and XLA's compiled memory of ``jitted(*args, **kwargs)``.

    Lowers and compiles the call ahead of time (``jitted.lower(...).compile()``),
    apart from any timed call; nothing is executed, so donated arguments stay valid.

    Returns:
      ``{"compile_s", "temp_bytes", "argument_bytes", "compiled"}`` (the byte
      counts are ``None`` when the backend reports no memory analysis;
      ``compiled`` is the executable, callable with the same positional
      arguments without compiling again).
    """
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    return {
        "compile_s": compile_s,
        "temp_bytes": None if mem is None else int(mem.temp_size_in_bytes),
        "argument_bytes": None if mem is None else int(mem.argument_size_in_bytes),
        "compiled": compiled,
    }


def call(fn, *args, **kwargs) -> Runner:
    """A runner that calls ``fn(*args, **kwargs)`` and returns all its outputs."""
    return lambda: fn(*args, **kwargs)


def training_loop(
    step, *args, state_argnum: int, state_out: int, copy: bool = True, **kwargs
) -> Runner:
    """A runner of one training step that carries its state, as a training loop does.

    Each call is ``out = step(*args, **kwargs)``; then ``out[state_out]`` (the
    updated parameters) becomes argument ``state_argnum`` of the next call.  The
    initial state is copied first, so a step that donates it leaves the caller's
    arrays valid; ``copy=False`` donates the caller's arrays instead (for states
    too large to hold twice).  The runner returns every output of the step.
    """
    args = list(args)
    if copy:
        args[state_argnum] = jax.tree.map(jnp.copy, args[state_argnum])

    def run():
        out = step(*args, **kwargs)
        args[state_argnum] = out[state_out]
        return out

    return run


def _timed(run: Runner) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - t0


def time_round_robin(
    runners: Mapping[str, Runner],
    *,
    warmup: int,
    repeats: int,
    slow_s: float = math.inf,
    seed: int = 0,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """Steady-state seconds of each runner, timed alternately.

    Each runner is called ``warmup`` times (which also compiles it), then all are
    called once per round for ``repeats`` rounds, in a new random order each round
    (no runner always follows another).  A runner whose warm-up call took longer
    than ``slow_s`` is timed in the first round only.  After every call the
    process pauses ``settle_s`` seconds (not timed), so that work a call leaves
    running after its outputs are ready (XLA freeing a large temporary buffer)
    finishes before the next runner starts instead of landing in its time.

    Returns:
      ``{name: [seconds of each timed call]}``; take the median.
    """
    slow = set()
    for name, run in runners.items():
        for _ in range(warmup):
            slow_call = _timed(run) > slow_s
            time.sleep(settle_s)
            if slow_call:
                slow.add(name)
                break
    times = {name: [] for name in runners}
    order = list(runners)
    rng = random.Random(seed)
    for round_ in range(repeats):
        rng.shuffle(order)
        for name in order:
            if name not in slow or round_ == 0:
                times[name].append(_timed(runners[name]))
                time.sleep(settle_s)
    return times
