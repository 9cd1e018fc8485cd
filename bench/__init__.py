"""Benchmarks: each figure is the system against a bare baseline, measured side by side."""
