"""The Examples sections of the public docstrings, run as doctests.

They run in a fresh interpreter with JAX's default settings (float32, standard
dtype promotion, one device), as a user would paste them, not under this
suite's strict settings.  Every public function of the package (and of
``blocksparse_jax.parallel``) must carry at least one example, and every
example found must pass.
"""

import inspect
import json
import pathlib
import subprocess
import sys

import pytest

import blocksparse_jax
from blocksparse_jax import parallel
from tests.doc_blocks import reader_env

_RUNNER = """
import doctest, importlib, inspect, json, sys
import blocksparse_jax
from blocksparse_jax import parallel

modules = {}
for package in (blocksparse_jax, parallel):
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isfunction(obj):
            modules.setdefault(obj.__module__, None)
examples, failures = {}, []
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
for module in modules:
    for test in doctest.DocTestFinder().find(importlib.import_module(module)):
        if not test.examples:
            continue
        result = runner.run(test, out=failures.append)
        examples[test.name] = examples.get(test.name, 0) + result.attempted
print(json.dumps({"examples": examples, "failures": "".join(failures)}))
"""


def _public_functions():
    names = []
    for package in (blocksparse_jax, parallel):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isfunction(obj):
                names.append(f"{obj.__module__}.{obj.__name__}")
    return names


@pytest.mark.slow
def test_docstring_examples():
    env = reader_env()
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["failures"] == "", report["failures"]
    missing = [name for name in _public_functions() if not report["examples"].get(name)]
    assert not missing, f"public functions without a doctested example: {missing}"


def test_no_restructuredtext_literal_markers():
    """Literal blocks are fenced code: a line ending in ``::`` shows as stray text on the API pages."""
    root = pathlib.Path(blocksparse_jax.__file__).parent
    found = [
        f"{path.relative_to(root.parent)}:{n}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith("::") and not line.lstrip().startswith("#")
    ]
    assert not found, found
