"""Benchmarks of t3s_kernels (not installed with the package; see README.md).

A package so that pytest imports `benchmarks.conftest` under its own name and
it never shadows `tests/conftest.py` when both folders are collected at once.
"""
