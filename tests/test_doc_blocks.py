"""Every python block of the README and the guides compiles; the self-contained ones run.

The rules, in order:

* every block compiles;
* a block that reads names it does not define (:func:`~tests.doc_blocks.free_names`)
  continues the prose or an earlier block: it is compiled, not run;
* the README's blocks build on each other: they run together, top to bottom, in
  ``test_readme.py``;
* the layers guide's titled scripts run in ``test_layers.py``, which checks what
  they print;
* a block listed in :data:`NOT_RUN` is not run, for the reason given there;
* every other block runs on its own, in a namespace of its own, in a fresh
  interpreter with JAX's default settings; one that builds a mesh
  (``jax.make_mesh``) gets eight host CPU devices, as the suite's multi-device
  tests do.  The blocks that get the same devices share one interpreter (one
  JAX start-up), run one after the other; each is its own test, failing with
  its own traceback.
"""

import functools
import json
import subprocess

import pytest

from tests.doc_blocks import ROOT, Block, free_names, python_blocks, run_script
from tests.test_layers import DOC_SCRIPTS

BLOCKS = python_blocks()

# (page, a string only that block holds): why it does not run here.
NOT_RUN = {
    ("docs/parallel.md", "localhost:12355"): (
        "one process per host and a coordinator (run by hand as two processes)"
    ),
    ("docs/parallel.md", "localhost:12356"): "runs as two processes in test_embeddings_guide.py",
}
RUN_ELSEWHERE = {"README.md": "test_readme.py"}
# Pages whose titled blocks run in their own tests (at test sizes, with checks on what they print).
TITLED_RUN_ELSEWHERE = {
    "docs/layers.md": "test_layers.py",
    "docs/embeddings.md": "test_embeddings_guide.py",
    "docs/heads.md": "test_heads_guide.py",
}


def _rule_for(block: Block) -> str | None:
    """Why ``block`` is not run on its own here (``None``: it is)."""
    for (page, marker), reason in NOT_RUN.items():
        if block.page == page and marker in block.code:
            return reason
    if block.page in RUN_ELSEWHERE:
        return f"runs in {RUN_ELSEWHERE[block.page]}"
    if block.page in TITLED_RUN_ELSEWHERE and block.title:
        return f"runs in {TITLED_RUN_ELSEWHERE[block.page]}"
    if free_names(block.code):
        return f"a fragment (reads {', '.join(sorted(free_names(block.code)))})"
    return None


RUNNABLE = [b for b in BLOCKS if _rule_for(b) is None]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_compiles(block):
    compile(block.code, block.name, "exec")


def test_the_rules_name_existing_blocks():
    """Each entry of ``NOT_RUN`` matches exactly one block; the tests named exist."""
    for (page, marker), reason in NOT_RUN.items():
        found = [b for b in BLOCKS if b.page == page and marker in b.code]
        assert len(found) == 1, f"NOT_RUN entry {page!r} / {marker!r} ({reason}) matches {found}"
    for test in (*RUN_ELSEWHERE.values(), *TITLED_RUN_ELSEWHERE.values()):
        assert (ROOT / "tests" / test).exists(), test
    titled = {b.title for b in BLOCKS if b.page == "docs/layers.md" and b.title}
    assert titled == {t for scripts in DOC_SCRIPTS.values() for t in scripts}, titled
    assert len(RUNNABLE) >= 5, [b.name for b in RUNNABLE]


def _xla_flags(block: Block) -> str | None:
    return "--xla_force_host_platform_device_count=8" if "jax.make_mesh" in block.code else None


# Runs each (name, code) as ``python -c code`` would (a fresh ``__main__`` namespace);
# prints, as its last line, each name with ``None`` or the traceback of what it raised.
_GROUP_RUNNER = """
import json, traceback
results = {{}}
for name, code in {blocks!r}:
    namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
    try:
        exec(compile(code, name, "exec"), namespace)
    except BaseException:
        results[name] = traceback.format_exc()
    else:
        results[name] = None
    del namespace
print(json.dumps(results))
"""


@functools.cache
def _run_group(xla_flags: str | None) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs every runnable block with these flags in one fresh interpreter: (run, results)."""
    blocks = [(b.name, b.code) for b in RUNNABLE if _xla_flags(b) == xla_flags]
    run = run_script(_GROUP_RUNNER.format(blocks=blocks), xla_flags=xla_flags)
    lines = run.stdout.strip().splitlines()
    try:
        results = json.loads(lines[-1]) if run.returncode == 0 and lines else {}
    except json.JSONDecodeError:
        results = {}
    return run, results


@pytest.mark.slow
@pytest.mark.xdist_group("doc_blocks")  # one worker runs each group's interpreter once
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.name for b in RUNNABLE])
def test_self_contained_block_runs(block):
    run, results = _run_group(_xla_flags(block))
    assert block.name in results, run.stdout + run.stderr
    assert results[block.name] is None, f"{block.name} raised:\n{results[block.name]}"
