"""``python -m blocksparse_jax demo --checkpoint``: interrupts and crashes at any point.

An interrupted run must leave a checkpoint that loads, and resuming must reach
exactly the result of an uninterrupted run with the same options: the same
parameters and optimizer state (bit for bit), the same loss history and the
same validation perplexities.  Interrupts are injected three ways:

- deterministically, in this process: ``signal.raise_signal`` inside a training
  step (after the step donated its inputs) and inside a checkpoint save;
- at random times, in this process: SIGINT from a timer thread;
- at random times, in a real ``python`` process: SIGTERM and SIGKILL (a crash,
  possibly in the middle of writing the checkpoint).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("optax")
# The module-scoped fixtures (a demo run, the compilation cache) are set up on one worker.
pytestmark = pytest.mark.xdist_group("test_demo_faults")

from blocksparse_jax.__main__ import main  # noqa: E402
from blocksparse_jax.demo import _checkpoint, _train  # noqa: E402
from tests.demo_support import compilation_cache_for_demo_runs, write_text  # noqa: E402, F401

#: Both models, small enough that a run takes a second or two once compiled.
STEPS = 40
OPTS = ["--steps", str(STEPS), "--batch-size", "8", "--seed", "7"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "prog.py", n_lines=200)


def _argv(text, out, ckpt):
    return ["demo", "--text", str(text), *OPTS, "--out", str(out), "--checkpoint", str(ckpt)]


def _read(path):
    """(header, {name: array}) of a checkpoint, read directly."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "header"}
        header = json.loads(str(z["header"]))
    return header, arrays


@pytest.fixture(scope="module")
def reference(text, tmp_path_factory):
    """An uninterrupted run: its checkpoint, its metrics and its wall time."""
    d = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    assert main(_argv(text, d / "out", d / "ref.npz")) == 0
    seconds = time.perf_counter() - t0
    metrics = json.loads((d / "out" / "metrics.json").read_text(encoding="utf-8"))
    return (*_read(d / "ref.npz"), metrics, seconds)


def _assert_loads(path, reference):
    """The checkpoint left behind loads for this run, with a consistent history."""
    header, leaves = _checkpoint.load_checkpoint(str(path), reference[0]["config"])
    for kind, meta in header["models"].items():
        assert 0 <= meta["step"] <= STEPS
        assert len(meta["losses"]) == meta["step"]
        # the history so far is the uninterrupted run's
        assert meta["losses"] == reference[0]["models"][kind]["losses"][: meta["step"]]
    return {kind: meta["step"] for kind, meta in header["models"].items()}


def _assert_same_result(path, out, reference):
    ref_header, ref_arrays, ref_metrics, _ = reference
    header, arrays = _read(path)
    for kind in ("hsoftmax", "full"):
        got, want = header["models"][kind], ref_header["models"][kind]
        assert got["step"] == want["step"] == STEPS
        assert got["losses"] == want["losses"]
    assert arrays.keys() == ref_arrays.keys()
    for name, want in ref_arrays.items():
        np.testing.assert_array_equal(arrays[name], want, err_msg=name)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    keys = ("loss_hsoftmax", "loss_full", "val_ppl_hsoftmax", "val_ppl_full")
    for key in (*keys, "touched_hsoftmax", "touched_full"):
        assert metrics[key] == ref_metrics[key], key


def _no_temporary_files(folder):
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


class _Hooks:
    """Raises SIGINT inside the n-th step call of a model, or inside the n-th save."""

    def __init__(self, monkeypatch):
        self.step_calls = {}
        self.saves = 0
        self.at_step = None  # (kind, n)
        self.at_save = None  # n
        real_make, real_savez = _train.make_train_step, np.savez

        def make_train_step(optimizer, output, **kwargs):
            jitted = real_make(optimizer, output, **kwargs)
            hooks = self

            class Step:
                lower = jitted.lower

                def __call__(self, *args):
                    result = jitted(*args)  # the inputs are donated now
                    n = hooks.step_calls[output.kind] = hooks.step_calls.get(output.kind, 0) + 1
                    if hooks.at_step == (output.kind, n):
                        signal.raise_signal(signal.SIGINT)
                    return result

            return Step()

        def savez(fh, **arrays):
            self.saves += 1
            if self.saves == self.at_save:
                signal.raise_signal(signal.SIGINT)  # arrives as the file is being written
            real_savez(fh, **arrays)

        monkeypatch.setattr(_train, "make_train_step", make_train_step)
        monkeypatch.setattr(np, "savez", savez)

    def arm(self, *, at_step=None, at_save=None):
        self.step_calls, self.saves = {}, 0
        self.at_step, self.at_save = at_step, at_save


def test_interrupts_inside_steps_and_saves(text, reference, tmp_path, capsys, monkeypatch):
    hooks = _Hooks(monkeypatch)
    ckpt, out = tmp_path / "c.npz", tmp_path / "out"
    argv = _argv(text, out, ckpt)

    # 1. SIGINT right after the 3rd step donated its inputs: that step is kept.
    hooks.arm(at_step=("hsoftmax", 3))
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted (SIGINT)" in err and "h_softmax at step 3" in err, err
    assert _assert_loads(ckpt, reference) == {"hsoftmax": 3}
    _no_temporary_files(tmp_path)

    # 2. SIGINT during the 2nd save of a session that saves after every step.
    monkeypatch.setattr(_train, "SAVE_EVERY_S", 0.0)
    hooks.arm(at_save=2)
    assert main(argv) == 130
    assert _assert_loads(ckpt, reference) == {"hsoftmax": 5}
    _no_temporary_files(tmp_path)
    monkeypatch.setattr(_train, "SAVE_EVERY_S", 60.0)

    # 3. SIGINT inside the first (compiling) step of the baseline.
    hooks.arm(at_step=("full", 1))
    assert main(argv) == 130
    assert _assert_loads(ckpt, reference) == {"hsoftmax": STEPS, "full": 1}

    # 4. SIGINT during the final save of the baseline: the save completes first.
    hooks.arm(at_save=1)
    assert main(argv) == 130
    assert _assert_loads(ckpt, reference) == {"hsoftmax": STEPS, "full": STEPS}
    _no_temporary_files(tmp_path)

    # 5. Nothing left to train: evaluate and report, as the uninterrupted run did.
    hooks.arm()
    capsys.readouterr()
    assert main(argv) == 0
    assert "already at step 40" in capsys.readouterr().out
    _assert_same_result(ckpt, out, reference)


