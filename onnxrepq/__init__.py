"""onnxrepq: post-training quantization of ONNX graphs that survives re-parameterized networks."""
from .config import CalibrationConfig, QuantConfig
from .errors import UserError

__version__ = "0.1.0"

__all__ = ["quantize", "fuse", "QuantConfig", "CalibrationConfig", "UserError", "__version__"]


def __getattr__(name):
    # The API pulls in onnxruntime and torch; import it only when it is used.
    if name in ("quantize", "fuse", "inspect"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)
