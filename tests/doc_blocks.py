"""The code blocks of the guides in ``docs/``, so that tests run what the docs show."""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", _DOCTEST.format(module=module)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["failures"] == "", report["failures"]
    return report["attempted"]
