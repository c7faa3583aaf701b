"""The Examples sections of the public docstrings, run as doctests.

They run in a fresh interpreter with JAX's default settings (float32, standard
dtype promotion, one device), as a user would paste them, not under this
suite's strict settings.
"""

import os
import pathlib
import subprocess
import sys

MODULES = [
    "blocksparse_jax._blocksparse",
    "blocksparse_jax._hsoftmax",
    "blocksparse_jax.parallel",
    "blocksparse_jax.adaptive._params",
    "blocksparse_jax.adaptive._log_space",
    "blocksparse_jax.adaptive._decode",
    "blocksparse_jax.adaptive._torch",
    "blocksparse_jax.adaptive._cutoffs",
]

_RUNNER = """
import doctest, importlib, sys
failed = attempted = 0
for name in sys.argv[1:]:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    print(name, result)
    failed += result.failed
    attempted += result.attempted
print("attempted", attempted)
sys.exit(1 if failed else 0)
"""


def test_docstring_examples():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, *MODULES],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    attempted = int(run.stdout.rsplit("attempted", 1)[1])
    assert attempted >= 80, run.stdout  # the examples were found and run
