"""The CPU cost model behind ``strategy="auto"``: estimated seconds of each strategy.

Everything here is a function of the static shapes only, so the choice is made
at trace time and costs nothing at run time.
"""

from __future__ import annotations

import dataclasses
import math

from blocksparse_jax.blocksparse import _gather


@dataclasses.dataclass(frozen=True)
class CpuCosts:
    """Constants of the CPU cost model (seconds, bytes, flop/s), calibrated on a 2-core x86 CPU.

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
