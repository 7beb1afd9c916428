"""Block partitioning, the torch block executor and the learned quantizers."""
from .executor import GraphModule, run_numpy
from .fake_quant import INT_RANGES, IntRange, dequantize, fake_quantize, quantize
from .ops import UnsupportedOpError
from .partition import Block, Stage, partition

__all__ = ["Block", "GraphModule", "INT_RANGES", "IntRange", "Stage", "UnsupportedOpError", "dequantize",
           "fake_quantize", "partition", "quantize", "run_numpy"]
