"""``python -m blocksparse_jax demo``: every user error is exit code 2 and one line on stderr.

Each case runs ``main(argv)`` in this process on a small generated text and
checks the exit code, that stderr holds exactly one line (no traceback) and
what the line says.  Checkpoint files are damaged copies of a real one.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile

import numpy as np
import pytest

pytest.importorskip("optax")
# The module-scoped fixtures (a demo run, the compilation cache) are set up on one worker.
pytestmark = pytest.mark.xdist_group("test_demo_errors")

from blocksparse_jax.__main__ import main  # noqa: E402
from blocksparse_jax.demo import _corpus, _report, _train  # noqa: E402
from tests.demo_support import (  # noqa: E402
    bad,
    compilation_cache_for_demo_runs,  # noqa: E402, F401
    write_text,
)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "prog.py", n_lines=300)


#: Options of the checkpoint fixture; a run with these resumes from it.
RUN = ["--steps", "2", "--batch-size", "8", "--no-baseline"]


@pytest.fixture(scope="module")
def checkpoint(text, tmp_path_factory):
    """A real checkpoint of a 2-step run: (path, its bytes)."""
    d = tmp_path_factory.mktemp("ckpt")
    path = d / "good.npz"
    argv = ["demo", "--text", str(text), *RUN, "--out", str(d / "out"), "--checkpoint", str(path)]
    assert main(argv) == 0
    return path, path.read_bytes()


def _run_with(text, tmp_path, ckpt, capsys, *needles):
    argv = ["--text", str(text), *RUN, "--out", str(tmp_path / "out"), "--checkpoint", str(ckpt)]
    return bad(argv, capsys, *needles)


# ---- damaged, truncated and foreign checkpoints ----------------------------------------


@pytest.mark.parametrize("where", [0.02, 0.3, 0.6, 0.97])
def test_corrupt_checkpoint(where, checkpoint, text, tmp_path, capsys):
    _, data = checkpoint
    bad = bytearray(data)
    i = int(len(bad) * where)
    for j in range(i, min(i + 16, len(bad))):
        bad[j] ^= 0xA5
    path = tmp_path / "corrupt.npz"
    path.write_bytes(bytes(bad))
    line = _run_with(text, tmp_path, path, capsys, repr(str(path)), "delete it or give another")
    assert "damaged" in line or "not a checkpoint" in line
    assert path.read_bytes() == bytes(bad)  # a file we cannot read is never overwritten


@pytest.mark.parametrize("keep", [0, 10, 0.5, -22])
def test_truncated_checkpoint(keep, checkpoint, text, tmp_path, capsys):
    _, data = checkpoint
    n = int(len(data) * keep) if isinstance(keep, float) else (keep % len(data))
    path = tmp_path / "truncated.npz"
    path.write_bytes(data[:n])
    _run_with(text, tmp_path, path, capsys, "is not a checkpoint of this demo")


def test_foreign_npz_and_other_files(text, tmp_path, capsys):
    foreign = tmp_path / "weights.npz"
    np.savez(foreign, W=np.ones((3, 4)), b=np.zeros(4))
    _run_with(text, tmp_path, foreign, capsys, "an .npz archive but not a checkpoint", "'W'")
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(5))
    _run_with(text, tmp_path, npy, capsys, "is not a checkpoint of this demo")
    txt = tmp_path / "notes.txt"
    txt.write_text("not a checkpoint\n", encoding="utf-8")
    _run_with(text, tmp_path, txt, capsys, "is not a checkpoint of this demo")
    assert txt.read_text(encoding="utf-8") == "not a checkpoint\n"


def _rewrite(src, dst, edit_header=None, edit_arrays=None):
    """A copy of checkpoint ``src`` with its header and arrays edited."""
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    if edit_header is not None:
        header = edit_header(header)
    if edit_arrays is not None:
        edit_arrays(arrays)
    if header is not None:
        arrays["header"] = np.array(json.dumps(header))
    np.savez(dst, **arrays)
    return dst


def _drop(key):
    def edit(h):
        del h[key]
        return h

    return edit


@pytest.mark.parametrize(
    "edit_header, needle",
    [
        (_drop("config"), "holds no run configuration"),
        (_drop("models"), "lists no models"),
        (lambda h: {**h, "version": 99}, "version 99"),
        (lambda h: [1, 2], "header is a JSON list"),
        (lambda h: {**h, "config": "x"}, "run configuration is not a JSON object"),
        (lambda h: {**h, "models": {"mystery": h["models"]["hsoftmax"]}}, "unknown model"),
        (
            lambda h: {**h, "models": {"hsoftmax": {**h["models"]["hsoftmax"], "step": -1}}},
            "'step'",
        ),
        (
            lambda h: {**h, "models": {"hsoftmax": {**h["models"]["hsoftmax"], "losses": [1.0]}}},
            "loss history",
        ),
        (
            lambda h: {**h, "models": {"hsoftmax": {**h["models"]["hsoftmax"], "n_leaves": 99}}},
            "lacks the array",
        ),
        (lambda h: None, "no 'header'"),
    ],
    ids=[
        "no-config",
        "no-models",
        "version",
        "list",
        "config-str",
        "unknown-kind",
        "step",
        "losses",
        "n-leaves",
        "no-header",
    ],
)
def test_checkpoint_with_a_bad_header(edit_header, needle, checkpoint, text, tmp_path, capsys):
    path = _rewrite(checkpoint[0], tmp_path / "edited.npz", edit_header=edit_header)
    _run_with(text, tmp_path, path, capsys, needle)


def test_checkpoint_with_a_damaged_header(checkpoint, text, tmp_path, capsys):
    path = tmp_path / "edited.npz"
    with np.load(checkpoint[0]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["header"] = np.array("{not json")
    np.savez(path, **arrays)
    _run_with(text, tmp_path, path, capsys, "damaged header")


def test_checkpoint_with_arrays_of_another_model(checkpoint, text, tmp_path, capsys):
    def reshape(arrays):
        arrays["hsoftmax/0000"] = arrays["hsoftmax/0000"][:-1]

    path = _rewrite(checkpoint[0], tmp_path / "a.npz", edit_arrays=reshape)
    _run_with(text, tmp_path, path, capsys, "arrays do not match this model")

    def strings(arrays):
        arrays["hsoftmax/0001"] = np.array(["a", "b"])

    path = _rewrite(checkpoint[0], tmp_path / "b.npz", edit_arrays=strings)
    _run_with(text, tmp_path, path, capsys, "are not numbers")


def test_checkpoint_of_a_pickle(checkpoint, text, tmp_path, capsys):
    """An object array (a pickle) inside the archive is refused, never unpickled."""

    def objects(arrays):
        arrays["hsoftmax/0002"] = np.array([{"a": 1}], dtype=object)

    path = tmp_path / "p.npz"
    with np.load(checkpoint[0]) as z:
        arrays = {k: z[k] for k in z.files}
    objects(arrays)
    np.savez(path, **arrays)
    _run_with(text, tmp_path, path, capsys, "holds pickled Python objects")


def test_checkpoint_paths(checkpoint, text, tmp_path, capsys):
    _run_with(text, tmp_path, tmp_path, capsys, "is a folder")
    _run_with(text, tmp_path, "/dev/null", capsys, "not a regular file")
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    _run_with(text, tmp_path, afile / "c.npz", capsys, "is not a folder")
    link = tmp_path / "dangling.npz"
    link.symlink_to(tmp_path / "nowhere.npz")
    _run_with(text, tmp_path, link, capsys, "not a regular file")


def test_checkpoint_of_another_run(checkpoint, text, tmp_path, capsys):
    argv = ["--text", str(text), "--steps", "2", "--batch-size", "4", "--no-baseline"]
    argv += ["--out", str(tmp_path / "o"), "--checkpoint", str(checkpoint[0])]
    bad(argv, capsys, "batch_size 8 there, 4 now")


# ---- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needle",
    [
        (
            ["--seed", str(2**64)],
            "--seed: must be less than 2**64 (64 bits), got 18446744073709551616",
        ),
        (["--seed", str(10**40)], "--seed: must be less than 2**64"),
        (["--seed", "-1"], "--seed: must be a non-negative integer, got -1"),
        (["--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
        (["--steps", str(2**31)], "--steps: must be at most 2,147,483,647 (int32), got 2147483648"),
        (["--batch-size", "-4"], "--batch-size: must be a positive integer, got -4"),
        (["--batch-size", str(2**31)], "--batch-size: must be at most 2,147,483,647"),
        (["--vocab-size", "0"], "--vocab-size: must be at least 4"),
        (["--vocab-size", "x" * 100], "--vocab-size: expected an integer, got 'xxxxxxxx"),
        (["--out", ""], "--out: expected a path, got an empty string"),
        (["--text", ""], "--text: expected a path, got an empty string"),
        (["--checkpoint", ""], "--checkpoint: expected a path, got an empty string"),
    ],
)
def test_bad_option_values(argv, needle, capsys, tmp_path):
    line = bad([*argv, "--out", str(tmp_path / "out")] if "--out" not in argv else argv, capsys)
    assert needle in line


def test_seed_uses_all_64_bits():
    """Seeds differing only above bit 32 give different keys; small seeds are jax.random.key."""
    import jax

    def data(k):
        return np.asarray(jax.random.key_data(k)).tolist()

    assert data(_train.seed_key(5)) == data(jax.random.key(5))
    keys = [data(_train.seed_key(s)) for s in (0, 2**32, 2**63, 2**64 - 1, 2**64 - 2**32)]
    assert len({str(k) for k in keys}) == len(keys)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        _train.seed_key(2**64)


def test_largest_seed_runs(text, tmp_path):
    argv = ["demo", "--text", str(text), "--steps", "1", "--batch-size", "4", "--no-baseline"]
    assert main([*argv, "--seed", str(2**64 - 1), "--out", str(tmp_path / "o")]) == 0


def test_batch_size_too_large_for_memory(text, tmp_path, capsys, monkeypatch):
    argv = ["--text", str(text), "--steps", "1", "--no-baseline", "--out", str(tmp_path / "o")]
    # Terabytes of activations: more than any machine running this test has.
    bad(
        [*argv, "--batch-size", str(2**31 - 1)],
        capsys,
        "--batch-size 2147483647",
        "or less",
    )
    # A machine with 1 MiB free refuses a step that a bigger one runs.
    monkeypatch.setattr(_train, "available_memory", lambda: 2**20)
    line = bad([*argv, "--batch-size", "8192"], capsys, "MiB is available")
    fits = int(line.split("use --batch-size ")[1].split(" or less")[0].replace(",", ""))
    assert 1 <= fits < 8192
    assert main(["demo", *argv, "--batch-size", str(fits)]) == 0  # the advice holds
    capsys.readouterr()
    ckpt = tmp_path / "c.npz"
    monkeypatch.setattr(_train, "available_memory", lambda: 2**10)
    bad(
        [*argv, "--batch-size", "2", "--checkpoint", str(ckpt)],
        capsys,
        "even --batch-size 1 does not fit",
    )
    assert not ckpt.exists()  # nothing trained, nothing written


def test_out_of_memory_while_running(text, tmp_path, capsys, monkeypatch):
    """An allocation failure XLA reports at run time is one line, not a traceback."""
    import jax

    real = _train.make_train_step

    def failing(*args, **kwargs):
        step = real(*args, **kwargs)

        class Step:
            lower = step.lower

            def __call__(self, *a):
                raise jax.errors.JaxRuntimeError(
                    "RESOURCE_EXHAUSTED: Out of memory allocating 123456789 bytes."
                )

        return Step()

    monkeypatch.setattr(_train, "make_train_step", failing)
    argv = ["--text", str(text), *RUN, "--out", str(tmp_path / "o")]
    bad(argv, capsys, "out of memory (RESOURCE_EXHAUSTED", "--batch-size", last_line_only=True)


# ---- --text ------------------------------------------------------------------------------


def test_text_that_is_not_a_regular_file(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    bad(["--text", "/dev/null", *out], capsys, "'/dev/null' is not a regular file or a folder")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    bad(["--text", str(fifo), *out], capsys, "is not a regular file or a folder")
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "missing.txt")
    bad(["--text", str(link), *out], capsys, "symbolic link to a missing file")
    bad(["--text", str(tmp_path / "missing.txt"), *out], capsys, "no such file or folder")


def test_empty_texts(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o")]
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    bad(["--text", str(empty), *out], capsys, "the corpus is empty (an empty file)")
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / ".hidden").write_text("x y z\n", encoding="utf-8")
    bad(["--text", str(folder), *out], capsys, "the corpus is empty (a folder without files)")


def test_folder_with_pipes_and_links_is_read_without_them(text, tmp_path, capsys):
    """A pipe in a --text folder would block a reader forever: it is skipped, like broken links."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.py").write_text(text.read_text(encoding="utf-8"), encoding="utf-8")
    os.mkfifo(folder / "pipe")
    (folder / "broken").symlink_to(tmp_path / "missing")
    assert _corpus.text_files(str(folder)) == [str(folder / "a.py")]
    argv = ["demo", "--text", str(folder), "--steps", "1", "--batch-size", "4", "--no-baseline"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0


def test_unreadable_text(text, tmp_path, capsys, monkeypatch):
    """Permission errors (simulated: the tests may run as root, which reads everything)."""
    real_open = open
    denied = str(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_text("a b c\n", encoding="utf-8")

    def guarded_open(path, *args, **kwargs):
        if str(path) == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    bad(
        ["--text", denied, "--out", str(tmp_path / "o")], capsys, "cannot read", "Permission denied"
    )
    monkeypatch.undo()

    real_scandir = os.scandir
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)

    def guarded_scandir(path="."):
        if os.fspath(path) == str(locked / "sub"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    bad(
        ["--text", str(locked), "--out", str(tmp_path / "o")],
        capsys,
        "cannot list the folder",
        "sub",
    )


# ---- --out and --checkpoint folders ----------------------------------------------------


def test_out_paths(text, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    argv = ["--text", str(text), *RUN]
    bad([*argv, "--out", str(afile)], capsys, "exists and is not a folder")
    bad([*argv, "--out", str(afile / "sub")], capsys, "cannot create the folder", "Not a directory")


def _deny_writes_in(monkeypatch, folder):
    """Simulates a folder we may not write in (root may write everywhere)."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_folders_that_cannot_be_written(text, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_writes_in(monkeypatch, ro)
    argv = ["--text", str(text), *RUN]
    bad(
        [*argv, "--out", str(ro)],
        capsys,
        f"--out {str(ro)!r}: cannot write in",
        "Permission denied",
    )
    out = ["--out", str(tmp_path / "o")]
    bad(
        [*argv, *out, "--checkpoint", str(ro / "c.npz")],
        capsys,
        "cannot write in",
        "Permission denied",
    )


def test_full_disk_while_saving_keeps_the_last_checkpoint(text, tmp_path, capsys, monkeypatch):
    """A save that fails midway: one line, the previous checkpoint intact, no temporary file."""
    ckpt = tmp_path / "c.npz"
    argv = [
        "demo",
        "--text",
        str(text),
        "--batch-size",
        "8",
        "--no-baseline",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--steps", "2", "--checkpoint", str(ckpt)]) == 0
    before = ckpt.read_bytes()
    capsys.readouterr()
    real = np.savez

    def savez_then_disk_full(fh, **arrays):
        real(fh, **arrays)
        fh.truncate(fh.tell() // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_disk_full)
    bad(
        [*argv[1:], "--steps", "4", "--checkpoint", str(ckpt)],
        capsys,
        "cannot write it (No space left on device)",
        "last complete save",
        last_line_only=True,
    )
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "o"]


def test_results_that_cannot_be_written(text, tmp_path, capsys, monkeypatch):
    def full_disk(out_dir, m):
        raise OSError(
            errno.ENOSPC, "No space left on device", os.path.join(out_dir, "metrics.json")
        )

    monkeypatch.setattr(_report, "write_outputs", full_disk)
    argv = ["--text", str(text), *RUN, "--out", str(tmp_path / "o")]
    bad(argv, capsys, "cannot write metrics.json (No space left on device)", last_line_only=True)


def test_every_error_line_is_a_single_line():
    """Messages built from paths with newlines stay one line (repr quotes them)."""
    with pytest.raises(_corpus.CorpusError) as e:
        _corpus.text_files("/no/such\npath")
    assert "\n" not in str(e.value)
