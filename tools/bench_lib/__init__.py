"""Pieces of tools/bench.py: metrics, tasks, quantizer runners, timing and the report."""
