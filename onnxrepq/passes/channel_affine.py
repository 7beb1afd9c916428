"""The QPR affine (RepAPQ's Quantization Protecting Reparameterization) and its export-time fold.

Every conv made by ``FuseParallelBranches`` carries a per-output-channel affine y = conv(x)*γ + β,
identity at first. Calibration may train γ and β; at export they fold into the per-channel weight
scale and the bias, so the integer weights q stay exactly as quantized:
    w' = q * (s * γ),  b' = γ * b + β.
The affine is kept beside the graph (``BranchGroup.affine``), never as an attribute on the node:
the ONNX graph must stay valid for every runtime.
"""
from __future__ import annotations

import numpy as np

from .fold_affine import ChannelAffine


def identity_affine(channels: int) -> ChannelAffine:
    return ChannelAffine(np.ones(channels, np.float32), np.zeros(channels, np.float32))


def fold_channel_affine(
    weight_scale: np.ndarray, bias: np.ndarray, affine: ChannelAffine
) -> tuple[np.ndarray, np.ndarray]:
    """Return (weight_scale * γ, γ * bias + β) for per-output-channel (or scalar) weight scales.

    γ must be positive: a quantization scale cannot change sign, and a negative γ would need the
    integer weights negated, which is exactly what this fold promises not to do.
    """
    gamma = np.asarray(affine.scale, np.float64)
    if np.any(gamma <= 0):
        raise ValueError("QPR affine scale must be positive to fold into a quantization scale")
    channels = gamma.shape[0]
    scale = np.broadcast_to(np.asarray(weight_scale, np.float64).reshape(-1), (channels,))
    new_scale = (scale * gamma).astype(np.asarray(weight_scale).dtype)
    new_bias = (gamma * np.asarray(bias, np.float64) + np.asarray(affine.shift, np.float64))
    return new_scale, new_bias.astype(np.asarray(bias).dtype)
