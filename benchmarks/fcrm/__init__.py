"""Benchmarks and experiments of fcrm (run with `trl-video bench fcrm.<name>` from a checkout)."""
