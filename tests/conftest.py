"""Strict settings for the whole suite, and the plain / jit / vmap fixture.

Eight CPU devices are configured before JAX starts so that the multi-device
tests can build meshes; single-device tests simply use the first device.
XLA's CPU backend compiles without LLVM's optimizations: most of the suite's
time is compiling small programs, which then run a little slower; the HLO
passes (and so the compiled memory analysis the tests assert on) are the same.
Many tests compile the same programs (in other workers, in other tests, in the
interpreters the documentation tests start), so the session shares JAX's
persistent compilation cache in a temporary directory, which the process that
made it removes at exit (unless ``JAX_COMPILATION_CACHE_DIR`` is set already).
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # this process runs the session
    _cache = tempfile.mkdtemp(prefix="blocksparse-jax-tests-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache  # inherited by workers and subprocesses
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def _plain(f):
    return f


def _jit(f):
    return jax.jit(f)


def _vmap(f):
    """Runs ``f`` on a batch of one copy of every argument (leading axis 1) and unbatches."""

    def g(*args):
        batched = jax.tree_util.tree_map(lambda a: jax.numpy.asarray(a)[None], args)
        out = jax.vmap(f)(*batched)
        return jax.tree_util.tree_map(lambda a: a[0], out)

    return g


@pytest.fixture(params=["plain", "jit", "vmap"])
def transform(request):
    """Applies ``f`` plain, under ``jax.jit`` or under ``jax.vmap`` (over a leading axis of 1)."""
    return {"plain": _plain, "jit": _jit, "vmap": _vmap}[request.param]


def pytest_collection_modifyitems(config, items):
    """Runs the tests marked ``slow`` first (otherwise in collection order).

    With ``--dist loadgroup`` (see pyproject.toml) each worker takes the next
    test as it frees up, so the long tests start early and do not leave one
    worker running alone at the end.  A module whose tests share an expensive
    module-scoped fixture is one ``xdist_group``: one worker runs it whole.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
