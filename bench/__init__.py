"""Benchmarks of the VPN data path on the simulated site (run as root: python -m bench.run)."""
