"""Benchmark harness and the model zoo used by tests and benchmarks (dev tools: the zoo needs torch)."""
