"""Block-sparse ops and the hierarchical softmax over a device mesh (``jax.shard_map``).

The batch is split over ``data_axis`` and the output side of the weights over
``model_axis``:

* ``sparse_block_gemv`` / ``sparse_block_dot`` / ``sparse_block_outer``: ``W``'s
  ``o_blocks`` (axis 1; ``b``'s axis 0) are split into equal contiguous ranges,
  one per model shard.  A shard remaps the global output indices to its own
  range; an index outside the range contributes nothing there (the core ops'
  masking of out-of-range indices does it), and the per-shard partial results
  are summed over ``model_axis`` (``psum``).  Every output block is owned by
  exactly one shard, so the sum is the single-device result.
* ``h_log_softmax`` / ``h_softmax_loss``: the classes (columns of ``W1``,
  entries of ``b1``, ``W2``, ``b2``) are split over ``model_axis``.  The
  class-level log-sum-exp is combined across shards (``pmax`` of the local
  maxima, ``psum`` of the rescaled sums); a target's within-class log-softmax is
  computed on the shard that owns its class and summed in.
* ``full_log_softmax`` / ``full_softmax_loss``: the outputs (columns of ``W``,
  entries of ``b``) are split over ``model_axis``, each shard walking its own
  columns without their logits; the log-sum-exp is combined across the shards
  the same way, and a target's logit comes from the shard that owns it.

Weights are never gathered: the weight gradient comes back sharded like the
weights, and the data-parallel reduction of the weight gradient is a ``psum``
over ``data_axis`` of each shard's own blocks only.

Uneven splits: ``o_blocks``, a full softmax's ``n_outputs`` (and ``batch``) must
be divisible by the size of the mesh axis they are split over; anything else is refused with a ``ValueError``
that says how to fix it (padding ``W`` would change what a negative index points
at).  Uneven class counts are different: :func:`shard_params` pads the classes to
a multiple of the model axis, and the padded classes get ``-inf`` logits (zero
probability); its result, a :class:`ShardedHSoftmaxParams`, records the real
class count, so the parallel functions refuse exactly what the single-device
ones refuse.

Works on any ``jax.sharding.Mesh`` - CPU, GPU, TPU, one host or many - with
``Auto`` or ``Explicit`` axis types.
"""

from __future__ import annotations

from blocksparse_jax.parallel._full import full_log_softmax, full_softmax_loss
from blocksparse_jax.parallel._hsoftmax import (
    ShardedHSoftmaxParams,
    h_log_softmax,
    h_softmax_loss,
    shard_params,
)
from blocksparse_jax.parallel._ops import sparse_block_dot, sparse_block_gemv, sparse_block_outer

__all__ = [
    "ShardedHSoftmaxParams",
    "full_log_softmax",
    "full_softmax_loss",
    "h_log_softmax",
    "h_softmax_loss",
    "shard_params",
    "sparse_block_dot",
    "sparse_block_gemv",
    "sparse_block_outer",
]
