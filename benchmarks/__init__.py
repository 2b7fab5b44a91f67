"""Benchmarks of jaxstack: each module is a runnable program (``python -m benchmarks.<name>``)
that prints its result as JSON and records it under ``benchmarks/results/``; ``report.py``
makes the tables of docs/benchmarks.md from those records (see docs/benchmarks.md)."""
