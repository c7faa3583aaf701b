"""Block-sparse gemv, outer product and dot (Theano's SparseBlockGemv / SparseBlockOuter).

Out-of-range indices
--------------------
Eager calls with concrete index arrays raise ``IndexError``.  Under ``jit`` the
values are unknown when tracing; an out-of-range index there selects a block of
zeros that does not exist: in ``gemv`` / ``dot`` it contributes nothing (an
out-of-range ``output_idx[b, j]`` leaves ``out[b, j] == o[b, j]``, and in
``sparse_block_dot`` adds no bias), in ``outer`` its update is dropped.  Gradients
are consistent with that (zero).  ``jax.experimental.checkify`` with
``checkify.index_checks`` reports such an index.

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

All strategies give the same values and gradients; only speed and memory differ.

Modules: ``_ops`` (the public ops and their validation), ``_core`` (the custom
VJPs), ``_dispatch`` (strategy choice), ``_cost`` (the CPU and accelerator cost
models), one module per strategy (``_gather``, ``_loop``, ``_dense``,
``_grouped``, ``_ragged``), and the
helpers they share (``_pairs``, ``_carry``).
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
