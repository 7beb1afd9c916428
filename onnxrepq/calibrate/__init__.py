"""Calibration: data sources and streaming statistics gathered with onnxruntime."""
