"""Benchmark harness: datasets, side-by-side runs, reports."""
