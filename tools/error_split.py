"""Split a quantized model's output error into weights, activation rounding and activation clipping.

Usage: python tools/error_split.py TASK [--seed N] [FIELD=VALUE ...]   (TASK and FIELD as in tools/variant.py)

Quantizes TASK's model once, then scores four graphs against FP32 on the bench's evaluation data,
all run by onnxruntime with graph optimization off (so every Q/DQ computes as written):
- int8: the quantized model;
- activations only: its weights put back to the float model's (bias kept as stored);
- weights only: its activation QuantizeLinear/DequantizeLinear pairs replaced by a Clip to the grid's
  range (rounding gone, clipping kept: hard gates rely on that saturation);
- clipping only: both of the above.
Why: which error to work on next. On PP-OCRv4 rec the [-64, 64] weight grid cost more than the
activations, and with full-range weights activation rounding was what remained (BENCHMARKS.md, session 11).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx_graphsurgeon as gs  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from onnxrepq.api import quantize_with_result  # noqa: E402
from onnxrepq.config import QuantConfig, ReconstructionConfig  # noqa: E402
from tools.bench_lib import metrics, runtime, tasks  # noqa: E402
from tools.variant import TASKS, parse_changes  # noqa: E402


def float_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Node name -> its constant second input (the weight) in the float model."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {node.name: initializers[node.input[1]] for node in model.graph.node
            if len(node.input) > 1 and node.input[1] in initializers}


def with_float_weights(graph: gs.Graph, weights: dict[str, np.ndarray]) -> gs.Graph:
    for node in graph.nodes:
        source = node.inputs[1] if node.name in weights and len(node.inputs) > 1 else None
        if source is not None and source.inputs and source.inputs[0].op == "DequantizeLinear":
            node.inputs[1] = gs.Constant(f"{node.name}_float_weight", weights[node.name])
    return graph.cleanup()


def without_activation_rounding(graph: gs.Graph) -> gs.Graph:
    for quantizer in [n for n in graph.nodes if n.op == "QuantizeLinear" and not isinstance(n.inputs[0], gs.Constant)]:
        source, scale = quantizer.inputs[0], float(np.asarray(quantizer.inputs[1].values))
        zero_point = np.asarray(quantizer.inputs[2].values)
        info = np.iinfo(zero_point.dtype)
        bounds = [gs.Constant(f"{source.name}_split_{side}", np.array((edge - float(zero_point)) * scale, np.float32))
                  for side, edge in (("low", info.min), ("high", info.max))]
        clipped = gs.Variable(f"{source.name}_split_clipped", np.float32)
        graph.layer(op="Clip", inputs=[source, *bounds], outputs=[clipped])
        for dequantize in [n for n in quantizer.outputs[0].outputs if n.op == "DequantizeLinear"]:
            restored = dequantize.outputs[0]
            for consumer in list(restored.outputs):
                consumer.inputs = [clipped if t is restored else t for t in consumer.inputs]
            graph.outputs = [clipped if t is restored else t for t in graph.outputs]
    return graph.cleanup().toposort()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("changes", nargs="*", metavar="FIELD=VALUE")
    args = parser.parse_intermixed_args(argv)
    quant, rec = parse_changes(args.changes)
    task = TASKS[args.task](tasks.Sizes())
    if task is None:
        raise SystemExit(f"error_split: the {args.task} model is not installed (see README: the bench extra)")
    result = quantize_with_result(task.model_path, task.calibration,
                                  QuantConfig(seed=args.seed, reconstruction=ReconstructionConfig(**rec), **quant))
    weights = float_weights(result.float_model)

    def score(model) -> dict:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        source = model if isinstance(model, str) else model.SerializeToString()
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return runtime.run_batches(session, task.eval_inputs, task.batch_size)

    reference = score(task.model_path)
    graphs = {"int8": lambda: gs.import_onnx(result.model),
              "activations only": lambda: with_float_weights(gs.import_onnx(result.model), weights),
              "weights only": lambda: without_activation_rounding(gs.import_onnx(result.model)),
              "clipping only": lambda: with_float_weights(without_activation_rounding(gs.import_onnx(result.model)),
                                                          weights)}
    for name, build in graphs.items():
        output = score(gs.export_onnx(build()))
        row = {"task": args.task, "seed": args.seed, "changes": args.changes, "graph": name,
               "sqnr_db": round(float(metrics.sqnr_db(reference, output)), 2),
               **{key: round(float(value), 4) for key, value in task.score(output, reference).items()}}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
