"""Benchmarks: scripts that print figures (run with `python -m benchmarks.<name>`); not part of the test suite."""
