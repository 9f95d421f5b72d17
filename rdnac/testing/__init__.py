"""Checkpoint generators for tests and benchmarks (rdnac's own code: no transformers).

`rdnac.testing.fp8` writes FP8 checkpoints in the layouts real ones use, from
a float checkpoint or from rdnac's deterministic RNG at realistic shapes.
"""
