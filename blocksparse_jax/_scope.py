"""``jax.named_scope`` around the public functions, so that profiles name them."""

from __future__ import annotations

import functools

import jax


def named(fn):
    """Runs ``fn`` inside ``jax.named_scope`` of its public name.

    ``blocksparse_jax.<name>``, or ``blocksparse_jax.parallel.<name>`` for the
    parallel functions.

    Traces, HLO metadata and profiles then show ``blocksparse_jax.sparse_block_gemv``
    (and friends) around the operations each public function emits.
    """
    package = (
        "blocksparse_jax.parallel"
        if fn.__module__.startswith("blocksparse_jax.parallel.")
        else "blocksparse_jax"
    )
    scope = f"{package}.{fn.__name__}"

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.named_scope(scope):
            return fn(*args, **kwargs)

    return wrapper
