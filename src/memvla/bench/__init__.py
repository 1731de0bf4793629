"""Benchmarks run by ``memvla bench NAME``: scripts that print measured figures."""
