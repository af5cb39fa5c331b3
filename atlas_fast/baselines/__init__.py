"""Baselines kept for tests and benchmarks only."""
