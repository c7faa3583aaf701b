"""Which entries of an optax state belong to which parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


class StateMap:
    """The per-parameter entries of an optimizer state (``mu`` and ``nu`` of Adam, ...).

    An entry is a leaf of a subtree of the state that has the parameters' tree
    structure down to their leaves (a leaf, or ``optax.MaskedNode`` where
    ``optax.masked`` / ``multi_transform`` left a parameter out) and each
    parameter's shape at its position: the ``k``-th such subtree holds entry
    ``k`` of every parameter.  Everything else (step counts, hyperparameters,
    random keys) is not per parameter.

    Unlike ``optax.tree_utils.tree_map_params``, this reads the state itself
    and does not re-run ``init`` on a placeholder, so it works with
    ``optax.masked`` and ``optax.multi_transform`` given mask trees.
    """

    def __init__(self, state, params):
        self.param_leaves, self.param_def = jax.tree.flatten(params, is_leaf=_is_masked)
        self.state = state

    def _is_param_tree(self, node) -> bool:
        if node is None or _is_masked(node):
            return False
        try:
            leaves = self.param_def.flatten_up_to(node)
        except (ValueError, TypeError):
            return False
        found = False
        for leaf, param in zip(leaves, self.param_leaves, strict=True):
            if _is_masked(leaf) or _is_masked(param):
                continue
            if getattr(leaf, "shape", None) != getattr(param, "shape", None):
                return False
            found = True
        return found

    def map(self, fn: Callable[[int, Any], Any], state=None):
        """The state with each entry ``e`` of parameter ``i`` replaced by ``fn(i, e)``."""
        state = self.state if state is None else state

        def visit(node):
            if not self._is_param_tree(node):
                return node
            leaves = self.param_def.flatten_up_to(node)
            new = [leaf if _is_masked(leaf) else fn(i, leaf) for i, leaf in enumerate(leaves)]
            return self.param_def.unflatten(new)

        return jax.tree.map(visit, state, is_leaf=lambda n: self._is_param_tree(n) or _is_masked(n))

    def entries(self, i: int, state=None) -> list:
        """The entries of parameter ``i``, in the state's order."""
        got = []

        def take(j, e):
            if j == i:
                got.append(e)
            return e

        self.map(take, state)
        return got

    def replace(self, i: int, new: list, state=None):
        """The state with the entries of parameter ``i`` replaced by ``new`` (in order)."""
        it = iter(new)
        return self.map(lambda j, e: next(it) if j == i else e, state)
