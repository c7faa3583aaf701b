"""The execution seam: how a validated block-sparse problem is actually computed.

Everything above this module (validation, index normalisation, masking of
out-of-range entries, the custom VJPs) is shared; everything here only sees
in-range ``int32`` indices and returns results in the accumulation dtype.

Strategies
----------
Every strategy computes exactly the same sums (repeated indices accumulate);
they differ in how they move memory:

``gather``
    Gather the selected blocks into a ``(chunk, i_win, o_win, i_size, o_size)``
    buffer and contract with one einsum, over chunks of the batch so that the
    buffer stays under :data:`GATHER_BUDGET_BYTES` (a chunk holds at least one
    example).  The weight update
    scatter-adds the chunk's outer products.  Best on GPU/TPU and for tiny
    problems.
``loop``
    A ``lax.fori_loop`` over the ``(example, i, j)`` pairs that reads each
    selected block in place with ``lax.dynamic_slice`` (no gathered copy); the
    weight update adds each outer product into its block in place with
    ``lax.dynamic_update_slice``.
``dense``
    Scatter the activations into the full block space, one dense GEMM
    ``(batch, i_blocks*i_size) @ (i_blocks*i_size, o_blocks*o_size)``, then pick
    the selected outputs; the weight update is ``X_dense^T @ Y_dense``.  Reads
    ``W`` once, at the price of the dense flops: best when the selected pairs
    cover most of the block grid and the blocks are small.
``grouped``
    Sort the ``(example, i, j)`` pairs by the block they use, then loop over the
    runs of pairs sharing a block: each block is read once and multiplied by up
    to ``rows`` stacked activation rows (a small GEMM); the weight update adds
    ``X_run^T @ Y_run`` into each block once, in place.  Memory traffic is the
    distinct blocks touched, which is the bandwidth bound.

``auto`` (the default of the public ops) picks one with :func:`choose_strategy`,
a cost model over the static shapes, and by backend: the choice is wrapped in
``jax.lax.platform_dependent`` so one jitted or exported function runs the CPU
choice on CPU and ``gather`` on GPU and TPU (where a sequential loop is slow).

Shape letters (the one vocabulary of the package): ``b`` batch, ``i`` i_win,
``j`` o_win, ``s`` i_size, ``t`` o_size.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from blocksparse_jax._checks import common_float_dtype

STRATEGIES = ("auto", "gather", "loop", "dense", "grouped")
"""Valid values of the ``strategy=`` keyword of the public ops."""

GATHER_BUDGET_BYTES = 2 * 2**20
"""Largest gathered-block buffer of the ``gather`` strategy (one chunk of the batch)."""


def check_strategy(strategy) -> str:
    """Returns ``strategy`` if it names a strategy; raises ``ValueError`` listing the valid ones."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {', '.join(repr(s) for s in STRATEGIES)}; got {strategy!r}"
        )
    return strategy


