"""Quantize a synthetic model past protobuf's 2 GiB limit end to end and report what it cost.

    python tools/large_model.py                      # 9 MatMul layers of 8192 x 8192: 2.4 GB of weights
    python tools/large_model.py --hidden 256 --layers 3 --folder /tmp/small   # seconds, for a smoke test

The float model is written with external data (weights beside the graph, as such models ship),
quantized by the CLI in a child process, and the result is loaded in onnxruntime and compared with
the float model. It prints wall time, the child's peak RSS and the file sizes.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper


@dataclass(frozen=True)
class LargeModelResult:
    weight_bytes: int
    input_bytes: int
    output_bytes: int
    output_files: list[str]
    wall_s: float
    peak_rss_mb: float
    sqnr_db: float


def build_model(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """x [batch, hidden] -> (MatMul -> Add -> Relu) x layers, weights written straight to one data file
    so that building a 2 GB model never holds it in memory twice."""
    rng = np.random.default_rng(seed)
    nodes, initializers, current = [], [], "x"
    with open(folder / "model.onnx.data", "wb") as data:
        for layer in range(layers):
            weight = (rng.standard_normal((hidden, hidden), dtype=np.float32) * np.sqrt(2.0 / hidden)).astype(
                np.float32)
            initializers.append(_external(f"w{layer}", weight, data))
            del weight
            bias = (0.01 * rng.standard_normal(hidden)).astype(np.float32)
            initializers.append(onnx.numpy_helper.from_array(bias, f"b{layer}"))
            last = layer == layers - 1
            nodes += [helper.make_node("MatMul", [current, f"w{layer}"], [f"m{layer}"]),
                      helper.make_node("Add", [f"m{layer}", f"b{layer}"], ["y" if last else f"a{layer}"])]
            if not last:
                nodes.append(helper.make_node("Relu", [f"a{layer}"], [f"r{layer}"]))
                current = f"r{layer}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", hidden])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", hidden])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def _external(name: str, array: np.ndarray, data) -> onnx.TensorProto:
    offset = data.tell()
    data.write(array.tobytes())
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def quantize_in_child(model: Path, calib: Path, output: Path, extra_args: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `onnxrepq quantize` run as a child process."""
    command = [sys.executable, "-m", "onnxrepq.cli", "quantize", str(model), "-o", str(output),
               "--calib", str(calib), "--quiet", *extra_args]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    # ru_maxrss of waited-for children is in KiB on Linux; this process waits for no other child.
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def compare(float_model: Path, quant_model: Path, feeds: np.ndarray) -> float:
    import onnxruntime as ort

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": feeds})[0]

    reference = run(float_model).astype(np.float64)
    noise = np.sum((reference - run(quant_model)) ** 2)
    return float(10 * np.log10(np.sum(reference ** 2) / max(noise, 1e-30)))


def run(folder: Path, hidden: int, layers: int, samples: int, extra_args: list[str]) -> LargeModelResult:
    model = build_model(folder, hidden, layers)
    rng = np.random.default_rng(1)
    np.save(folder / "calib.npy", rng.standard_normal((samples, hidden), dtype=np.float32))
    output = folder / "quantized.onnx"
    wall, peak = quantize_in_child(model, folder / "calib.npy", output, extra_args)
    onnx.checker.check_model(str(output))  # by path: the checker cannot take a proto past 2 GiB
    sqnr = compare(model, output, rng.standard_normal((4, hidden), dtype=np.float32))
    outputs = sorted(p.name for p in folder.iterdir() if p.name.startswith("quantized.onnx"))
    return LargeModelResult(
        weight_bytes=4 * hidden * hidden * layers,
        input_bytes=sum((folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data")),
        output_bytes=sum((folder / name).stat().st_size for name in outputs),
        output_files=outputs, wall_s=wall, peak_rss_mb=peak, sqnr_db=sqnr)


def report(result: LargeModelResult, hidden: int, layers: int) -> str:
    return "\n".join([
        f"model: {layers} x MatMul {hidden}x{hidden} float32, weights {result.weight_bytes / 1e9:.2f} GB",
        f"input on disk: {result.input_bytes / 1e9:.3f} GB (graph + external data)",
        f"output on disk: {result.output_bytes / 1e9:.3f} GB in {', '.join(result.output_files)}",
        f"quantize wall time: {result.wall_s:.1f} s",
        f"quantize peak RSS: {result.peak_rss_mb:.0f} MB ({result.peak_rss_mb * 2**20 / result.weight_bytes:.2f}x"
        " the float weights)",
        f"output SQNR vs float: {result.sqnr_db:.2f} dB",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--samples", type=int, default=16, help="calibration samples")
    parser.add_argument("--folder", help="work folder (default: a temporary one, removed afterwards)")
    parser.add_argument("cli_args", nargs="*", help="extra arguments for onnxrepq quantize (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxrepq-large-") as scratch:
        folder = Path(args.folder or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        result = run(folder, args.hidden, args.layers, args.samples, args.cli_args)
    print(report(result, args.hidden, args.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
