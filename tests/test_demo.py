"""``python -m blocksparse_jax demo``: tiny in-process runs, resuming, and bad arguments.

The runs call ``blocksparse_jax.__main__.main(argv)`` in this process (no JAX
start-up per run) on a small generated text, a few steps each.  Bad input is
covered by ``test_demo_errors.py``, interrupts by ``test_demo_faults.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("optax")
# The module-scoped fixtures (a demo run, the compilation cache) are set up on one worker.
pytestmark = pytest.mark.xdist_group("test_demo")

from blocksparse_jax.__main__ import main  # noqa: E402
from blocksparse_jax.demo import _corpus  # noqa: E402
from tests.demo_support import bad, compilation_cache_for_demo_runs, write_text  # noqa: E402, F401

METRIC_KEYS = {
    "vocab_size",
    "steps",
    "tokens_per_s_hsoftmax",
    "tokens_per_s_full",
    "speedup",
    "val_ppl_hsoftmax",
    "val_ppl_full",
    "val_ppl_unigram",
    "touched_hsoftmax",
    "touched_full",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run with the baseline and a checkpoint: (text, out, checkpoint, metrics)."""
    d = tmp_path_factory.mktemp("demo")
    text = write_text(d / "prog.py")
    out, ckpt = d / "out", d / "ckpt.npz"
    argv = ["demo", "--text", str(text), "--steps", "12", "--batch-size", "32"]
    code = main([*argv, "--out", str(out), "--checkpoint", str(ckpt), "--seed", "3"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return text, out, ckpt, metrics


def test_tiny_run_writes_metrics_and_learns(tiny_run):
    _, out, ckpt, m = tiny_run
    assert METRIC_KEYS <= set(m)
    assert m["steps"] == 12 and m["steps_full"] == 12
    assert m["vocab_size"] >= 4
    for key in ("val_ppl_hsoftmax", "val_ppl_full", "val_ppl_unigram"):
        assert math.isfinite(m[key]) and m[key] >= 1.0
    for key in ("tokens_per_s_hsoftmax", "tokens_per_s_full", "speedup"):
        assert m[key] > 0
    for key in ("loss_hsoftmax", "loss_full"):
        losses = np.asarray(m[key])
        assert losses.shape == (12,) and np.all(np.isfinite(losses))
        assert losses[-3:].mean() < losses[:3].mean()  # it learns
    # Both models read the same batches, so their embeddings' touched fractions agree.
    hs, full = m["touched_hsoftmax"], m["touched_full"]
    assert set(hs) == {".embed", ".out.W2", ".out.b2"} and set(full) == {".embed"}
    assert hs[".embed"] == full[".embed"] and hs[".out.W2"] == hs[".out.b2"]
    assert all(0 < v <= 1 for v in hs.values())
    assert len(m["top5"]) >= 1 and all(len(p["top"]) == 5 for p in m["top5"])
    probs = [p for _, p in m["top5"][0]["top"]]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert all(len(s["sample"]) > 0 for s in m["samples"])
    assert ckpt.exists() and (out / "summary.txt").exists()
    if _has_matplotlib():
        assert (out / "loss.png").stat().st_size > 0


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_resume_continues_the_step_count(tiny_run, tmp_path, capsys):
    text, _, ckpt, first = tiny_run
    out = tmp_path / "out"
    argv = ["demo", "--text", str(text), "--batch-size", "32", "--seed", "3", "--out", str(out)]
    code = main([*argv, "--steps", "20", "--checkpoint", str(ckpt), "--no-baseline"])
    assert code == 0
    assert "resuming from" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["steps"] == 20
    assert m["loss_hsoftmax"][:12] == first["loss_hsoftmax"]  # the history is kept
    assert len(m["loss_hsoftmax"]) == 20
    assert m["val_ppl_full"] is None and m["speedup"] is None  # --no-baseline
    # The baseline's state stays in the checkpoint, at its step.
    with np.load(ckpt) as z:
        header = json.loads(str(z["header"]))
    assert header["models"]["hsoftmax"]["step"] == 20
    assert header["models"]["full"]["step"] == 12


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "--steps: must be a positive integer, got 0"),
        (["--steps", "-3"], "--steps: must be a positive integer, got -3"),
        (["--steps", "many"], "--steps: expected an integer, got 'many'"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--vocab-size", "2"], "--vocab-size: must be at least 4"),
        (["--seed", "-1"], "--seed: must be a non-negative integer"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options(argv, needle, capsys, tmp_path):
    bad([*argv, "--out", str(tmp_path / "out")], capsys, needle)


def test_missing_text(capsys, tmp_path):
    missing = str(tmp_path / "nowhere.txt")
    bad(["--text", missing, "--out", str(tmp_path / "o")], capsys, "no such file or folder")


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("   \n\n", encoding="utf-8")
    bad(["--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")], capsys, "empty")
    folder = tmp_path / "binary"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(b"\x00\xff\xfe" * 10)
    bad(["--text", str(folder), "--out", str(tmp_path / "o")], capsys, "no UTF-8 text")


def test_vocabulary_too_small(capsys, tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("a b a b a b a b a b a b\n", encoding="utf-8")
    bad(["--text", str(text), "--out", str(tmp_path / "o")], capsys, "two classes")


def test_bad_out_and_checkpoint_paths(tiny_run, capsys, tmp_path):
    text = str(tiny_run[0])
    afile = tmp_path / "file"
    afile.write_text("x", encoding="utf-8")
    bad(["--text", text, "--out", str(afile)], capsys, "not a folder")
    out = str(tmp_path / "o")
    bad(["--text", text, "--out", out, "--checkpoint", str(tmp_path)], capsys, "is a folder")
    bad(["--text", text, "--out", out, "--checkpoint", str(afile)], capsys, "not a checkpoint")


def test_checkpoint_of_another_run(tiny_run, capsys, tmp_path):
    text, _, ckpt, _ = tiny_run
    argv = ["--text", str(text), "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt)]
    bad([*argv, "--batch-size", "16", "--seed", "3"], capsys, "batch_size 32 there, 16 now")


def test_command_line_exit_code(tmp_path):
    """The real ``python -m blocksparse_jax`` process: a bad option is exit code 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "blocksparse_jax", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--steps: must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_exits_zero(capsys):
    assert main(["demo", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_tokenizer_and_stdlib_discovery():
    toks = _corpus.tokenize("x = f(1.5e3, 'a b') ** 2  # note\n\n\ny->z\n")
    assert toks == ["x", "=", "f", "(", "1.5e3", ",", "'", "a", "b", "'", ")", "**", "2", "#"] + [
        "note",
        "\n",
        "y",
        "->",
        "z",
        "\n",
    ]
    root, files = _corpus.stdlib_files()
    assert _corpus.stdlib_files() == (root, files)  # deterministic
    rel = [os.path.relpath(f, root).split(os.sep) for f in files]
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(r[:-1]) for r in rel)
    assert ["os.py"] in rel and all(r[-1].endswith(".py") for r in rel)


def test_model_maps_words_and_outputs_consistently():
    """top_k / sample return word ids (never padding) whose NLL matches the top-k log-probs."""
    import jax
    import jax.numpy as jnp

    from blocksparse_jax import frequency_classes
    from blocksparse_jax.demo import _model

    counts = np.array([500, 3, 90, 40, 40, 7, 1, 2, 300, 12, 5, 60, 1], dtype=np.int64)
    V = counts.size
    layout = frequency_classes(counts, 4, max_class_size=-(-V // 4))
    assert layout.n_outputs > V  # there is padding to map around
    cfg = _model.ModelConfig(V, 3, 8, 16)
    params = _model.init_params(jax.random.key(0), cfg, "hsoftmax", layout)
    out = _model.Output.hsoftmax(layout)
    ctx = jax.random.randint(jax.random.key(1), (6, 3), 0, V, dtype=jnp.int32)

    @jax.jit  # one compilation instead of many eager ops
    def check(params, ctx):
        logp, words = _model.top_k(params, out, ctx, V)
        nll = _model.nll(params, out, jnp.repeat(ctx, V, axis=0), words.reshape(-1))
        return logp, words, nll, _model.sample(jax.random.key(2), params, out, ctx)

    logp, words, nll, drawn = check(params, ctx)
    assert words.dtype == jnp.int32 and bool(jnp.all((words >= 0) & (words < V)))
    # every word once per row, each with its exact log-probability
    assert all(sorted(row) == list(range(V)) for row in np.asarray(words).tolist())
    np.testing.assert_allclose(-np.asarray(nll), np.asarray(logp).reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(logp)).sum(axis=1), 1.0, rtol=1e-5)
    assert drawn.shape == (6,) and bool(jnp.all((drawn >= 0) & (drawn < V)))


@pytest.mark.parametrize("kind", ["full", "adaptive"])
def test_other_heads_map_words_and_outputs_consistently(kind):
    """As above for the exact and adaptive heads (the adaptive one maps words to frequency ranks)."""
    import jax
    import jax.numpy as jnp

    from blocksparse_jax.demo import _model

    counts = np.array([500, 3, 90, 40, 40, 7, 1, 2, 300, 12, 5, 60, 1], dtype=np.int64)
    V = counts.size
    cfg = _model.ModelConfig(V, 3, 8, 16)
    if kind == "adaptive":
        layout = _model.adaptive_layout(counts, 16)
        out = _model.Output.adaptive(layout)
    else:
        layout, out = None, _model.Output(kind)
    params = _model.init_params(jax.random.key(0), cfg, kind, layout)
    ctx = jax.random.randint(jax.random.key(1), (6, 3), 0, V, dtype=jnp.int32)

    @jax.jit
    def check(params, ctx):
        logp, words = _model.top_k(params, out, ctx, V)
        nll = _model.nll(params, out, jnp.repeat(ctx, V, axis=0), words.reshape(-1))
        return logp, words, nll, _model.sample(jax.random.key(2), params, out, ctx)

    logp, words, nll, drawn = check(params, ctx)
    assert all(sorted(row) == list(range(V)) for row in np.asarray(words).tolist())
    np.testing.assert_allclose(-np.asarray(nll), np.asarray(logp).reshape(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(logp)).sum(axis=1), 1.0, rtol=1e-5)
    assert drawn.shape == (6,) and bool(jnp.all((drawn >= 0) & (drawn < V)))


@pytest.mark.parametrize("output", ["full", "naive", "filtered", "sampled", "adaptive"])
def test_every_output_head_trains_and_reports(output, tmp_path):
    text = write_text(tmp_path / "prog.py")
    out = tmp_path / "out"
    argv = ["demo", "--text", str(text), "--steps", "3", "--batch-size", "16", "--out", str(out)]
    assert main([*argv, "--output", output, "--no-baseline"]) == 0
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert m["output"] == output and len(m[f"loss_{output}"]) == 3
    assert math.isfinite(m[f"val_ppl_{output}"]) and m["speedup"] is None
    assert m["val_ppl_full"] is None or output == "full"


def test_paths_are_shown_without_the_home_directory(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    assert _corpus.display_path("/home/alice/data/x.txt") == os.path.join("~", "data", "x.txt")
    assert _corpus.display_path("/home/alice") == "~"
    assert _corpus.display_path("/home/alicex/a.txt") == "/home/alicex/a.txt"
    assert _corpus.display_path("data/x.txt") == "data/x.txt"  # relative: as typed
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    monkeypatch.setattr(sys, "base_prefix", "/home/alice/py")
    monkeypatch.setattr(sys, "prefix", "/home/alice/py")
    assert _corpus.stdlib_description("/home/alice/py/lib/python3.x") == (
        f"the Python {version} standard library (sys.prefix/lib/python3.x, without test suites)"
    )
    monkeypatch.setattr(sys, "prefix", "/home/alice/venv")
    assert "(sys.base_prefix/lib/python3.x," in _corpus.stdlib_description(
        "/home/alice/py/lib/python3.x"
    )
    assert "(~/other/lib," in _corpus.stdlib_description("/home/alice/other/lib")
