"""Benchmark definitions and results (a package so that the microbenchmarks share bench/conftest.py)."""
