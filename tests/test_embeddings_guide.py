"""The embedding guide's scripts, run as a user would: one process, and two processes as two hosts.

``docs/embeddings.md``: the training loop, then the same loop on a ``(2, 4)`` mesh
of forced CPU devices.  ``docs/parallel.md``: the many-hosts recipe, two
processes on this machine joined by ``jax.distributed`` (as the guide says it
was checked).  Sizes are cut down; nothing else is changed.
"""

import json
import re
import socket
import subprocess
import sys

import pytest

from tests.doc_blocks import ROOT, code_block, reader_env


def _env(XLA_FLAGS: str = "", **extra):
    env = reader_env(XLA_FLAGS)
    env.update(extra)
    return env


def _replace(code: str, replace: dict[str, str]) -> str:
    for old, new in replace.items():
        assert old in code, f"{old!r} not in the block"
        code = code.replace(old, new)
    return code


@pytest.mark.slow
def test_guide_training_loops_one_device_and_a_mesh():
    first = code_block("embeddings.md", "train_embeddings.py")
    sharded = code_block("embeddings.md", "train_embeddings_sharded.py")
    sizes = {"1_000_000, 200_000, 32, 1_024": "40_000, 8_000, 8, 256"}
    record = "losses.append(float(loss))\n"
    script = (
        "losses = []\n"
        + _replace(
            first,
            {
                **sizes,
                "    params, opt_state, loss = step(params, opt_state, users, items, clicked)\n": "    params, opt_state, loss = step(params, opt_state, users, items, clicked)\n    "
                + record,
            },
        )
        + "one_device = list(losses)\n"
        + _replace(
            sharded,
            {
                "    params, opt_state, loss = step(params, opt_state, *data)\n": "    params, opt_state, loss = step(params, opt_state, *data)\n    "
                + record
            },
        )
        + "import json\n"
        + "print(json.dumps([one_device, losses[len(one_device):],"
        + " str(params['users'].sharding.spec), str(opt_state.sum_of_squares['users'].sharding.spec)]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    one_device, on_mesh, table_spec, acc_spec = json.loads(run.stdout.strip().splitlines()[-1])
    assert one_device[-1] < one_device[0] - 0.05, one_device  # it learns
    assert on_mesh[-1] < one_device[-1], on_mesh  # and keeps learning on the mesh
    assert table_spec.startswith("P('model'") and acc_spec.startswith("P('model'"), (
        table_spec,
        acc_spec,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_many_hosts_recipe_in_two_processes():
    code = _replace(
        code_block("parallel.md", "train_embedding_hosts.py"),
        {"localhost:12356": f"localhost:{_free_port()}", "1_000_000, 32, 4_096": "100_000, 8, 512"},
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=_env(),
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    losses = [float(x) for x in re.findall(r"step \d: loss ([\d.]+)", outs[0])]
    assert len(losses) == 5 and losses[-1] < 0.5 * losses[0], outs[0]
