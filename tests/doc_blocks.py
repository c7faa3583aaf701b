"""The code blocks of the README and the guides in ``docs/``, so that tests run what the docs show."""

import builtins
import json
import os
import pathlib
import re
import subprocess
import symtable
import sys
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
_FENCE = re.compile(r'^```python(?: title="([^"]*)")?\n(.*?)^```$', re.M | re.S)


class Block(NamedTuple):
    """A fenced python block: its page (relative to the repository), first line, title, code."""

    page: str
    line: int
    title: str | None
    code: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}" + (f" ({self.title})" if self.title else "")


def python_blocks() -> list[Block]:
    """Every ```` ```python ```` block of ``README.md`` and ``docs/*.md``, in page order."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = []
    for path in pages:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append(Block(str(path.relative_to(ROOT)), line, m.group(1), m.group(2)))
    return blocks


def free_names(code: str) -> set[str]:
    """The names ``code`` reads but neither defines nor imports (nor finds among the builtins)."""
    top = symtable.symtable(code, "<block>", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    read: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for sym in table.get_symbols():
            if table is top and sym.is_referenced():
                read.add(sym.get_name())
            elif table is not top and sym.is_global():
                read.add(sym.get_name())
    return read - defined - set(dir(builtins))


# Compiling without LLVM's optimizations (the suite's own setting, see conftest.py):
# the same programs, compiled faster.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def reader_env(xla_flags: str = "") -> dict[str, str]:
    """The environment of a fresh interpreter: JAX's defaults, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env["XLA_FLAGS"] = f"{xla_flags} {FAST_COMPILE}".strip()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_script(
    code: str, *, xla_flags: str | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter with JAX's default settings, from the repository root.

    ``xla_flags`` (e.g. ``--xla_force_host_platform_device_count=8``) go into
    the interpreter's ``XLA_FLAGS``; the suite's own are not passed on.
    """
    env = reader_env(xla_flags or "")
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def code_block(page: str, title: str) -> str:
    """The source of the fenced block opened by ```` ```python title="<title>" ```` in ``docs/<page>``."""
    text = (ROOT / "docs" / page).read_text()
    fence = re.compile(r'^```python title="' + re.escape(title) + r'"\n(.*?)^```$', re.M | re.S)
    found = fence.findall(text)
    assert len(found) == 1, (
        f"expected one block titled {title!r} in docs/{page}; found {len(found)}"
    )
    return found[0]


def run_block(page: str, title: str, report: str, replace: dict[str, str] | None = None):
    """Runs the block as a script in a fresh interpreter, as a user would; returns ``report``'s value.

    JAX runs with its default settings (not this suite's strict ones), and
    ``report`` is a Python expression over the script's names whose value
    (JSON-serialisable) is returned.  ``replace`` maps strings of the block to
    what they are replaced with (each must occur).
    """
    code = code_block(page, title)
    for old, new in (replace or {}).items():
        assert old in code, f"{old!r} not in the block {title!r} of docs/{page}"
        code = code.replace(old, new)
    code += f"\nimport json as _json\nprint(_json.dumps({report}))\n"
    run = run_script(code)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


_REPORTS = """
import json, traceback
results = {{}}
for key, code, report in {scripts!r}:
    namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
    try:
        exec(compile(code, key, "exec"), namespace)
        results[key] = [None, eval(report, namespace)]
    except BaseException:
        results[key] = [traceback.format_exc(), None]
    del namespace
print(json.dumps(results))
"""


class BlockFailed(AssertionError):
    """A block run by :func:`run_blocks` raised: the message holds its traceback."""


def run_blocks(runs: dict[str, tuple[str, str, str, dict[str, str] | None]]) -> dict:
    """:func:`run_block` for several blocks, one after the other in one fresh interpreter.

    ``runs`` maps a key to ``(page, title, report, replace)`` as :func:`run_block`
    takes them; each block runs as a script would, in a fresh ``__main__``
    namespace of its own.  Returns each key's report value, or for a block that
    raised, a :class:`BlockFailed` holding its traceback (to raise in its test).
    """
    scripts = []
    for key, (page, title, report, replace) in runs.items():
        code = code_block(page, title)
        for old, new in (replace or {}).items():
            assert old in code, f"{old!r} not in the block {title!r} of docs/{page}"
            code = code.replace(old, new)
        scripts.append((key, code, report))
    run = run_script(_REPORTS.format(scripts=scripts))
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        key: BlockFailed(f"{key} raised:\n{error}") if error else value
        for key, (error, value) in results.items()
    }


def reported(results: dict, key: str):
    """``results[key]`` of :func:`run_blocks`, raising the block's failure if it raised."""
    value = results[key]
    if isinstance(value, BlockFailed):
        raise value
    return value


_DOCTEST = """
import doctest, importlib, json
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
failures, attempted = [], 0
for test in doctest.DocTestFinder().find(importlib.import_module({module!r})):
    attempted += runner.run(test, out=failures.append).attempted
print(json.dumps({{"attempted": attempted, "failures": "".join(failures)}}))
"""


def run_doctests(module: str) -> int:
    """Runs ``module``'s docstring examples in a fresh interpreter; returns how many ran."""
    run = run_script(_DOCTEST.format(module=module))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["failures"] == "", report["failures"]
    return report["attempted"]