def _run_with_sigint_after(argv, delay):
    """``main(argv)`` with a real SIGINT ``delay`` seconds in (if it is still running)."""
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    code = None
    try:
        timer.start()
        code = main(argv)
        timer.cancel()
        timer.join()
    except KeyboardInterrupt:  # the signal arrived just after main returned
        timer.cancel()
        timer.join()
    return code


def test_sigint_at_random_times(text, reference, tmp_path, capsys, monkeypatch):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    monkeypatch.setattr(_train, "SAVE_EVERY_S", 0.0)  # saves all the time: SIGINT can hit one
    ckpt, out = tmp_path / "c.npz", tmp_path / "out"
    argv = _argv(text, out, ckpt)
    span = min(reference[3], 10.0)
    delays = []
    for _ in range(4):
        delays.append(round(rng.uniform(0.05, span), 3))
        code = _run_with_sigint_after(argv, delays[-1])
        assert code in (0, 130, None), (seed, delays, code)
        if ckpt.exists():
            _assert_loads(ckpt, reference)
        _no_temporary_files(tmp_path)
    monkeypatch.setattr(_train, "SAVE_EVERY_S", 60.0)
    capsys.readouterr()
    assert main(argv) == 0, (seed, delays)
    _assert_same_result(ckpt, out, reference)


#: Driver of the real processes: saves after every step, then ``main``.
DRIVER = (
    "import sys; from blocksparse_jax.demo import _train; _train.SAVE_EVERY_S = 0.0\n"
    "{patch}\n"
    "from blocksparse_jax.__main__ import main; sys.exit(main(sys.argv[1:]))"
)

#: A patch of the driver: the process kills itself (SIGKILL) halfway through writing its
#: 5th checkpoint (the temporary file holds half an archive).
KILL_IN_5TH_SAVE = """
import os, signal, numpy as np
real, calls = np.savez, []
def savez(fh, **arrays):
    calls.append(1)
    real(fh, **arrays)
    if len(calls) == 5:
        fh.truncate(fh.tell() // 2)
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
np.savez = savez
"""


def _subprocess_run(text, out, ckpt, cache_dir, signum, rng, patch=""):
    """A real process (saving after every step), sent ``signum`` at a random time of its run."""
    env = dict(os.environ)
    env.update(
        JAX_ENABLE_X64="1" if _x64() else "0",  # the configuration of this process
        JAX_NUMPY_DTYPE_PROMOTION=_config("jax_numpy_dtype_promotion"),
        JAX_NUMPY_RANK_PROMOTION=_config("jax_numpy_rank_promotion"),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER.format(patch=patch), *_argv(text, out, ckpt)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    delay = None
    try:
        line = proc.stdout.readline()  # the corpus line: training starts now
        assert line.startswith(("corpus:", "resuming")), line
        if signum is not None:
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr, delay


def _config(name):
    import jax

    return str(getattr(jax.config, name))


def _x64():
    import jax

    return bool(jax.config.jax_enable_x64)


def test_crash_in_a_save_sigterm_and_sigkill_of_a_real_process(
    text, reference, tmp_path, tmp_path_factory
):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    cache_dir = str(tmp_path_factory.getbasetemp() / "demo_jax_cache")
    ckpt, out = tmp_path / "c.npz", tmp_path / "out"

    # A crash halfway through writing the 5th save: the 4th is intact.
    code, err, _ = _subprocess_run(text, out, ckpt, cache_dir, None, rng, patch=KILL_IN_5TH_SAVE)
    assert code == -signal.SIGKILL, err
    assert _assert_loads(ckpt, reference) == {"hsoftmax": 4}
    leftovers = list(tmp_path.glob(".c.npz.*.tmp"))  # the half-written temporary file
    assert len(leftovers) == 1
    leftovers[0].unlink()

    # SIGTERM at a random time: the run stops as on Ctrl-C.
    code, err, delay = _subprocess_run(text, out, ckpt, cache_dir, signal.SIGTERM, rng)
    assert "Traceback" not in err, err
    assert code in (0, 143), (seed, delay, code, err)
    if code == 143:
        assert "interrupted (SIGTERM)" in err.strip().splitlines()[-1], err
    _assert_loads(ckpt, reference)

    # SIGKILL at a random time (often in a save: the process saves after every step).
    code, err, delay = _subprocess_run(text, out, ckpt, cache_dir, signal.SIGKILL, rng)
    assert code in (0, -signal.SIGKILL), (seed, delay, code, err)
    _assert_loads(ckpt, reference)  # whatever the kill interrupted, the file is a complete save
    for leftover in tmp_path.glob(".c.npz.*.tmp"):
        leftover.unlink()

    assert main(_argv(text, out, ckpt)) == 0, (seed, delay)
    _assert_same_result(ckpt, out, reference)
