"""Benchmarks of blocksparse_jax; run them as modules (``python3 -m benchmarks.run``).

Results, goals, how to run and notes on the machine: ``benchmarks/README.md``.
"""
