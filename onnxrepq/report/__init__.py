"""Quantization reports."""
