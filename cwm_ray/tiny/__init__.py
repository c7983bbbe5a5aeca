"""Tiny randomly initialised checkpoints of real model families, built locally for tests and benchmarks."""
