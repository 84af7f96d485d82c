"""Benchmarks and experiments of velr (run with `trl-video bench velr.<name>` from a checkout)."""
