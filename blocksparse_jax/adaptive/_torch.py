"""Moving adaptive softmax weights between PyTorch's state-dict layout and the pytree.

PyTorch's ``nn.AdaptiveLogSoftmaxWithLoss`` stores ``head.weight``
``(shortlist + n_clusters, n_in)``, optionally ``head.bias``, and per tail
cluster ``i`` ``tail.{i}.0.weight`` ``(d_i, n_in)`` and ``tail.{i}.1.weight``
``(cluster_size_i, d_i)``: ``(out, in)`` matrices, the transposes of this
library's ``x @ W`` layout.  Nothing here imports torch: arrays go in and out
as NumPy arrays (``tensor.numpy()``, ``torch.from_numpy``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from blocksparse_jax import _checks
from blocksparse_jax.adaptive._params import AdaptiveSoftmaxParams, check_params

_shape = _checks.shape_str
_TAIL_KEY = re.compile(r"tail\.(\d+)\.([01])\.weight")


def adaptive_softmax_from_torch(
    state_dict: Mapping[str, object], *, prefix: str = "", dtype=None
) -> AdaptiveSoftmaxParams:
    r""":class:`AdaptiveSoftmaxParams` from a PyTorch ``AdaptiveLogSoftmaxWithLoss`` state dict.

    Reads ``{prefix}head.weight``, ``{prefix}head.bias`` (if present: a module
    made with ``head_bias=True``) and ``{prefix}tail.{i}.0.weight`` /
    ``{prefix}tail.{i}.1.weight`` for every tail cluster, and transposes them to
    the ``x @ W`` layout.  The cutoffs follow from the shapes.  The values are
    NumPy arrays (or anything ``np.asarray`` takes: a CPU tensor that does not
    require grad, as ``module.state_dict()`` gives); no torch import is needed.

    Args:
      state_dict: a mapping of names to arrays, e.g.
        ``{k: v.numpy() for k, v in module.state_dict().items()}``.
      prefix: the module's name in a larger model's state dict, with its dot
        (``"decoder."``); keys outside it are ignored.
      dtype: optional float dtype to cast every array to (default: keep theirs).

    Returns:
      The :class:`AdaptiveSoftmaxParams`, with ``adaptive_log_softmax(x,
      params)`` equal to the module's ``log_prob(x)``.

    Raises:
      KeyError: ``head.weight`` or a tail weight missing (tail clusters must be
        numbered ``0 .. n_clusters - 1`` with both weights each).
      ValueError: an unexpected key under ``prefix``, or shapes that do not
        fit together.

    Examples:
      >>> import numpy as np
      >>> from blocksparse_jax import adaptive_softmax_from_torch
      >>> rng = np.random.default_rng(0)
      >>> state = {                                     # n_in 8, cutoffs [4], 10 outputs
      ...     "head.weight": rng.standard_normal((5, 8)),
      ...     "tail.0.0.weight": rng.standard_normal((2, 8)),
      ...     "tail.0.1.weight": rng.standard_normal((6, 2)),
      ... }
      >>> params = adaptive_softmax_from_torch(state, dtype=np.float32)
      >>> params.head_W.shape, params.cutoffs, params.n_outputs
      ((8, 5), (4,), 10)
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a mapping of names to arrays; got {type(state_dict).__name__}"
        )
    ours = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    tails: dict[int, dict[int, object]] = {}
    for key in ours:
        m = _TAIL_KEY.fullmatch(key)
        if m:
            tails.setdefault(int(m.group(1)), {})[int(m.group(2))] = ours[key]
        elif key not in ("head.weight", "head.bias"):
            raise ValueError(
                f"unexpected key {prefix + key!r} in state_dict: an AdaptiveLogSoftmaxWithLoss "
                f"holds {prefix}head.weight, {prefix}head.bias and "
                f"{prefix}tail.<i>.<0 or 1>.weight (pass prefix= for a submodule)"
            )
    if "head.weight" not in ours:
        raise KeyError(f"state_dict has no {prefix + 'head.weight'!r}")
    K = len(tails)
    for i in range(K):
        for j in (0, 1):
            if j not in tails.get(i, {}):
                raise KeyError(
                    f"state_dict has no {prefix}tail.{i}.{j}.weight (found tail clusters "
                    f"{sorted(tails)}; they must be numbered 0 .. n_clusters - 1)"
                )

    def matrix(name, value):
        a = np.asarray(value)
        if a.ndim != 2:
            raise ValueError(f"{prefix}{name} must be 2-D (out, in); got shape {_shape(a.shape)}")
        return jnp.asarray(a.T, dtype)

    head_W = matrix("head.weight", ours["head.weight"])
    head_b = ours.get("head.bias")
    if head_b is not None:
        head_b = jnp.asarray(np.asarray(head_b), dtype)
    proj = tuple(matrix(f"tail.{i}.0.weight", tails[i][0]) for i in range(K))
    out = tuple(matrix(f"tail.{i}.1.weight", tails[i][1]) for i in range(K))
    return check_params(AdaptiveSoftmaxParams(head_W, head_b, proj, out))


def adaptive_softmax_to_torch(params: AdaptiveSoftmaxParams) -> dict[str, np.ndarray]:
    r"""The state dict of PyTorch's ``AdaptiveLogSoftmaxWithLoss`` for ``params``, as NumPy arrays.

    The inverse of :func:`adaptive_softmax_from_torch`: load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})``
    into a module made with ``AdaptiveLogSoftmaxWithLoss(params.n_in,
    params.n_outputs, list(params.cutoffs), head_bias=params.head_b is not None)``
    (and a ``div_value`` that gives the same widths).

    Args:
      params: :class:`AdaptiveSoftmaxParams`.

    Returns:
      ``{"head.weight": ..., ["head.bias": ...,] "tail.{i}.0.weight": ...,
      "tail.{i}.1.weight": ...}``, ``(out, in)`` NumPy arrays in the parameters'
      dtypes (bfloat16 becomes float32, which NumPy-to-torch cannot carry).

    Raises:
      TypeError, ValueError: ``params`` that are not valid adaptive softmax parameters.

    Examples:
      >>> import jax
      >>> from blocksparse_jax import adaptive_softmax_init, adaptive_softmax_to_torch
      >>> state = adaptive_softmax_to_torch(adaptive_softmax_init(jax.random.key(0), 8, 10, [4]))
      >>> {k: v.shape for k, v in state.items()}
      {'head.weight': (5, 8), 'tail.0.0.weight': (2, 8), 'tail.0.1.weight': (6, 2)}
    """
    params = check_params(params)

    def host(a):
        a = np.asarray(a)
        return a.astype(np.float32) if a.dtype == jnp.bfloat16 else a

    state = {"head.weight": host(params.head_W).T}
    if params.head_b is not None:
        state["head.bias"] = host(params.head_b)
    for i, (p, o) in enumerate(zip(params.tail_proj, params.tail_out, strict=True)):
        state[f"tail.{i}.0.weight"] = host(p).T
        state[f"tail.{i}.1.weight"] = host(o).T
    return state
