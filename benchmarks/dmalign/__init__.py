"""Benchmarks and experiments of dmalign (run with `trl-video bench dmalign.<name>` from a checkout)."""
