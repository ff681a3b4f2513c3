"""Benchmark suites run by ``python -m kcengine bench`` (and by scripts under bench/)."""
