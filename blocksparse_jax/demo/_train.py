"""Training, evaluation and checkpoints for the demo.

Batches are drawn on the device inside the jitted step: the positions of step
``i`` come from ``fold_in(key(seed), i)``, so a run resumed from a checkpoint
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from blocksparse_jax.demo import _model

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run (a user error)."""


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

    @property
    def tokens_per_s(self) -> float | None:
        return self.timed_tokens / self.timed_seconds if self.timed_seconds > 0 else None


def make_train_step(optimizer, output: _model.Output, *, context: int, batch_size: int, key):
    """A jitted ``(params, opt_state, tokens, step) -> (params, opt_state, loss)``."""

    def step_fn(params, opt_state, tokens, step):
        step_key = jax.random.fold_in(key, step)
        positions = jax.random.randint(
            step_key, (batch_size,), context, tokens.shape[0], dtype=jnp.int32
        )
        contexts, targets = _model.gather_windows(tokens, positions, context)
        loss, grads = jax.value_and_grad(_model.mean_nll)(params, output, contexts, targets)
        # optax computes Adam's bias correction as ``float ** int32 count``, which the
        # strict promotion mode some users (and our tests) run under rejects.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        return params, opt_state, loss

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


def train(
    state: ModelState,
    step_fn: Callable,
    tokens: jax.Array,
    *,
    steps: int,
    batch_size: int,
    desc: str,
    save: Callable[[], None] | None = None,
    save_every_s: float = 60.0,
) -> ModelState:
    """Trains ``state`` in place up to ``steps`` steps; ``save()`` now and then and at the end.

    The first step of the session compiles and is not timed.  On
    ``KeyboardInterrupt`` the state is saved (when ``save`` is given) and the
    exception propagates.
    """
    if state.step >= steps:
        return state
    bar = _Progress(desc, steps, state.step)
    session_tokens, t_first, last_save = 0, None, time.perf_counter()
    pending = None
    try:
        while state.step < steps:
            t0 = time.perf_counter()
            params, opt_state, loss = step_fn(
                state.params, state.opt_state, tokens, jnp.int32(state.step)
            )
            # The old arrays were donated: keep the new ones before anything can interrupt.
            state.params, state.opt_state = params, opt_state
            state.step += 1
            pending = loss
            loss = float(loss)  # waits for the step
            state.losses.append(loss)
            pending = None
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                state.compile_seconds += now - t0
                base_tokens, base_seconds = state.timed_tokens, state.timed_seconds
            else:
                session_tokens += batch_size
                state.timed_tokens = base_tokens + session_tokens
                state.timed_seconds = base_seconds + (now - t_first)
            bar.update(state.step, loss, state.tokens_per_s)
            if save is not None and now - last_save >= save_every_s:
                save()
                last_save = time.perf_counter()
    finally:
        bar.close()
        if pending is not None:  # interrupted while waiting for a step's loss
            state.losses.append(float(pending))
        if save is not None:
            save()
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


# --------------------------------------------------------------------------------------
# Checkpoints: one .npz with the leaves of every model's (params, opt_state) and a JSON
# header; written to a temporary file and renamed, so an interrupted save leaves the
# previous checkpoint intact.
# --------------------------------------------------------------------------------------


def save_checkpoint(
    path: str,
    config: dict,
    states: dict[str, ModelState],
    kept: dict[str, tuple[list[np.ndarray], dict]] | None = None,
) -> None:
    """Writes ``states`` and, unchanged, the ``kept`` models of a loaded checkpoint."""
    arrays, header = {}, {"version": CHECKPOINT_VERSION, "config": config, "models": {}}
    models = dict(kept or {})
    for kind, st in states.items():
        leaves = jax.tree_util.tree_leaves((st.params, st.opt_state))
        models[kind] = (
            leaves,
            {
                "step": st.step,
                "losses": st.losses,
                "timed_tokens": st.timed_tokens,
                "timed_seconds": st.timed_seconds,
                "compile_seconds": st.compile_seconds,
            },
        )
    for kind, (leaves, meta) in models.items():
        for i, leaf in enumerate(leaves):
            arrays[f"{kind}/{i:04d}"] = np.asarray(leaf)
        header["models"][kind] = {**meta, "n_leaves": len(leaves)}
    arrays["header"] = np.array(json.dumps(header))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str, config: dict) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """``(header, {kind: leaves})`` of a checkpoint written for the same ``config``.

    Raises:
      CheckpointError: not a demo checkpoint, or written with other options.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path!r} is a folder; give a file path")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            leaves = {
                kind: [z[f"{kind}/{i:04d}"] for i in range(m["n_leaves"])]
                for kind, m in header["models"].items()
            }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"--checkpoint {path!r} is not a checkpoint of this demo ({type(e).__name__}: {e}); "
            "delete it or give another path"
        ) from None
    if header.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"--checkpoint {path!r}: unsupported version {header.get('version')}")
    saved = header["config"]
    diff = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} there, {config.get(k)!r} now" for k in diff)
        raise CheckpointError(
            f"--checkpoint {path!r} was written for a different run ({what}); "
            "use the same options to resume, or another --checkpoint path"
        )
    return header, leaves


def restore(fresh: ModelState, leaves: list[np.ndarray], meta: dict) -> ModelState:
    """``fresh`` with the saved leaves (checked against its shapes and dtypes) and history."""
    ref, treedef = jax.tree_util.tree_flatten((fresh.params, fresh.opt_state))
    if len(ref) != len(leaves) or any(
        np.shape(a) != np.shape(b) or np.asarray(a).dtype != b.dtype
        for a, b in zip(ref, leaves, strict=True)
    ):
        raise CheckpointError("the checkpoint's arrays do not match this model; use another path")
    params, opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in leaves])
    return ModelState(
        params,
        opt_state,
        step=int(meta["step"]),
        losses=list(meta["losses"]),
        timed_tokens=int(meta["timed_tokens"]),
        timed_seconds=float(meta["timed_seconds"]),
        compile_seconds=float(meta["compile_seconds"]),
    )
