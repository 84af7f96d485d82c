"""Benchmarks and experiments of assets (run with `trl-video bench assets.<name>` from a checkout)."""
