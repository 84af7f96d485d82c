"""Benchmarks of vidrl-plugin-rewards (run with `trl-video bench rewards.<name>` from a checkout)."""
