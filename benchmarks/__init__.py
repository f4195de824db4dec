"""Benchmark scripts of ESC-SR (see benchmarks/README.md); not part of the installed package."""
