"""Benchmarks and experiments of reward-forcing (run with `trl-video bench reward_forcing.<name>` from a checkout)."""
