"""The README's Python examples, run top to bottom in one fresh interpreter as a reader would.

The blocks build on each other (later ones use the names earlier ones define);
JAX runs with its default settings, not this suite's strict ones.
"""

import pathlib
import re
import subprocess
import sys

import pytest

from tests.doc_blocks import reader_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_readme_examples_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", text, re.M | re.S)
    assert len(blocks) >= 4, "the README's examples were not found"
    script = "\n".join(blocks) + "\nprint('README examples ran')\n"
    env = reader_env()
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "README examples ran" in run.stdout
