"""Block-sparse gemv, outer product and dot (Theano's SparseBlockGemv / SparseBlockOuter).

Out-of-range indices
--------------------
Eager calls with concrete index arrays raise ``IndexError``.  Under ``jit`` the
values are unknown when tracing; an out-of-range index there selects a block of
zeros that does not exist: in ``gemv`` / ``dot`` it contributes nothing (an
out-of-range ``output_idx[b, j]`` leaves ``out[b, j] == o[b, j]``, and in
``sparse_block_dot`` adds no bias), in ``outer`` its update is dropped.  Gradients
are consistent with that (zero).  The slot is masked by selection, never by
multiplying with zero: no value in it (a NaN activation) and no value of any
block (an inf in block 0) reaches a result or a gradient.
``jax.experimental.checkify`` with ``checkify.index_checks`` reports such an index.

NaN and inf
-----------
``gather`` is the reference: a non-finite value propagates exactly where the
selected products ``h[b, i] * W[input_idx[b, i], output_idx[b, j]]`` (and, for
``outer``, ``alpha * x[b, i] * y[b, j]``) put it, with IEEE rules (``0 * inf`` and
``inf - inf`` are NaN), and nowhere else: a NaN in a block no example selects
never appears.  Every strategy gives the same NaN and inf positions, in values
and gradients, and so does ``parallel``.

Forward mode
------------
The ops are ``jax.custom_vjp`` functions: reverse mode (``jax.grad``,
``jax.vjp``, ``jax.jacrev``, and ``jax.jacrev(jax.jacrev(f))`` for second
derivatives) works to any order; forward mode (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian``, and the function ``jax.linearize`` returns) raises JAX's
``TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp function``.

Execution strategies
--------------------
Every public op takes a keyword-only ``strategy`` (static configuration, passed
through the custom VJPs' ``nondiff_argnums`` so the backward passes use it too):

* ``"gather"``: gather the selected blocks (in chunks of the batch under a
  memory budget) and contract with one einsum;
* ``"loop"``: a ``lax.fori_loop`` over the pairs reading each block in place;
* ``"dense"``: scatter the activations into the full block space, one dense GEMM;
* ``"grouped"``: sort the pairs by block and multiply each distinct block once
  by all the activation rows that use it;
* ``"ragged"``: sort the pairs by block and multiply each distinct block by its
  rows in one grouped matrix product (``jax.lax.ragged_dot``);
* ``"auto"`` (default): on CPU the cheapest by a cost model over the static
  shapes (:func:`estimate_costs`: bytes of blocks read, distinct blocks
  touched, gathered bytes, flops, loop steps); on GPU and TPU the cheapest of
  ``"gather"``, ``"ragged"`` and ``"dense"`` by :func:`estimate_accelerator_costs`
  (never a sequential loop), with ``"gather"`` in one shot when its gathered
  blocks fit :func:`accelerator_budget`.  The backend choice is a
  ``jax.lax.platform_dependent``, so one exported function carries all of them.

All strategies give the same values and gradients, NaN and inf included; only
speed and memory differ.  ``dense`` multiplies every block, the unselected ones
by zero, which is exact only for finite factors: when ``W`` (or, for the weight
update, an activation) holds a NaN or an inf, that call computes with
``gather`` instead (a run-time ``lax.cond``).
"""

from blocksparse_jax.blocksparse._carry import vary_over
from blocksparse_jax.blocksparse._cost import (
    AcceleratorCosts,
    CpuCosts,
    accelerator_budget,
    accelerator_costs,
    choose_accelerator_strategy,
    choose_strategy,
    estimate_accelerator_costs,
    estimate_costs,
)
from blocksparse_jax.blocksparse._dispatch import STRATEGIES
from blocksparse_jax.blocksparse._ops import sparse_block_dot, sparse_block_gemv, sparse_block_outer

__all__ = [
    "STRATEGIES",
    "AcceleratorCosts",
    "CpuCosts",
    "accelerator_budget",
    "accelerator_costs",
    "choose_accelerator_strategy",
    "choose_strategy",
    "estimate_accelerator_costs",
    "estimate_costs",
    "sparse_block_dot",
    "sparse_block_gemv",
    "sparse_block_outer",
    "vary_over",
]
