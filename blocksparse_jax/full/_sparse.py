"""The filtered softmax's sparse rule: ``W``'s gradient in whole blocks of columns.

With a gradient filter, :func:`~blocksparse_jax.full_softmax_loss` reads every
column of ``W`` in the forward pass but its gradient reaches only the chunks
the filter keeps and the targets' columns.  The loss marks that use
(:mod:`blocksparse_jax._sparse_sites`): the marked output is the ``(batch, 2)``
pair ``(lse, target logit)`` of each example, and the rule's inputs are what
the backward pass reads, the filter's key included (``chunk_lse``, each
chunk's log-sum-exp per example, an output of the forward pass).  The set of
kept chunks is then a function of the forward values and of the pair's
cotangent, so the rule finds it exactly as the custom VJP does: the same code
(:func:`~blocksparse_jax.full._core.grads`) computes the gradient in both.

``W (n_in, n_outputs)`` is viewed as ``(n_in, n_outputs // block, block)``,
blocks along axis 1 (``W (n_outputs, n_in)`` of
:class:`~blocksparse_jax.FullSoftmaxRowParams` as ``(n_outputs // block,
block, n_in)``, blocks along axis 0), with ``block = gcd(n_outputs, chunk)`` (the chunk itself
when it divides ``n_outputs``).  The number of touched blocks depends on the
data, so the rule returns one pair per block, the untouched ones with the
out-of-range block index ``n_blocks`` (no contribution).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from blocksparse_jax import _sparse_sites as sites
from blocksparse_jax.full._core import Plan, Stats, grads, touched_chunks


@dataclasses.dataclass(frozen=True)
class FilteredChunksRule(sites.SparseRule):
    """``W``'s gradient under the gradient filter: the kept chunks and the targets' blocks.

    ``pairs(cotangent, x, W, b, target, lse, chunk_lse)``: ``cotangent`` is the
    ``(batch, 2)`` cotangent of ``(lse, target logit)``; the other inputs are
    those of :func:`~blocksparse_jax.full._core.logit_stats` and its outputs
    (``b`` left out when ``has_bias`` is ``False``).
    """

    plan: Plan
    has_bias: bool = True

    @property
    def block(self) -> int:
        """The columns per block: the largest width that tiles both the chunks and ``W``."""
        return math.gcd(self.plan.n_outputs, self.plan.chunk)

    def layout(self, weight_shape: tuple[int, ...]) -> sites.BlockLayout:
        shape = tuple(int(d) for d in weight_shape)
        if self.plan.rows:
            n_outputs, n_in = shape
            return sites.BlockLayout(shape, (n_outputs // self.block, self.block, n_in), axis=0)
        n_in, n_outputs = shape
        return sites.BlockLayout(shape, (n_in, n_outputs // self.block, self.block), axis=1)

    def touched_blocks(self, cotangent, target, lse, chunk_lse) -> jax.Array:
        """``(n_blocks,)`` bool: the blocks of the kept chunks and of the live targets."""
        plan, block = self.plan, self.block
        n_blocks = plan.n_outputs // block
        g_lse, g_target = cotangent[:, 0], cotangent[:, 1]
        kept = touched_chunks(chunk_lse, lse, g_lse, plan)
        # Column j belongs to chunk j // chunk (the moved-back last chunk keeps its fresh columns).
        first_column = jnp.arange(n_blocks, dtype=jnp.int32) * block
        in_kept_chunk = kept[first_column // plan.chunk]
        hits = (
            jnp.zeros((n_blocks,), jnp.int32)
            .at[target // block]
            .add((g_target != 0).astype(jnp.int32))
        )
        return in_kept_chunk | (hits > 0)

    def pairs(self, cotangent, x, W, *inputs) -> sites.BlockPairs:
        b, target, lse, chunk_lse = inputs if self.has_bias else (None, *inputs)
        ct = Stats(cotangent[:, 0], cotangent[:, 1], None, None)
        _, dW, _ = grads(self.plan, x, W, b, target, lse, chunk_lse, ct)
        n_outputs, n_in = self.plan.n_outputs, W.shape[1 if self.plan.rows else 0]
        n_blocks = n_outputs // self.block
        if self.plan.rows:
            right = dW.reshape(n_blocks, self.block, n_in)
        else:
            right = dW.reshape(n_in, n_blocks, self.block).transpose(1, 0, 2)
        touched = self.touched_blocks(cotangent, target, lse, chunk_lse)
        blocks = jnp.where(touched, jnp.arange(n_blocks, dtype=jnp.int32), n_blocks)
        return sites.BlockPairs(blocks, None, right.reshape(n_blocks, n_in * self.block))
