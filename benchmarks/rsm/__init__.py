"""Benchmarks and experiments of rsm (run with `trl-video bench rsm.<name>` from a checkout)."""
