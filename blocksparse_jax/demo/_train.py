"""Training, evaluation and checkpoints for the demo.

Batches are drawn on the device inside the jitted step: the positions of step
``i`` come from ``fold_in(key(seed), i)``, so a run resumed from a checkpoint
sees exactly the batches the uninterrupted run would have seen.

A training step donates its input arrays (the parameters and the optimizer
state are updated in place), so an exception raised between the step's call
and the update of the state would leave the state pointing at deleted arrays:
while :func:`train` runs the steps, SIGINT (Ctrl-C) and SIGTERM only ask it to
stop (see :mod:`._interrupts`), and it finishes the step, saves and raises
``Interrupted``.  A second signal raises at once and skips the final save (the
file keeps the last complete save: saves are atomic, see :mod:`._checkpoint`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax.demo import _model
from blocksparse_jax.demo._interrupts import Interrupts
from blocksparse_jax.optim import apply_updates, touched_fractions, value_and_sparse_grad

#: Seconds between two saves of the checkpoint during training.
SAVE_EVERY_S = 60.0

#: The share of the available memory a training step may plan to use.
MEMORY_FRACTION = 0.8


class ResourceError(ValueError):
    """A run too large for the memory of this machine (a user error)."""


def seed_key(seed: int) -> jax.Array:
    """A PRNG key for any ``seed`` in ``[0, 2**64)``, the same with or without 64-bit mode.

    ``jax.random.key(seed)`` for seeds below ``2**32``; above, the high 32 bits
    are folded into the key of the low ones (``jax.random.key`` alone keeps
    only the low 32 bits when 64-bit mode is off).
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"expected a seed in [0, 2**64), got {seed}")
    key = jax.random.key(seed & 0xFFFFFFFF)
    return key if seed < 2**32 else jax.random.fold_in(key, seed >> 32)


@dataclasses.dataclass
class ModelState:
    """One model's training state and history."""

    params: _model.Params
    opt_state: object
    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    timed_tokens: int = 0  # tokens of the timed steps (the first step of a session compiles)
    timed_seconds: float = 0.0
    compile_seconds: float = 0.0
    # per sparse parameter (path such as ".out.W2"): the sum over the steps trained of the
    # fraction of its blocks the step touched
    touched_sums: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def touched(self) -> dict[str, float]:
        """The mean fraction of each sparse parameter's blocks a step touched."""
        return {k: v / self.step for k, v in self.touched_sums.items()} if self.step else {}

    @property
    def tokens_per_s(self) -> float | None:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else None

    def is_live(self) -> bool:
        """False when an array of the state was donated to a step that did not complete."""
        return not any(
            isinstance(a, jax.Array) and a.is_deleted()
            for a in jax.tree_util.tree_leaves((self.params, self.opt_state))
        )


def make_train_step(
    optimizer, output: _model.Output, *, context: int, batch_size: int, key, sparse: bool = True
):
    """A jitted ``(params, opt_state, tokens, step) -> (params, opt_state, loss, touched)``.

    With ``sparse`` (``optimizer`` is then a :func:`blocksparse_jax.optim.lazy`
    transformation) the gradients come from
    :func:`~blocksparse_jax.value_and_sparse_grad`: the embedding table and the
    hierarchical softmax's ``W2`` and ``b2`` get the touched blocks only, and
    ``touched`` holds the fraction of each one's blocks the step touched
    (:func:`~blocksparse_jax.optim.touched_fractions`).  Without, the step is
    ``jax.value_and_grad`` and a dense ``optimizer`` (``touched`` is empty).
    """
    grad_fn = value_and_sparse_grad if sparse else jax.value_and_grad

    def step_fn(params, opt_state, tokens, step):
        step_key = jax.random.fold_in(key, step)
        positions = jax.random.randint(
            step_key, (batch_size,), context, tokens.shape[0], dtype=jnp.int32
        )
        contexts, targets = _model.gather_windows(tokens, positions, context)
        loss_key = jax.random.fold_in(step_key, 1)  # the sampled softmax's classes
        loss, grads = grad_fn(_model.train_loss)(params, output, contexts, targets, loss_key)
        # optax computes Adam's bias correction as ``float ** int32 count``, which the
        # strict promotion mode some users (and our tests) run under rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        params = apply_updates(params, updates)
        return params, opt_state, loss, touched_fractions(grads)

    return jax.jit(step_fn, donate_argnums=(0, 1))


