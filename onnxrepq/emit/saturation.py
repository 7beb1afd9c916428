"""When onnxruntime CPU's u8 x s8 kernels saturate, and the weight grid that avoids it.

On x86 without VNNI (AVX2, AVX-512 before Cascade Lake, most AMD before Zen 4), MLAS multiplies
u8 activations by s8 weights with ``vpmaddubsw``, which adds two adjacent products into an int16
and saturates: 255 * 127 * 2 = 64770 does not fit in 32767. The result is silently wrong, not
slow. Measured on an AMD EPYC (AVX2 only) with onnxruntime 1.32: a small mobile net whose QDQ
graph reads 30.4 dB output SQNR unoptimized reads 18.8 dB once onnxruntime fuses it into
QLinearConv; with 7-bit weights both read 28.1 dB. onnxruntime's own quantizer calls the remedy
``reduce_range``; here it is the weight range: "reduced" keeps |q| * 255 * 2 within int16,
"paired" (search/weight_pairs.py) keeps the full grid and limits only the pairs that add up, and
"unsigned" keeps the full grid and stores it as uint8 with zero point 128: MLAS then takes its
u8 x u8 kernels, which widen to int16 before multiplying and add in int32, exact at any weight
(tests/emit/test_weight_pairs.py). They are slower than u8 x s8: 1.25x the latency on PP-OCRv4 rec,
1.3x on det, 1.7x on the zoo's RepVGG (BENCHMARKS.md, session 14), so "auto" does not pick them.
VNNI (``vpdpbusd``) accumulates in int32 and needs nothing of the sort, and neither do ARM's
dot-product kernels or TensorRT.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

from ..search.quant_grid import IntGrid

_INT16_MAX = 32767
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@lru_cache(maxsize=1)
def host_saturates_u8s8() -> bool:
    """True on x86 hosts whose int8 GEMM pairs products in int16; unknown x86 counts as saturating."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        return True
    return not any(flag in flags.split() for flag in _VNNI_FLAGS)


def pairs_overflow(activation: IntGrid, weight: IntGrid) -> bool:
    """Whether two adjacent activation x weight products can leave int16 (unsigned activations only)."""
    if activation.qmin < 0:
        return False   # s8 x s8 takes another MLAS path without the int16 pair sum
    return 2 * activation.qmax * max(weight.qmax, -weight.qmin) > _INT16_MAX


def reduced_weight_grid(activation: IntGrid, weight: IntGrid) -> IntGrid:
    """The widest symmetric grid inside ``weight`` whose products stay clear of the int16 pairs."""
    reach = min(max(weight.qmax, -weight.qmin), _INT16_MAX // (2 * max(activation.qmax, 1)))
    return IntGrid(-reach, reach, weight.dtype)


def weight_zero_point(depthwise: bool, weight: IntGrid, mode: str, activation: IntGrid) -> int:
    """128 where the layer's weights are stored as uint8 ("unsigned" and products that would
    saturate u8 x s8 pairs), else 0. Depthwise convs add in int32 on any host and keep int8."""
    if mode != "unsigned" or not pairs_overflow(activation, weight) or depthwise:
        return 0
    return 128


def pair_sum_limit(activation: IntGrid) -> int:
    """The most |a| + |b| two same-sign weights of a pair may reach with activations up to qmax."""
    return _INT16_MAX // max(activation.qmax, 1)


def resolve_weight_range(mode: str, target_saturates: bool) -> str:
    """"full", "reduced" or "paired" for a weight-range setting; "auto" asks the host, since the
    model usually runs where it is quantized. It takes "reduced" where the host saturates: "paired"
    gives the weights a bit back (+5 dB weight SQNR on PP-OCRv4 rec) but not the outputs (rec and
    det within the seed noise with reconstruction, rec -3 dB with ``--fast``; BENCHMARKS.md)."""
    if mode == "auto":
        return "reduced" if target_saturates and host_saturates_u8s8() else "full"
    return mode
