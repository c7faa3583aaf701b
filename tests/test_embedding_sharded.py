"""Embedding tables sharded by rows: the single-device functions, partitioned by XLA.

``embedding_lookup`` + ``value_and_sparse_grad`` + ``lazy(optax.adam)`` or
``rowwise_adagrad`` + ``apply_updates``, jitted with the table and the state
donated, the table's rows over ``"model"`` and the ids over ``"data"``, on
``Explicit`` and ``Auto`` meshes.  Reference: the same steps on one device.
The compiled step moves nothing of the table's size between devices, and a
device's temporaries are far below its shard.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from blocksparse_jax import embedding_lookup, value_and_sparse_grad
from blocksparse_jax.optim import apply_updates, lazy, rowwise_adagrad

F32 = jnp.float32
N_ROWS, DIM, BATCH, BAG = 512, 8, 16, 3


def _collective_sizes(hlo: str, op: str) -> list[int]:
    """Element counts of every ``op`` (``all-gather``, ``all-reduce``, ...) result, tuples included."""
    sizes = []
    for m in re.finditer(r"= \(?([^=]*?)\)? " + op + r"(?:-start)?\(", hlo):
        for shape in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
            sizes.append(math.prod(int(d) for d in shape.split(",") if d))
    return sizes


def _optimizer(name):
    # Adam's eps large enough that it does not amplify the float noise of a
    # near-zero element of a gradient (the devices sum in another order)
    return {"lazy_adam": lazy(optax.adam(0.05)), "rowwise_adagrad": rowwise_adagrad(0.05)}[name]


def _loss(params, ids):
    # Positive rows and w (_data): every element of every gradient is a sum of
    # positive terms, free of the cancellations whose float noise (the devices sum
    # in another order) the optimizers' normalisations would amplify.
    rows = embedding_lookup(params["table"], ids)  # (batch, bag, dim)
    return jnp.mean(jnp.tanh(rows @ params["w"]))


def _step(tx):
    def step(params, state, ids):
        loss, grads = value_and_sparse_grad(_loss)(params, ids)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = tx.update(grads, state, params)
        return apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _data(steps=3):
    rng = np.random.default_rng(0)
    params = {
        "table": rng.uniform(0.5, 1.5, (N_ROWS, DIM)).astype(np.float32),
        "w": rng.uniform(0.1, 0.5, (DIM,)).astype(np.float32),
    }
    ids = rng.integers(0, 40, (steps, BATCH, BAG)).astype(np.int32)  # duplicates
    ids[:, 0, 0] = -1  # padding
    ids[:, 1, :] = rng.integers(0, N_ROWS, (steps, BAG))  # rows on every shard
    return params, ids


@functools.cache
def _one_device(opt):
    """The reference: the same steps on one device, as NumPy arrays."""
    params, ids = _data()
    tx = _optimizer(opt)
    one = jax.tree.map(jnp.asarray, params)
    state = tx.init(one)
    step = _step(tx)
    for s in range(ids.shape[0]):
        one, state, _ = step(one, state, jnp.asarray(ids[s]))
    return jax.tree.map(np.asarray, one), jax.tree.map(np.asarray, state)


@pytest.fixture(params=[(2, 4), (1, 8), (8, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def shape(request):
    return request.param


@pytest.fixture(params=["explicit", "auto"])
def axis_types(request):
    return (AxisType.Explicit if request.param == "explicit" else AxisType.Auto,) * 2


@pytest.mark.parametrize("opt", ["lazy_adam", "rowwise_adagrad"])
def test_sharded_table_trains_as_on_one_device(shape, axis_types, opt):
    params, ids = _data()
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=axis_types)
    specs = {"table": P("model", None), "w": P()}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    tx = _optimizer(opt)
    state = tx.init(sharded)
    if opt == "rowwise_adagrad":  # one accumulator per row, split like the rows
        acc = state.sum_of_squares["table"]
        assert acc.sharding.shard_shape(acc.shape) == (N_ROWS // shape[1],)
    step = _step(tx)
    ids_sharding = NamedSharding(mesh, P("data"))
    for s in range(ids.shape[0]):
        sharded, state, _ = step(sharded, state, jax.device_put(ids[s], ids_sharding))
    table = sharded["table"]
    assert table.sharding.shard_shape(table.shape) == (N_ROWS // shape[1], DIM)

    one, state1 = _one_device(opt)
    for k in params:
        np.testing.assert_allclose(sharded[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state1), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _place_like_rows(shapes, mesh, n_rows):
    """The state's entries of the table (leading axis ``n_rows``) split like its rows."""

    def place(a):
        spec = P("model") if a.ndim and a.shape[0] == n_rows else P()
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(place, shapes)


@pytest.mark.parametrize(
    "shape, axis_type",
    [
        ((2, 4), AxisType.Explicit),
        ((2, 4), AxisType.Auto),
        ((1, 8), AxisType.Explicit),
        ((8, 1), AxisType.Auto),
    ],
    ids=["2x4-explicit", "2x4-auto", "1x8-explicit", "8x1-auto"],
)
@pytest.mark.parametrize("opt", ["lazy_adam", "rowwise_adagrad"])
def test_sharded_step_moves_no_table_and_holds_little(shape, axis_type, opt):
    """Compile-only, 1,048,576 x 32 (128 MiB): collectives and a device's temporaries."""
    n_rows, dim, lookups = 1 << 20, 32, 2048
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)
    table = jax.ShapeDtypeStruct((n_rows, dim), F32, sharding=NamedSharding(mesh, P("model")))
    w = jax.ShapeDtypeStruct((dim,), F32, sharding=NamedSharding(mesh, P()))
    params = {"table": table, "w": w}
    ids = jax.ShapeDtypeStruct((lookups, 1), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    tx = _optimizer(opt)
    state = _place_like_rows(jax.eval_shape(tx.init, params), mesh, n_rows)
    compiled = _step(tx).lower(params, state, ids).compile()
    hlo = compiled.as_text()
    rows_per_device = n_rows // shape[1]
    # Only the step's lookups travel (ids, looked-up rows, the touched rows' gradient).
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert max(_collective_sizes(hlo, op), default=0) <= lookups * dim, op
    assert max(_collective_sizes(hlo, "all-reduce")) >= lookups * dim // shape[0]  # found some
    shard_bytes = rows_per_device * dim * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < shard_bytes / 8, (temp, shard_bytes)


@pytest.mark.parametrize("ids_spec", [P("data"), P()])
def test_lookup_from_an_explicitly_sharded_table(ids_spec):
    """The rows come out split like the ids, whether or not the ids are split."""
    params, ids = _data()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    table = jax.device_put(params["table"], NamedSharding(mesh, P("model", None)))
    got = jax.jit(embedding_lookup)(table, jax.device_put(ids[0], NamedSharding(mesh, ids_spec)))
    split = 2 if ids_spec == P("data") else 1
    assert got.sharding.shard_shape(got.shape) == (BATCH // split, BAG, DIM)
    want = jax.jit(embedding_lookup)(params["table"], jnp.asarray(ids[0]))
    np.testing.assert_array_equal(got, want)
