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
    burst: int = 1,
    burst_s: float = 0.0,
    first_calls: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Steady-state seconds of each runner, timed alternately.

    Each runner is called ``warmup`` times (which also compiles it), then all are
    called once (or in a burst, below) per round for ``repeats`` rounds, in a new
    random order each round (no runner always follows another).  A runner whose warm-up call took longer
    than ``slow_s`` is timed in the first round only.  After every call the
    process pauses ``settle_s`` seconds (not timed), so that work a call leaves
    running after its outputs are ready (XLA freeing a large temporary buffer)
    finishes before the next runner starts instead of landing in its time.

    ``burst > 1`` or ``burst_s > 0`` times a runner as a training loop runs its
    step: in each round it is called ``n`` times in a row, ``n`` the larger of
    ``burst`` and the calls that fill ``burst_s`` seconds (at the speed of one
    call made after the warm-up), with the pause after the last call only; the
    calls of the second half of the burst (all but the first when ``n`` is 2 or
    3) are its times.  The calls just after a pause are slower for a while
    (threads and caches woken up, other runners' data in the caches); the first
    call of each burst goes to ``first_calls`` when given.

    Returns:
      ``{name: [seconds of each timed call]}``; take the median.
    """
    slow = set()
    n_calls = {}
    for name, run in runners.items():
        for _ in range(warmup):
            last = _timed(run)
            time.sleep(settle_s)
            if last > slow_s:
                slow.add(name)
                break
        fill = 1
        if burst_s > 0 and name not in slow:
            last = _timed(run)  # compiled by now: the speed of one call
            time.sleep(settle_s)
            fill = math.ceil(burst_s / max(last, 1e-6))
        n_calls[name] = max(1, burst, fill)
    times = {name: [] for name in runners}
    order = list(runners)
    rng = random.Random(seed)
    for round_ in range(repeats):
        rng.shuffle(order)
        for name in order:
            if name not in slow or round_ == 0:
                n = n_calls[name]
                calls = [_timed(runners[name]) for _ in range(n)]
                time.sleep(settle_s)
                times[name].extend(calls[max(1, n // 2) :] if n > 1 else calls)
                if n > 1 and first_calls is not None:
                    first_calls.setdefault(name, []).append(calls[0])
    return times
