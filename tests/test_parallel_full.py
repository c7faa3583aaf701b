"""The exact softmax with its outputs split over a mesh axis, on 8 CPU devices.

For every mesh one jitted training step (the loss with every option, its
gradients and an SGD update) is compiled, compared with the single-device
functions, and its HLO searched for an all-gather.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import blocksparse_jax as bsj
from blocksparse_jax import parallel
from tests.test_parallel import _all_gathers

B, N_IN, V = 8, 6, 40
TOL = dict(rtol=1e-10, atol=1e-12)
OPTIONS = dict(label_smoothing=0.1, z_loss=0.01, softcap=2.5, chunk_size=4)
MESHES = {
    "1x8": ((1, 8), AxisType.Explicit),
    "2x4": ((2, 4), AxisType.Explicit),
    "8x1": ((8, 1), AxisType.Auto),
}


def _problem():
    rng = np.random.default_rng(0)
    params = bsj.FullSoftmaxParams(
        jnp.asarray(rng.standard_normal((N_IN, V))), jnp.asarray(0.3 * rng.standard_normal(V))
    )
    x = jnp.asarray(rng.standard_normal((B, N_IN)))
    target = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    mask = jnp.asarray(np.arange(B) % 3 != 1)
    return params, x, target, mask


PROBLEM = _problem()


def _step(mesh):
    def loss(params, x, target, mask):
        kw = {} if mesh is None else dict(mesh=mesh)
        mod = bsj if mesh is None else parallel
        value = mod.full_softmax_loss(x, params, target, mask=mask, **OPTIONS, **kw)
        per = mod.full_softmax_loss(x, params, target, reduction="none", **kw)
        logp = mod.full_log_softmax(x, params, target, softcap=2.5, **kw)
        return value + 0.1 * jnp.sum(jnp.sin(per)) + 0.1 * jnp.sum(logp)

    def step(params, x, target, mask):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, x, target, mask)
        return value, grads, jax.tree.map(lambda a, g: a - 0.1 * g, params, grads[0])

    return jax.jit(step)


@pytest.fixture(scope="module")
def single():
    return _step(None)(*PROBLEM)


@pytest.fixture(scope="module", params=list(MESHES))
def run(request):
    shape, axis_type = MESHES[request.param]
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)
    params, x, target, mask = PROBLEM
    batch = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    args = (parallel.shard_params(params, mesh), batch(x), batch(target), batch(mask))
    compiled = _step(mesh).lower(*args).compile()
    return dict(mesh=mesh, compiled=compiled, out=compiled(*args), params=args[0])


def test_step_equals_single_device(run, single):
    chex.assert_trees_all_close(jax.device_get(run["out"]), jax.device_get(single), **TOL)


def test_weights_and_their_gradients_stay_sharded(run):
    assert run["params"].W.sharding.spec == P(None, "model")
    _, (grads, _), new = run["out"]
    for a in (grads.W, new.W):
        assert a.sharding.is_equivalent_to(NamedSharding(run["mesh"], P(None, "model")), 2)


def test_step_never_gathers_weights(run):
    hlo = run["compiled"].as_text()
    assert _all_gathers(hlo) == []


def test_all_log_probabilities_and_out_of_range_targets():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params, x, target, _ = PROBLEM
    sharded = parallel.shard_params(params, mesh)
    full = parallel.full_log_softmax(x.reshape(2, 4, N_IN), sharded, mesh=mesh, softcap=2.5)
    chex.assert_trees_all_close(
        full, bsj.full_log_softmax(x, params, softcap=2.5).reshape(2, 4, V), **TOL
    )
    bad = target.at[3].set(V + 1)
    f = lambda t: parallel.full_log_softmax(x, sharded, t, mesh=mesh)
    lp = np.asarray(jax.jit(f)(bad))
    assert np.isneginf(lp[3])
    chex.assert_trees_all_close(
        np.delete(lp, 3),
        np.delete(np.asarray(bsj.full_log_softmax(x, params, target)), 3),
        **TOL,
    )


def test_no_bias_and_bad_arguments():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    params, x, target, _ = PROBLEM
    params = params._replace(b=None)
    got = jax.jit(jax.grad(lambda p: parallel.full_softmax_loss(x, p, target, mesh=mesh)))(
        parallel.shard_params(params, mesh)
    )
    want = jax.grad(lambda p: bsj.full_softmax_loss(x, p, target))(params)
    chex.assert_trees_all_close(jax.device_get(got), want, **TOL)
    uneven = bsj.FullSoftmaxParams(params.W[:, :38], None)
    with pytest.raises(ValueError, match="n_outputs=38 is not divisible by the size 4"):
        parallel.shard_params(uneven, mesh)
    with pytest.raises(ValueError, match="n_outputs=38 is not divisible"):
        parallel.full_softmax_loss(x, uneven, target, mesh=mesh)
    with pytest.raises(ValueError, match="batch=5 is not divisible by the size 2"):
        parallel.full_softmax_loss(x[:5], params, target[:5], mesh=mesh)
    with pytest.raises(ValueError, match="x must be"):
        parallel.full_softmax_loss(x[0], params, target[0], mesh=mesh)
    with pytest.raises(ValueError, match="label_smoothing"):
        parallel.full_softmax_loss(x, params, target, mesh=mesh, label_smoothing=2.0)
    with pytest.raises(ValueError, match="model_axis='rows'"):
        parallel.full_softmax_loss(x, params, target, mesh=mesh, model_axis="rows")