# --------------------------------------------------------------------------------------
# The cost model.
# --------------------------------------------------------------------------------------


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
    chunk = max(1, min(batch, GATHER_BUDGET_BYTES // max(i_win * o_win * blk, 1)))
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


def _resolve(strategy: str, **dims) -> str:
    """``strategy`` itself, or for ``"auto"`` the CPU choice for these static shapes."""
    return choose_strategy(**dims) if strategy == "auto" else strategy


def _by_platform(cpu_choice: str, impl, *args):
    """``impl(cpu_choice, *args)`` on CPU and ``impl("gather", *args)`` elsewhere."""
    if cpu_choice == "gather":
        return impl("gather", *args)
    return lax.platform_dependent(
        *args,
        cpu=lambda *a: impl(cpu_choice, *a),
        default=lambda *a: impl("gather", *a),
    )


# --------------------------------------------------------------------------------------
# gemv: out[b, j] = sum_i h[b, i] @ blk(b, i, j)
# --------------------------------------------------------------------------------------


def gemv_contract(
    W: jax.Array,
    h: jax.Array,
    input_idx: jax.Array,
    output_idx: jax.Array,
    *,
    transpose_w: bool,
    acc_dtype: np.dtype,
    strategy: str = "gather",
) -> jax.Array:
    """``sum_i h[b, i] @ blk(b, i, j)`` as ``(batch, o_win, out_size)`` in ``acc_dtype``.

    ``blk(b, i, j)`` is ``W[input_idx[b, i], output_idx[b, j]]`` or, with
    ``transpose_w``, ``W[output_idx[b, j], input_idx[b, i]].T`` - the block of
    ``W.transpose(1, 0, 3, 2)`` without materialising that transpose.
    """
    dt = common_float_dtype(W.dtype, h.dtype)
    W, h = jnp.asarray(W, dt), jnp.asarray(h, dt)
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    rows_blocks, cols_blocks, s, t = W.shape
    if transpose_w:
        i_blocks, o_blocks, i_size, o_size = cols_blocks, rows_blocks, t, s
    else:
        i_blocks, o_blocks, i_size, o_size = rows_blocks, cols_blocks, s, t
    choice = _resolve(
        strategy,
        batch=batch,
        i_blocks=i_blocks,
        o_blocks=o_blocks,
        i_win=i_win,
        o_win=o_win,
        i_size=i_size,
        o_size=o_size,
        itemsize=np.dtype(dt).itemsize,
    )
    if batch == 0 or i_win == 0 or o_win == 0:
        return jnp.zeros((batch, o_win, o_size), acc_dtype)

    def impl(name, W, h, input_idx, output_idx):
        fn = _GEMV[name]
        return fn(W, h, input_idx, output_idx, transpose_w=transpose_w, acc_dtype=acc_dtype)

    if strategy == "auto":
        return _by_platform(choice, impl, W, h, input_idx, output_idx)
    return impl(choice, W, h, input_idx, output_idx)


def _pair_blocks(input_idx, output_idx, transpose_w):
    """``(row, col)`` block indices of ``W`` for every pair, each ``(batch, i_win, o_win)``."""
    b, i = input_idx.shape
    j = output_idx.shape[1]
    ii = jnp.broadcast_to(input_idx[:, :, None], (b, i, j))
    oi = jnp.broadcast_to(output_idx[:, None, :], (b, i, j))
    return (oi, ii) if transpose_w else (ii, oi)


def _gemv_gather_all(W, h, input_idx, output_idx, *, transpose_w, acc_dtype):
    if transpose_w:
        blocks = W[output_idx[:, None, :], input_idx[:, :, None]]  # (b, i, j, t, s)
        spec = "bis,bijts->bjt"
    else:
        blocks = W[input_idx[:, :, None], output_idx[:, None, :]]  # (b, i, j, s, t)
        spec = "bis,bijst->bjt"
    return jnp.einsum(spec, h, blocks, preferred_element_type=acc_dtype)


def _chunks(batch: int, per_example_bytes: int) -> int:
    return max(1, min(batch, GATHER_BUDGET_BYTES // max(per_example_bytes, 1)))


def _split(x, chunk, n):
    """Pads axis 0 of ``x`` to ``n * chunk`` (zeros) and reshapes to ``(n, chunk, ...)``."""
    pad = n * chunk - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    return x.reshape(n, chunk, *x.shape[1:])


def _gemv_gather(W, h, input_idx, output_idx, *, transpose_w, acc_dtype):
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    per_example = i_win * o_win * W.shape[2] * W.shape[3] * W.dtype.itemsize
    chunk = _chunks(batch, per_example)
    f = lambda a: _gemv_gather_all(W, *a, transpose_w=transpose_w, acc_dtype=acc_dtype)
    if chunk >= batch:
        return f((h, input_idx, output_idx))
    n = -(-batch // chunk)
    out = lax.map(
        f, (_split(h, chunk, n), _split(input_idx, chunk, n), _split(output_idx, chunk, n))
    )
    return out.reshape(n * chunk, *out.shape[2:])[:batch]


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes ``x`` varies over (empty outside ``shard_map``)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_over(x, axes):
    """``x`` cast to vary over every ``shard_map`` mesh axis in ``axes`` (a no-op for none)."""
    missing = tuple(sorted(frozenset(axes) - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def _carry(init, *refs):
    """``init`` cast to vary over the ``shard_map`` axes ``refs`` vary over.

    Inside ``shard_map`` a loop carry must keep one type; a fresh ``zeros``
    would be invariant while the body makes it vary.  Outside, a no-op.
    """
    axes = frozenset().union(*(varying_axes(r) for r in refs))
    return tuple(vary_over(x, axes) for x in init)


def _block(W, r, c):
    """``W[r, c]`` as ``(s, t)`` through a dynamic slice (no gather)."""
    z = jnp.zeros((), r.dtype)
    return lax.dynamic_slice(W, (r, c, z, z), (1, 1, W.shape[2], W.shape[3]))[0, 0]


def _gemv_loop(W, h, input_idx, output_idx, *, transpose_w, acc_dtype):
    batch, i_win, _ = h.shape
    o_win = output_idx.shape[1]
    out_size = W.shape[2] if transpose_w else W.shape[3]
    rows, cols = _pair_blocks(input_idx, output_idx, transpose_w)
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    hf = h.reshape(batch * i_win, h.shape[2])
    n = batch * i_win * o_win

    def body(p, out):
        b, rem = p // (i_win * o_win), p % (i_win * o_win)
        i, j = rem // o_win, rem % o_win
        blk = _block(W, rows[p], cols[p])
        hv = lax.dynamic_slice_in_dim(hf, b * i_win + i, 1)  # (1, size)
        if transpose_w:
            y = lax.dot_general(hv, blk, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)
        else:
            y = jnp.dot(hv, blk, preferred_element_type=acc_dtype)
        k = b * o_win + j
        cur = lax.dynamic_slice_in_dim(out, k, 1)
        return lax.dynamic_update_slice_in_dim(out, cur + y, k, 0)

    (init,) = _carry((jnp.zeros((batch * o_win, out_size), acc_dtype),), W, h, rows, cols)
    out = lax.fori_loop(0, n, body, init)
    return out.reshape(batch, o_win, out_size)


def _gemv_dense(W, h, input_idx, output_idx, *, transpose_w, acc_dtype):
    batch = h.shape[0]
    nr, nc, s, t = W.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    if transpose_w:
        # h lives in the column space (nc, t); the outputs in the row space (nr, s).
        hd = jnp.zeros((batch, nc, t), h.dtype).at[b, input_idx].add(h)
        y = jnp.einsum("blt,klst->bks", hd, W, preferred_element_type=acc_dtype)
    else:
        hd = jnp.zeros((batch, nr, s), h.dtype).at[b, input_idx].add(h)
        y = jnp.einsum("bks,klst->blt", hd, W, preferred_element_type=acc_dtype)
    return jnp.take_along_axis(y, output_idx[:, :, None], axis=1)


def _runs(rows, cols, n_rows):
    """Sorts the pairs by block; returns ``(perm, rows, cols, run_end)`` in sorted order.

    ``run_end[p]`` is one past the last sorted position using the same block as ``p``.
    """
    n = rows.shape[0]
    iota = jnp.arange(n, dtype=jnp.int32)
    rs, cs, perm = lax.sort((rows, cols, iota), num_keys=2)
    start = jnp.concatenate([jnp.ones((1,), jnp.bool_), (rs[1:] != rs[:-1]) | (cs[1:] != cs[:-1])])
    nxt = jnp.where(start, iota, n)
    # run_end[p] = min over q > p of nxt[q]  (a reverse cumulative minimum).
    shifted = jnp.concatenate([nxt[1:], jnp.full((1,), n, jnp.int32)])
    run_end = lax.cummin(shifted, reverse=True)
    del n_rows
    return perm, rs, cs, run_end


def _gemv_grouped(W, h, input_idx, output_idx, *, transpose_w, acc_dtype):
    batch, i_win, in_size = h.shape
    o_win = output_idx.shape[1]
    out_size = W.shape[2] if transpose_w else W.shape[3]
    n = batch * i_win * o_win
    P = group_rows(n, W.shape[0] * W.shape[1])
    rows, cols = _pair_blocks(input_idx, output_idx, transpose_w)
    perm, rs, cs, run_end = _runs(rows.reshape(-1), cols.reshape(-1), W.shape[0])
    pb = perm // (i_win * o_win)
    pi = (perm // o_win) % i_win
    pj = perm % o_win
    hs = h[pb, pi]  # (n, in_size), activations in sorted order
    hs = jnp.concatenate([hs, jnp.zeros((P, in_size), hs.dtype)])
    lane = jnp.arange(P, dtype=jnp.int32)

    def cond(state):
        return state[0] < n

    def body(state):
        pos, ys = state
        blk = _block(W, rs[pos], cs[pos])
        x = lax.dynamic_slice_in_dim(hs, pos, P)
        if transpose_w:
            y = lax.dot_general(x, blk, (((1,), (1,)), ((), ())), preferred_element_type=acc_dtype)
        else:
            y = jnp.dot(x, blk, preferred_element_type=acc_dtype)
        end = jnp.minimum(pos + P, run_end[pos])
        old = lax.dynamic_slice_in_dim(ys, pos, P)
        new = jnp.where((lane < end - pos)[:, None], y, old)
        return end, lax.dynamic_update_slice_in_dim(ys, new, pos, 0)

    ys0 = jnp.zeros((n + P, out_size), acc_dtype)
    _, ys = lax.while_loop(cond, body, _carry((jnp.int32(0), ys0), W, hs, rs, cs, run_end))
    out = jnp.zeros((batch * o_win, out_size), acc_dtype)
    out = out.at[pb * o_win + pj].add(ys[:n])
    return out.reshape(batch, o_win, out_size)


_GEMV = {
    "gather": _gemv_gather,
    "loop": _gemv_loop,
    "dense": _gemv_dense,
    "grouped": _gemv_grouped,
}


# --------------------------------------------------------------------------------------
# outer: o[x_idx[b, i], y_idx[b, j]] += alpha * outer(x[b, i], y[b, j])
# --------------------------------------------------------------------------------------


def outer_contract(
    o: jax.Array,
    x: jax.Array,
    y: jax.Array,
    x_idx: jax.Array,
    y_idx: jax.Array,
    alpha: jax.Array,
    *,
    acc_dtype: np.dtype,
    strategy: str = "gather",
) -> jax.Array:
    """``o`` with ``alpha * outer(x[b, i], y[b, j])`` added to block ``(x_idx[b, i], y_idx[b, j])``.

    Returns ``o``'s shape in ``acc_dtype``; repeated blocks accumulate.
    """
    dt = common_float_dtype(x.dtype, y.dtype)
    x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
    o = jnp.asarray(o, acc_dtype)
    alpha = jnp.asarray(alpha, acc_dtype)
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    choice = _resolve(
        strategy,
        batch=batch,
        i_blocks=o.shape[0],
        o_blocks=o.shape[1],
        i_win=x_win,
        o_win=y_win,
        i_size=x_size,
        o_size=y_size,
        itemsize=np.dtype(acc_dtype).itemsize,
    )
    if batch == 0 or x_win == 0 or y_win == 0:
        return o

    def impl(name, o, x, y, x_idx, y_idx, alpha):
        return _OUTER[name](o, x, y, x_idx, y_idx, alpha, acc_dtype=acc_dtype)

    if strategy == "auto":
        return _by_platform(choice, impl, o, x, y, x_idx, y_idx, alpha)
    return impl(choice, o, x, y, x_idx, y_idx, alpha)


def _outer_gather_all(o, x, y, x_idx, y_idx, alpha, *, acc_dtype):
    upd = jnp.einsum("bis,bjt->bijst", x, y, preferred_element_type=acc_dtype)
    return o.at[x_idx[:, :, None], y_idx[:, None, :]].add(upd * alpha)


def _outer_gather(o, x, y, x_idx, y_idx, alpha, *, acc_dtype):
    batch, x_win, _ = x.shape
    y_win = y.shape[1]
    per_example = x_win * y_win * o.shape[2] * o.shape[3] * o.dtype.itemsize
    chunk = _chunks(batch, per_example)
    if chunk >= batch:
        return _outer_gather_all(o, x, y, x_idx, y_idx, alpha, acc_dtype=acc_dtype)
    n = -(-batch // chunk)
    xs = (
        _split(x, chunk, n),
        _split(y, chunk, n),
        _split(x_idx, chunk, n),
        _split(y_idx, chunk, n),
    )

    def step(o, a):
        return _outer_gather_all(o, *a, alpha, acc_dtype=acc_dtype), None

    return lax.scan(step, o, xs)[0]


def _outer_loop(o, x, y, x_idx, y_idx, alpha, *, acc_dtype):
    batch, x_win, _ = x.shape
    y_win = y.shape[1]
    xf = x.reshape(batch * x_win, x.shape[2])
    yf = y.reshape(batch * y_win, y.shape[2])
    xi, yi = x_idx.reshape(-1), y_idx.reshape(-1)
    z = jnp.zeros((), jnp.int32)

    def body(p, o):
        b, rem = p // (x_win * y_win), p % (x_win * y_win)
        kx, ky = b * x_win + rem // y_win, b * y_win + rem % y_win
        xv = lax.dynamic_slice_in_dim(xf, kx, 1)
        yv = lax.dynamic_slice_in_dim(yf, ky, 1)
        upd = lax.dot_general(xv, yv, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
        start = (xi[kx], yi[ky], z, z)
        blk = lax.dynamic_slice(o, start, (1, 1, *o.shape[2:]))
        return lax.dynamic_update_slice(o, blk + (alpha * upd)[None, None], start)

    (o,) = _carry((o,), x, y, xi, yi, alpha)
    return lax.fori_loop(0, batch * x_win * y_win, body, o)


def _outer_dense(o, x, y, x_idx, y_idx, alpha, *, acc_dtype):
    batch = x.shape[0]
    nx, ny, sx, sy = o.shape
    b = jnp.arange(batch, dtype=jnp.int32)[:, None]
    xd = jnp.zeros((batch, nx, sx), x.dtype).at[b, x_idx].add(x)
    yd = jnp.zeros((batch, ny, sy), y.dtype).at[b, y_idx].add(y)
    upd = jnp.einsum("bks,blt->klst", xd, yd, preferred_element_type=acc_dtype)
    return o + alpha * upd


def _outer_grouped(o, x, y, x_idx, y_idx, alpha, *, acc_dtype):
    batch, x_win, x_size = x.shape
    y_win, y_size = y.shape[1:]
    n = batch * x_win * y_win
    P = group_rows(n, o.shape[0] * o.shape[1])
    rows, cols = _pair_blocks(x_idx, y_idx, False)
    perm, rs, cs, run_end = _runs(rows.reshape(-1), cols.reshape(-1), o.shape[0])
    pb = perm // (x_win * y_win)
    pi = (perm // y_win) % x_win
    pj = perm % y_win
    xs = jnp.concatenate([x[pb, pi], jnp.zeros((P, x_size), x.dtype)])
    ys = jnp.concatenate([y[pb, pj], jnp.zeros((P, y_size), y.dtype)])
    lane = jnp.arange(P, dtype=jnp.int32)
    z = jnp.zeros((), jnp.int32)

    def cond(state):
        return state[0] < n

    def body(state):
        pos, o = state
        end = jnp.minimum(pos + P, run_end[pos])
        xv = lax.dynamic_slice_in_dim(xs, pos, P)
        xv = jnp.where((lane < end - pos)[:, None], xv, jnp.zeros((), xv.dtype))
        yv = lax.dynamic_slice_in_dim(ys, pos, P)
        upd = lax.dot_general(xv, yv, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype)
        start = (rs[pos], cs[pos], z, z)
        blk = lax.dynamic_slice(o, start, (1, 1, x_size, y_size))
        return end, lax.dynamic_update_slice(o, blk + (alpha * upd)[None, None], start)

    return lax.while_loop(cond, body, _carry((jnp.int32(0), o), xs, ys, rs, cs, run_end, alpha))[1]


_OUTER = {
    "gather": _outer_gather,
    "loop": _outer_loop,
    "dense": _outer_dense,
    "grouped": _outer_grouped,
}
