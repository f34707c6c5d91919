"""Benchmarks and load runs (make bench, make load). See docs/performance.md."""
