"""Benchmarks of trio-cloudhub (see README.md)."""
