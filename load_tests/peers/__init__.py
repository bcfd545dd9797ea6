"""Peer servers benchmarked side by side with Iris (see load_tests/compare.py)."""