class _Progress:
    """A tqdm bar when tqdm is installed, else a line every tenth of the run."""

    def __init__(self, desc: str, total: int, initial: int):
        self.total, self.last_line = total, initial
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
            print(f"{desc}: steps {initial}..{total}", file=sys.stderr)
        else:
            self.bar = tqdm(
                total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, leave=True
            )

    def update(self, step: int, loss: float, tokens_per_s: float | None):
        tps = f"{tokens_per_s:,.0f}" if tokens_per_s else "-"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss={loss:.3f} tok/s={tps}", refresh=False)
        elif step == self.total or step - self.last_line >= max(self.total // 10, 1):
            self.last_line = step
            print(f"  step {step}/{self.total} loss={loss:.3f} tok/s={tps}", file=sys.stderr)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate (cgroup limit included), if known."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as fh:
                found.append(int(limit) - int(fh.read().strip()))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return max(min(found), 0)


def check_step_memory(
    make_step: Callable[[int], Callable],
    step_fn,
    state: ModelState,
    tokens: jax.Array,
    *,
    batch_size: int,
    desc: str,
):
    """Compiles ``step_fn`` for ``state`` and checks that a step fits in the available memory.

    ``make_step(n)`` makes the same step for batches of ``n`` tokens (used to
    say which batch size fits).

    The need is XLA's compiled memory analysis of the step: its temporaries and
    outputs, less the outputs written over donated inputs.

    Raises:
      ResourceError: the step needs more than ``MEMORY_FRACTION`` of the
        available memory; the message says which batch size fits.
    """
    need = _step_memory(step_fn, state, tokens)
    available = available_memory()
    if need is None or available is None:
        return
    budget = MEMORY_FRACTION * available
    if need <= budget:
        return
    # The need grows about linearly with the batch: measure the part that does not,
    # estimate the batch that fits, and check the estimate (halving it until it fits).
    fixed = _step_memory(make_step(1), state, tokens) if batch_size > 1 else need
    per_token = (need - fixed) / max(batch_size - 1, 1)
    fits = int((budget - fixed) // per_token) + 1 if per_token > 0 and budget > fixed else 0
    for _ in range(8):
        if fits <= 1 or _step_memory(make_step(fits), state, tokens) <= budget:
            break
        fits //= 2
    advice = (
        f"use --batch-size {fits:,} or less"
        if fits >= 1
        else "even --batch-size 1 does not fit: use a smaller --vocab-size or --text"
    )
    raise ResourceError(
        f"--batch-size {batch_size}: a training step of the {desc} model needs about "
        f"{_size(need)} of memory and {_size(available)} is available; {advice}"
    )


def _step_memory(step_fn, state: ModelState, tokens: jax.Array) -> int | None:
    compiled = step_fn.lower(state.params, state.opt_state, tokens, jnp.int32(state.step)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def train(
    state: ModelState,
    make_step: Callable[[int], Callable],
    tokens: jax.Array,
    *,
    steps: int,
    batch_size: int,
    desc: str,
    save: Callable[[], None] | None = None,
    save_every_s: float | None = None,
    interrupts: Interrupts | None = None,
) -> ModelState:
    """Trains ``state`` in place up to ``steps`` steps; ``save()`` now and then and at the end.

    ``make_step(batch_size)`` makes the training step (:func:`make_train_step`
    with its other arguments bound).  The step is compiled first and checked
    against the available memory (:func:`check_step_memory`); the first step of
    the session is not timed.  SIGINT and SIGTERM (through ``interrupts``, the
    run's :class:`Interrupts`; default: one installed for this call) stop the
    training after the current step.  ``save`` runs every ``save_every_s``
    seconds (default ``SAVE_EVERY_S``) and, when the session trained at least
    one step, at the end, also after an exception while the state is intact.

    Raises:
      ResourceError: a step does not fit in memory (nothing is trained).
      Interrupted: after a signal, once the state is saved.
    """
    if state.step >= steps:
        return state
    if interrupts is None:
        with Interrupts() as interrupts:
            return train(
                state,
                make_step,
                tokens,
                steps=steps,
                batch_size=batch_size,
                desc=desc,
                save=save,
                save_every_s=save_every_s,
                interrupts=interrupts,
            )
    save_every_s = SAVE_EVERY_S if save_every_s is None else save_every_s
    t_session = time.perf_counter()
    step_fn = make_step(batch_size)
    check_step_memory(make_step, step_fn, state, tokens, batch_size=batch_size, desc=desc)
    saved_step = state.step  # the step the checkpoint on disk holds (or the fresh state)
    bar = _Progress(desc, steps, state.step)
    try:
        with interrupts.deferred():
            try:
                session_tokens, t_first, last_save = 0, None, time.perf_counter()
                while state.step < steps and interrupts.signum is None:
                    params, opt_state, loss, touched = step_fn(
                        state.params, state.opt_state, tokens, jnp.int32(state.step)
                    )
                    state.params, state.opt_state = params, opt_state
                    state.step += 1
                    loss = float(loss)  # waits for the step
                    state.losses.append(loss)
                    for name, fraction in touched.items():
                        state.touched_sums[name] = state.touched_sums.get(name, 0.0) + float(
                            fraction
                        )
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                        state.compile_seconds += now - t_session
                        base_tokens, base_seconds = state.timed_tokens, state.timed_seconds
                    else:
                        session_tokens += batch_size
                        state.timed_tokens = base_tokens + session_tokens
                        state.timed_seconds = base_seconds + (now - t_first)
                    bar.update(state.step, loss, state.tokens_per_s)
                    if save is not None and now - last_save >= save_every_s:
                        save()
                        saved_step, last_save = state.step, time.perf_counter()
            except BaseException:
                # Keep what the session learned unless a second signal forced the exit
                # (the state may then be half-updated) or a step lost its donated arrays.
                if save is not None and state.step > saved_step and not interrupts.forced:
                    if state.is_live():
                        try:
                            save()
                        except BaseException:  # the first error is the one to report
                            pass
                raise
            if save is not None and state.step > saved_step:
                save()
    finally:
        bar.close()
    interrupts.check()
    return state


def make_evaluator(output: _model.Output, contexts: np.ndarray, targets: np.ndarray, chunk: int):
    """A function of the parameters: the mean NLL over the fixed validation sample."""
    n = (len(targets) // chunk) * chunk
    xs = jnp.asarray(contexts[:n].reshape(-1, chunk, contexts.shape[1]))
    ys = jnp.asarray(targets[:n].reshape(-1, chunk))

    @jax.jit
    def total_nll(params):
        def body(acc, xy):
            return acc + jnp.sum(_model.nll(params, output, *xy)), None

        acc, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ys))
        return acc

    return lambda params: float(total_nll(params)) / n
