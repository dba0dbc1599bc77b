"""Benchmarks of medfed: quality on real data and performance; `python -m benchmarks.run`."""
