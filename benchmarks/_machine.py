"""What the benchmarks ran on: the machine, its memory bandwidth and page settings."""

from __future__ import annotations

import os
import platform
import statistics

import jax
import numpy as np

from benchmarks._timing import call, time_round_robin


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """CPU, cores, memory, versions, and the settings that decide first-touch cost.

    ``transparent_hugepage`` is the kernel's policy (``[madvise]`` means only
    buffers that ask get huge pages: NumPy asks for large arrays, XLA does not);
    ``glibc_tunables`` is ``GLIBC_TUNABLES`` (``glibc.malloc.hugetlb=1`` makes
    malloc ask for them too).
    """
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.devices()[0].platform,
        "numpy": np.__version__,
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def measure_bandwidth(nbytes: int, *, repeats: int = 5) -> dict:
    """Memory bandwidth from a large array copy: (read + write bytes) / median time.

    ``numpy_copy`` copies into a preallocated buffer (the hardware's streaming
    rate); ``jax_copy`` is ``x * 2`` under ``jit`` into a fresh output buffer, which
    also pays the first touch of every new page (how XLA sees large buffers).
    The two are timed alternately.
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    x = jax.numpy.asarray(src)
    times = time_round_robin(
        {
            "numpy_copy": call(np.copyto, dst, src),
            "jax_copy": call(jax.jit(lambda x: x * 2), x),
        },
        warmup=1,
        repeats=repeats,
    )
    return {"bytes": nbytes, **{k: 2 * nbytes / statistics.median(t) for k, t in times.items()}}
