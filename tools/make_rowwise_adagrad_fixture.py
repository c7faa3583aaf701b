"""Writes ``tests/fixtures/rowwise_adagrad.npz``: FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, step by step.

The test suite compares ``blocksparse_jax.optim.rowwise_adagrad`` with these
arrays, so it does not need FBGEMM.  Regenerate with::

    pip install fbgemm-gpu-cpu==1.8.0   # pairs with torch 2.13 (CPU)
    python3 tools/make_rowwise_adagrad_fixture.py

One table (``N_ROWS x DIM`` float32) is trained for ``STEPS`` steps by
``SplitTableBatchedEmbeddingBagsCodegen`` on the CPU (``PoolingMode.NONE``:
one looked-up row per id), each step with ``BATCH`` ids (skewed, so that a
step reads some rows several times and leaves most untouched) and the
gradient of the loss ``sum(lookup(ids) * upstream)`` (``upstream`` random), in
two configurations: a tiny ``eps`` and an ``eps`` large enough to show where it
is added.  Saved (``c`` the configuration):

* ``table0`` ``(N_ROWS, DIM)``, ``ids`` ``(STEPS, BATCH)`` int32, ``upstream``
  ``(STEPS, BATCH, DIM)``;
* ``lr_c``, ``eps_c``; ``table_c`` ``(STEPS, N_ROWS, DIM)`` and ``acc_c``
  ``(STEPS, N_ROWS)``: FBGEMM's table and row accumulators after each step.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)

N_ROWS, DIM, STEPS, BATCH = 40, 8, 4, 24
CONFIGS = {"small_eps": (0.05, 1e-8), "large_eps": (0.3, 0.5)}
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "rowwise_adagrad.npz")


def train(table0, ids, upstream, lr, eps):
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(N_ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=eps,
        pooling_mode=PoolingMode.NONE,
    )
    with torch.no_grad():
        emb.split_embedding_weights()[0].copy_(torch.from_numpy(table0))
    tables, accs = [], []
    offsets = torch.arange(BATCH + 1, dtype=torch.int64)
    for step in range(STEPS):
        out = emb(torch.from_numpy(ids[step].astype(np.int64)), offsets)
        out.backward(torch.from_numpy(upstream[step]))  # the update runs inside the backward
        tables.append(emb.split_embedding_weights()[0].detach().numpy().copy())
        accs.append(emb.split_optimizer_states()[0][0].detach().numpy().copy())
    return np.stack(tables), np.stack(accs)


def main():
    rng = np.random.default_rng(0)
    table0 = rng.standard_normal((N_ROWS, DIM)).astype(np.float32)
    # Skewed ids: rows 0-5 often (duplicates within a step), the rest rarely.
    hot = rng.integers(0, 6, (STEPS, BATCH // 2))
    cold = rng.integers(0, N_ROWS, (STEPS, BATCH - BATCH // 2))
    ids = np.concatenate([hot, cold], axis=1).astype(np.int32)
    ids = np.take_along_axis(ids, rng.permuted(np.tile(np.arange(BATCH), (STEPS, 1)), axis=1), 1)
    upstream = rng.standard_normal((STEPS, BATCH, DIM)).astype(np.float32)
    arrays = {"table0": table0, "ids": ids, "upstream": upstream}
    for name, (lr, eps) in CONFIGS.items():
        tables, accs = train(table0, ids, upstream, lr, eps)
        arrays.update(
            {
                f"lr_{name}": np.float32(lr),
                f"eps_{name}": np.float32(eps),
                f"table_{name}": tables,
                f"acc_{name}": accs,
            }
        )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
