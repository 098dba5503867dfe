"""Benchmarks for the issues' figures; run them with `just bench` (see BENCHMARKS.md)."""
