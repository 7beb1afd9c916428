"""Calibration arrays on disk: one file per model, read back identically by every quantizer.

onnxrepq's CLI takes `.npy` (single-input models, samples on axis 0) or `.npz` (one array per input);
the onnxruntime baseline reads the same file through `ArrayReader`, one sample per batch.
"""
import numpy as np


def write_calibration(arrays: dict[str, np.ndarray], path_stem: str) -> str:
    """Write `.npy` when there is one input, else `.npz`; returns the path written."""
    if len(arrays) == 1:
        path = path_stem + ".npy"
        np.save(path, next(iter(arrays.values())))
    else:
        path = path_stem + ".npz"
        np.savez(path, **arrays)
    return path


def read_calibration(path: str, input_names: list[str]) -> dict[str, np.ndarray]:
    if path.endswith(".npz"):
        with np.load(path) as archive:
            return {name: archive[name] for name in input_names}
    return {input_names[0]: np.load(path)}
