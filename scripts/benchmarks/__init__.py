"""Benchmarks for ``scripts/bench``: each prints its figures beside the primitives beneath."""
