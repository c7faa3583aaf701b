"""``python -m blocksparse_jax demo``: a large-vocabulary language model with ``h_softmax``.

Trains a next-token predictor on the Python standard library's own source
(about 2.8 million tokens, a vocabulary of about 34,000) twice - once with the
hierarchical softmax, once with an exact full softmax over the same vocabulary
- and reports the speed and the validation perplexity of both.  The entry
points are :func:`add_arguments` and :func:`run`; ``blocksparse_jax.__main__``
dispatches to them.
"""

from __future__ import annotations

from blocksparse_jax.demo._cli import DESCRIPTION, SUMMARY, add_arguments
from blocksparse_jax.demo._run import DemoError, run

__all__ = ["DESCRIPTION", "SUMMARY", "DemoError", "add_arguments", "run"]
