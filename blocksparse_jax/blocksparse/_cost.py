"""The cost models behind ``strategy="auto"``: estimated seconds of each strategy.

One model for CPU (:class:`CpuCosts`, calibrated), one for GPU and TPU
(:class:`AcceleratorCosts`, round numbers, overridable with
:func:`accelerator_costs`), and the memory budget of a gathered buffer on an
accelerator (:func:`accelerator_budget`).  Everything here is a function of the
static shapes only, so the choice is made at trace time and costs nothing at
run time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax

from blocksparse_jax.blocksparse import _gather


@dataclasses.dataclass(frozen=True)
class CpuCosts:
    """Constants of the CPU cost model (seconds, bytes, flop/s).

    The defaults were fitted on the machine described in ``benchmarks/README.md``;
    ``estimate_costs(..., costs=CpuCosts(...))`` takes others.

    Attributes:
      dram_bandwidth: bytes/s of reading blocks of ``W`` from main memory.
      cache_bandwidth: bytes/s of copies that stay in cache (a gathered chunk, a
        dynamically sliced block).
      flops: flop/s of a dense GEMM.
      small_flops: flop/s of many small batched matrix-vector products.
      loop_step: seconds of one ``loop`` iteration (one pair) beyond its memory.
      group_step: seconds of one ``grouped`` iteration (one run of pairs).
      chunk_step: seconds of one ``gather`` chunk beyond its memory.
      fresh: seconds per byte of a large temporary buffer (XLA allocates them per
        call and the first touch of every page faults).
      setup: fixed seconds every strategy but ``gather`` must save to be chosen
        (keeps tiny problems on the simplest program).
    """

    dram_bandwidth: float = 1e10
    cache_bandwidth: float = 6e10
    flops: float = 5e10
    small_flops: float = 2e10
    loop_step: float = 6e-7
    group_step: float = 1.7e-6
    chunk_step: float = 2e-5
    fresh: float = 1e-9
    setup: float = 5e-5


COSTS = CpuCosts()


def expected_distinct(n_blocks: int, n_picks: int) -> float:
    """Expected distinct blocks among ``n_picks`` uniform random picks of ``n_blocks``."""
    if n_blocks <= 1 or n_picks <= 0:
        return float(min(n_blocks, n_picks))
    return n_blocks * -math.expm1(n_picks * math.log1p(-1.0 / n_blocks))


def group_rows(n_pairs: int, n_blocks: int) -> int:
    """Activation rows stacked per block in one ``grouped`` step (a power of two, 1..64)."""
    distinct = max(expected_distinct(n_blocks, n_pairs), 1.0)
    mean_run = n_pairs / distinct
    return int(min(64, 2 ** math.ceil(math.log2(max(1.0, 1.5 * mean_run)))))


def estimate_costs(
    *,
    batch: int,
    i_blocks: int,
    o_blocks: int,
    i_win: int,
    o_win: int,
    i_size: int,
    o_size: int,
    itemsize: int,
    costs: CpuCosts = COSTS,
) -> dict[str, float]:
    """Estimated CPU seconds of one gemv (or one outer update) for each strategy.

    With ``pairs = batch * i_win * o_win`` selected blocks of ``blk = i_size *
    o_size * itemsize`` bytes, ``distinct`` the expected number of distinct
    blocks among them (uniform random indices over ``i_blocks * o_blocks``) and
    ``flops = 2 * pairs * i_size * o_size``:

    * gather: every pair's block read from memory, copied into the chunk and read
      back (in cache), the batched matrix-vector products, a step per chunk.
    * loop: every pair's block read from memory and sliced (a copy in cache),
      plus a loop step per pair.
    * dense: the dense GEMM's ``2 * batch * i_blocks*i_size * o_blocks*o_size``
      flops, ``W`` read and transposed once (a fresh ``W``-sized temporary), the
      dense activations.
    * grouped: each distinct block read from memory once and copied in cache, a
      loop step per run of up to ``rows`` pairs sharing a block, the stacked
      GEMMs, the sort of the pairs and the activations reordered.

    The constants are in :class:`CpuCosts`.
    """
    c = costs
    pairs = batch * i_win * o_win
    blk = i_size * o_size * itemsize
    flops = 2.0 * pairs * i_size * o_size
    n_blocks = i_blocks * o_blocks
    distinct = expected_distinct(n_blocks, pairs)
    chunk = _gather.chunk_size(batch, i_win * o_win * blk)
    gather = (
        pairs * blk / c.dram_bandwidth
        + 2 * pairs * blk / c.cache_bandwidth
        + flops / c.small_flops
        + math.ceil(batch / chunk) * c.chunk_step
    )
    loop = (
        c.setup
        + pairs * (blk / c.dram_bandwidth + 2 * blk / c.cache_bandwidth + c.loop_step)
        + flops / c.flops
    )
    dense_act = batch * (i_blocks * i_size + o_blocks * o_size) * itemsize
    dense = (
        c.setup
        + 2.0 * batch * i_blocks * i_size * o_blocks * o_size / c.flops
        + 2 * n_blocks * blk / c.dram_bandwidth
        + n_blocks * blk * c.fresh
        + 3 * dense_act / c.dram_bandwidth
    )
    rows = group_rows(pairs, n_blocks)
    steps = distinct + pairs / rows
    grouped = (
        c.setup
        + distinct * blk / c.dram_bandwidth
        + 2 * distinct * blk / c.cache_bandwidth
        + steps * (c.group_step + 2.0 * rows * i_size * o_size / c.flops)
        + pairs * max(1.0, math.log2(max(pairs, 2))) * 5e-9
        + 4 * pairs * (i_size + o_size) * itemsize / c.cache_bandwidth
    )
    return {"gather": gather, "loop": loop, "dense": dense, "grouped": grouped}


def choose_strategy(
    *,
    batch: int,
    i_blocks: int,
    o_blocks: int,
    i_win: int,
    o_win: int,
    i_size: int,
    o_size: int,
    itemsize: int = 4,
) -> str:
    """The CPU strategy ``auto`` uses for these static shapes: the cheapest by :func:`estimate_costs`."""
    est = estimate_costs(
        batch=batch,
        i_blocks=i_blocks,
        o_blocks=o_blocks,
        i_win=i_win,
        o_win=o_win,
        i_size=i_size,
        o_size=o_size,
        itemsize=itemsize,
    )
    return min(est, key=est.get)


# --------------------------------------------------------------------------------------
# GPU and TPU.
# --------------------------------------------------------------------------------------

ACCELERATOR_STRATEGIES = ("gather", "ragged", "dense")
"""The strategies ``auto`` chooses among on GPU and TPU: none of them is a sequential loop."""


@dataclasses.dataclass(frozen=True)
class AcceleratorCosts:
    """Constants of the GPU/TPU cost model and memory budget of ``strategy="auto"``.

    The defaults describe a current data-centre accelerator in round numbers
    (they are not measured; ``python3 -m benchmarks.device`` measures the
    strategies on one).  Override them for everything traced inside
    :func:`accelerator_costs`.

    Attributes:
      bandwidth: bytes/s of device memory (HBM).
      flops: flop/s of a large dense matrix product.
      small_flops: flop/s of the batched matrix-vector products of ``gather``
        (``(i_size,) @ (i_size, o_size)`` per pair; memory-bound in practice).
      launch: seconds of one kernel launch (every strategy runs a few).
      chunk_step: seconds of one iteration of a ``gather`` chunk loop (a
        ``while`` iteration on the device: several kernels and a sync).
      sort_step: seconds per pair and per ``log2(pairs)`` of the sort by block.
      group_tile_rows: rows a grouped-matmul kernel pads each group to (a group
        of ``k`` rows costs ``ceil(k / rows) * rows`` rows of flops).
      grouped_matmul_platforms: platforms whose ``jax.lax.ragged_dot`` lowers to
        a grouped-matmul kernel (TPU).  Elsewhere (XLA:GPU's default) it is
        expanded to one zero-padded product per group, and ``ragged`` is costed
        as such (it is then rarely chosen).
      ragged_max_groups: the most groups (``min(pairs, i_blocks * o_blocks)``)
        with which ``auto`` considers ``ragged``: ``jax.export`` legalizes
        ``chlo.ragged_dot`` into code whose size grows with the group count
        (tens of MB and tens of seconds at 16384 groups).
      budget_fraction: fraction of the device's memory (``bytes_limit`` of
        ``jax.Device.memory_stats()``) one gathered buffer may take.
      default_budget_bytes: the budget when the device's memory is unknown (when
        exporting for GPU or TPU on a CPU host, or on a backend without
        ``memory_stats``).
    """

    bandwidth: float = 1e12
    flops: float = 1e14
    small_flops: float = 1e13
    launch: float = 5e-6
    chunk_step: float = 5e-5
    sort_step: float = 2e-11
    group_tile_rows: int = 128
    grouped_matmul_platforms: tuple[str, ...] = ("tpu",)
    ragged_max_groups: int = 1024
    budget_fraction: float = 0.25
    default_budget_bytes: int = 2 * 2**30


_ACCELERATOR_COSTS = [AcceleratorCosts()]


def current_accelerator_costs() -> AcceleratorCosts:
    """The :class:`AcceleratorCosts` in effect (the defaults unless overridden)."""
    return _ACCELERATOR_COSTS[-1]


@contextlib.contextmanager
def accelerator_costs(costs: AcceleratorCosts | None = None, /, **changes):
    """Overrides the GPU/TPU cost model's constants for what is traced inside the block.

    The choice is made when a function is traced; ``jax.jit`` caches traces,
    so wrap the first call (or the ``jax.jit(...).lower`` / ``jax.export``).

    Args:
      costs: a whole :class:`AcceleratorCosts` (default: the current one).
      **changes: fields to replace, e.g. ``default_budget_bytes=2**28``.

    Examples:
      >>> from blocksparse_jax.blocksparse import accelerator_costs, accelerator_budget
      >>> with accelerator_costs(default_budget_bytes=2**20, budget_fraction=0.0):
      ...     accelerator_budget("tpu")
      1048576
    """
    base = current_accelerator_costs() if costs is None else costs
    _ACCELERATOR_COSTS.append(dataclasses.replace(base, **changes))
    try:
        yield _ACCELERATOR_COSTS[-1]
    finally:
        _ACCELERATOR_COSTS.pop()


@functools.cache
def _device_bytes_limit(platform: str) -> int | None:
    """``bytes_limit`` of the first local device of ``platform``, if this host has one."""
    try:
        devices = jax.local_devices(backend="gpu" if platform in ("cuda", "rocm") else platform)
        stats = devices[0].memory_stats() if devices else None
    except RuntimeError:  # no such backend on this host
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def accelerator_budget(platform: str, costs: AcceleratorCosts | None = None) -> int:
    """Bytes one gathered buffer may take on ``platform`` (``"cuda"``, ``"rocm"`` or ``"tpu"``).

    ``costs.budget_fraction`` of the local device's ``bytes_limit`` when this
    host has such a device that reports it (and the fraction is positive),
    else ``costs.default_budget_bytes`` (2 GiB unless overridden).
    """
    c = current_accelerator_costs() if costs is None else costs
    limit = _device_bytes_limit(platform) if c.budget_fraction > 0 else None
    if limit is None:
        return int(c.default_budget_bytes)
    return int(c.budget_fraction * limit)


def estimate_accelerator_costs(
    *,
    platform: str,
    batch: int,
    i_blocks: int,
    o_blocks: int,
    i_win: int,
    o_win: int,
    i_size: int,
    o_size: int,
    itemsize: int,
    costs: AcceleratorCosts | None = None,
) -> dict[str, float]:
    """Estimated seconds of one gemv (or outer update) on a GPU or TPU for each strategy.

    With ``pairs = batch * i_win * o_win``, ``blk = i_size * o_size * itemsize``
    bytes, ``distinct`` the expected distinct blocks among the pairs and
    ``budget = accelerator_budget(platform)``:

    * gather: the selected blocks read, written to the gathered buffer and read
      back (``3 * pairs * blk`` bytes), the activations, the batched products at
      ``small_flops``, and a ``chunk_step`` per chunk when the buffer
      (``pairs * blk``) exceeds the budget (``ceil(pairs * blk / budget)``
      chunks, else none: no loop).
    * ragged: on a grouped-matmul platform, the distinct blocks gathered once
      (read, written, read), the activation rows permuted into block order and
      back, the products padded per group to ``group_tile_rows`` at ``flops``, the
      sort.  Elsewhere one zero-padded product per group: ``capacity`` times
      the flops, and a masked ``(pairs, i_size)`` input and ``(pairs, o_size)``
      output per group written and read.  Infinite beyond ``ragged_max_groups``.
    * dense: ``2 * batch * i_blocks*i_size * o_blocks*o_size`` flops at ``flops``,
      ``W`` read once, the dense activations; infinite when those activations
      exceed the budget.

    Returns:
      ``{"gather": s, "ragged": s, "dense": s}``.
    """
    c = current_accelerator_costs() if costs is None else costs
    budget = accelerator_budget(platform, c)
    pairs = batch * i_win * o_win
    blk = i_size * o_size * itemsize
    n_blocks = i_blocks * o_blocks
    distinct = expected_distinct(n_blocks, pairs)
    capacity = min(pairs, n_blocks)
    act = pairs * (i_size + o_size) * itemsize
    gathered = pairs * blk
    chunks = math.ceil(gathered / max(budget, 1))
    gather = (
        3 * c.launch
        + (3 * gathered + act) / c.bandwidth
        + 2.0 * pairs * i_size * o_size / c.small_flops
        + (chunks * c.chunk_step if chunks > 1 else 0.0)
    )
    sort = c.sort_step * pairs * max(1.0, math.log2(max(pairs, 2)))
    if platform in c.grouped_matmul_platforms:
        rows = pairs + distinct * (c.group_tile_rows - 1) / 2
        ragged = (
            8 * c.launch
            + sort
            + (3 * distinct * blk + 4 * act) / c.bandwidth
            + 2.0 * rows * i_size * o_size / c.flops
        )
    else:
        ragged = (
            8 * c.launch
            + sort
            + capacity * (2.0 * pairs * i_size * o_size / c.flops)
            + 2 * capacity * pairs * (i_size * itemsize + o_size * 4) / c.bandwidth
            + (3 * capacity * blk + 4 * act) / c.bandwidth
        )
    if capacity > c.ragged_max_groups:
        ragged = math.inf
    dense_act = batch * (i_blocks * i_size + o_blocks * o_size) * max(itemsize, 4)
    if dense_act > budget:
        dense = math.inf
    else:
        dense = (
            4 * c.launch
            + 2.0 * batch * i_blocks * i_size * o_blocks * o_size / c.flops
            + (n_blocks * blk + 3 * dense_act) / c.bandwidth
        )
    return {"gather": gather, "ragged": ragged, "dense": dense}


def choose_accelerator_strategy(
    *,
    platform: str,
    batch: int,
    i_blocks: int,
    o_blocks: int,
    i_win: int,
    o_win: int,
    i_size: int,
    o_size: int,
    itemsize: int = 4,
) -> str:
    """The strategy ``auto`` uses on ``platform`` (``"cuda"``, ``"rocm"``, ``"tpu"``).

    The cheapest by :func:`estimate_accelerator_costs`, among
    :data:`ACCELERATOR_STRATEGIES` (never a sequential loop).
    """
    est = estimate_accelerator_costs(
        platform=platform,
        batch=batch,
        i_blocks=i_blocks,
        o_blocks=o_blocks,
        i_win=i_win,
        o_win=o_win,
        i_size=i_size,
        o_size=o_size,
        itemsize=itemsize,
    )
    return min(est, key=est.get)
