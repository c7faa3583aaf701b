"""Shared pieces of the demo's tests: a small text, the error-line check, a compilation cache.

Every in-process run of the demo traces and compiles the same small programs
again (the jitted functions close over the run's layout); a persistent
compilation cache, on only while a demo test module runs, compiles each once.
"""

from __future__ import annotations

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from blocksparse_jax.__main__ import main

PROG = "python -m blocksparse_jax demo: "

_CACHE_OPTIONS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_for_demo_runs(tmp_path_factory):
    """A persistent compilation cache in this session's temporary folder, for one module."""
    before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    folder = tmp_path_factory.getbasetemp() / "demo_jax_cache"
    folder.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def write_text(path, n_lines=500):
    """A small, very regular program: a model learns it within a few steps."""
    lines = [f"def f{i % 20}(x, y):\n    return x + y * {i % 7}\n" for i in range(n_lines)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def bad(argv, capsys, *needles, last_line_only=False):
    """Runs ``demo argv``; asserts exit code 2 and one error line (no traceback) with ``needles``.

    Errors found before training leave nothing else on stderr; with
    ``last_line_only`` (errors during or after training) the progress bar may
    precede the line.  Returns the line.
    """
    code = main(["demo", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if not last_line_only:
        assert len(lines) == 1, err
    line = lines[-1]
    assert line.startswith(PROG + "error: "), line
    for n in needles:
        assert n in line, line
    return line
