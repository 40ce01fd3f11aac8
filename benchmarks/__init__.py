"""Benchmarks against hand-written torch hooks (and nnsight, when installed): ``python -m benchmarks``."""
