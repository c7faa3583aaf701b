"""Writes tests/fixtures/sampled_softmax_tf.npz: TensorFlow's sampled softmax values and gradients.

TensorFlow is not a test dependency: this script records what
``tf.nn.sampled_softmax_loss`` and ``tf.random.log_uniform_candidate_sampler``
return on small inputs, and tests/test_sampled_softmax.py compares
``blocksparse_jax`` with the recording.  Run it with any Python that has
``tensorflow-cpu`` (it imports nothing from this package)::

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu
    /tmp/tf/bin/python tools/make_sampled_softmax_fixture.py

The arrays (TensorFlow's ``weights`` are ``(n_outputs, n_in)``; the fixture
stores ``W = weights.T``, ``(n_in, n_outputs)``, as ``FullSoftmaxParams``):

* ``x (batch, n_in)``, ``W``, ``b (n_outputs,)``, ``target (batch,)``, and
  ``sampled ids (n_sampled,)`` with expected counts ``true_count (batch,)``,
  ``sampled_count (n_sampled,)``; two sampled ids are targets of examples
  (accidental hits);
* for ``hits`` in ``("remove", "keep")`` (``remove_accidental_hits``): the
  per-example ``loss_<hits>`` and the gradients of their sum, ``dx_<hits>``,
  ``dW_<hits>`` (``(n_in, n_outputs)``) and ``db_<hits>``;
* ``log_uniform_*``: one call of the log-uniform sampler (``unique=True``,
  ``range_max=log_uniform_range``) on ``log_uniform_true``: its sampled ids and
  expected counts.
"""

from __future__ import annotations

import pathlib

import numpy as np
import tensorflow as tf

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sampled_softmax_tf.npz"


def main() -> None:
    rng = np.random.default_rng(0)
    batch, n_in, n_outputs, n_sampled = 6, 5, 40, 9
    x = rng.normal(size=(batch, n_in)).astype(np.float32)
    weights = (0.5 * rng.normal(size=(n_outputs, n_in))).astype(np.float32)
    biases = (0.1 * rng.normal(size=(n_outputs,))).astype(np.float32)
    target = rng.choice(n_outputs, size=batch, replace=False).astype(np.int64)
    others = np.setdiff1d(np.arange(n_outputs), target)
    # Seven ids no example targets, and the targets of examples 1 and 4: accidental hits.
    ids = np.concatenate([rng.choice(others, size=n_sampled - 2, replace=False), target[[1, 4]]])
    ids = ids.astype(np.int64)
    true_count = rng.uniform(0.05, 2.0, size=(batch, 1)).astype(np.float32)
    sampled_count = rng.uniform(0.05, 2.0, size=(n_sampled,)).astype(np.float32)

    out = {
        "x": x,
        "W": weights.T.copy(),
        "b": biases,
        "target": target,
        "ids": ids,
        "true_count": true_count[:, 0],
        "sampled_count": sampled_count,
    }
    for name, remove in (("remove", True), ("keep", False)):
        tx, tw, tb = tf.Variable(x), tf.Variable(weights), tf.Variable(biases)
        with tf.GradientTape() as tape:
            loss = tf.nn.sampled_softmax_loss(
                weights=tw,
                biases=tb,
                labels=target[:, None],
                inputs=tx,
                num_sampled=n_sampled,
                num_classes=n_outputs,
                sampled_values=(ids, true_count, sampled_count),
                remove_accidental_hits=remove,
            )
            total = tf.reduce_sum(loss)
        dx, dw, db = tape.gradient(total, [tx, tw, tb])
        out[f"loss_{name}"] = loss.numpy()
        out[f"dx_{name}"] = dx.numpy()
        out[f"dW_{name}"] = tf.convert_to_tensor(dw).numpy().T.copy()
        out[f"db_{name}"] = tf.convert_to_tensor(db).numpy()

    true_classes = np.array([[0], [3], [100], [4_999]], np.int64)
    range_max, num = 5_000, 64
    sampled, t_count, s_count = tf.random.log_uniform_candidate_sampler(
        true_classes=true_classes,
        num_true=1,
        num_sampled=num,
        unique=True,
        range_max=range_max,
        seed=1,
    )
    out["log_uniform_range"] = np.int64(range_max)
    out["log_uniform_true"] = true_classes[:, 0]
    out["log_uniform_ids"] = sampled.numpy()
    out["log_uniform_true_count"] = t_count.numpy()[:, 0]
    out["log_uniform_sampled_count"] = s_count.numpy()

    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez(OUT, **out)
    print(f"wrote {OUT} (tensorflow {tf.__version__})")


if __name__ == "__main__":
    main()
