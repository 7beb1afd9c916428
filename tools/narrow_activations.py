"""Which activation quantizers cannot take a narrower grid: a probe for below-8-bit activations.

Usage: python tools/narrow_activations.py [--models rec] [--bits 6] [--groups 10] [--out DIR]

Quantizes each model with the fast recipe at 8 bits, then re-grids groups of its activation
quantizers (consecutive in graph order) to 2^bits levels over the same real range, held in the
uint8 container by an integer Clip after the QuantizeLinear, exactly as ``--abits`` emits them,
and scores each variant on held-out data: the group whose narrowing costs most is where a 6-bit
activation grid breaks the model. The range is not searched again for the narrow grid, so the
probe ranks places; it does not predict what ``--abits`` reaches. Writes DIR/narrow_activations.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxrepq  # noqa: E402
from onnxrepq.config import QuantConfig  # noqa: E402
from tools.bench_lib import methods, tasks  # noqa: E402
from tools.pareto import run, sqnr_db  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="rec", help="comma-separated substrings of task names (rec, cls, zoo/...)")
    parser.add_argument("--bits", type=int, default=6, help="activation width probed (2 to 7)")
    parser.add_argument("--groups", type=int, default=10, help="consecutive groups of activation quantizers")
    parser.add_argument("--eval", type=int, default=200, help="held-out samples scored")
    parser.add_argument("--out", default="narrow_activations", help="folder for narrow_activations.md")
    return parser.parse_args(argv)


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes on computed tensors with a scalar scale and a uint8 zero point, in graph order."""
    constants = {init.name: init for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type == "QuantizeLinear" and len(node.input) == 3
            and node.input[0] not in constants and node.input[2] in constants
            and constants[node.input[2]].data_type == onnx.TensorProto.UINT8
            and numpy_helper.to_array(constants[node.input[1]]).size == 1]


def narrowed(model: onnx.ModelProto, names: set[str], bits: int) -> onnx.ModelProto:
    """``model`` with the quantizers named re-gridded to 2^bits levels over their 8-bit real range."""
    model = copy.deepcopy(model)
    constants = {init.name: init for init in model.graph.initializer}
    top = 2 ** bits - 1
    nodes, readers = list(model.graph.node), {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rebuilt = []
    for node in nodes:
        rebuilt.append(node)
        if node.op_type != "QuantizeLinear" or node.name not in names:
            continue
        scale = float(numpy_helper.to_array(constants[node.input[1]]).reshape(()))
        zero = int(numpy_helper.to_array(constants[node.input[2]]).reshape(()))
        low, high = -scale * zero, scale * (255 - zero)
        narrow_scale = (high - low) / top
        narrow_zero = int(np.clip(round(-low / narrow_scale), 0, top))
        base = f"{node.name}__narrow"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(narrow_scale, np.float32), f"{base}_scale"),
            numpy_helper.from_array(np.array(narrow_zero, np.uint8), f"{base}_zero_point"),
            numpy_helper.from_array(np.array(0, np.uint8), f"{base}_qmin"),
            numpy_helper.from_array(np.array(top, np.uint8), f"{base}_qmax")])
        quantized = node.output[0]
        dequantizers = [r for r in readers.get(quantized, []) if r.op_type == "DequantizeLinear"]
        node.input[1], node.input[2] = f"{base}_scale", f"{base}_zero_point"
        rebuilt.append(helper.make_node("Clip", [quantized, f"{base}_qmin", f"{base}_qmax"], [f"{base}_clipped"],
                                        name=f"{base}_clip"))
        for reader in dequantizers:
            reader.input[0], reader.input[1], reader.input[2] = f"{base}_clipped", f"{base}_scale", f"{base}_zero_point"
    del model.graph.node[:]
    model.graph.node.extend(rebuilt)
    return model


def probe(task: tasks.Task, bits: int, groups: int) -> list[dict]:
    """One row for the 8-bit model, one with every quantizer narrowed, one per group."""
    model = onnxrepq.quantize(task.model_path, task.calibration, QuantConfig(fast=True))
    reference = run(onnx.load(task.model_path), task.eval_inputs, task.batch_size)

    def row(label: str, variant: onnx.ModelProto) -> dict:
        outputs = run(variant, task.eval_inputs, task.batch_size)
        return {"narrowed": label, **task.score(outputs, reference), "sqnr_db": sqnr_db(reference, outputs)}

    quantizers = activation_quantizers(model)
    names = [node.name for node in quantizers]
    rows = [row("none (8 bits)", model), row(f"all {len(names)}", narrowed(model, set(names), bits))]
    for group in np.array_split(np.arange(len(names)), min(groups, len(names))):
        first, last = quantizers[group[0]].input[0], quantizers[group[-1]].input[0]
        rows.append(row(f"{group[0]}..{group[-1]} ({first} .. {last})",
                        narrowed(model, {names[i] for i in group}, bits)))
    return rows


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    sizes = tasks.Sizes(rec_eval=arguments.eval, cls_eval=arguments.eval, zoo_eval=arguments.eval)
    zoo, _ = tasks.zoo_tasks(methods.REPO_ROOT, sizes)
    candidates = [t for t in (tasks.rec_task(sizes), tasks.cls_task(sizes)) if t] + zoo
    wanted = [w for w in arguments.models.split(",") if w]
    selected = [t for t in candidates if any(w in t.name for w in wanted)]
    if not selected:
        raise SystemExit(f"no task matches {arguments.models!r}")
    lines = ["# Activation quantizers narrowed to "
             f"{arguments.bits} bits, group by group (fast recipe, 8-bit ranges kept)", "",
             f"`python tools/narrow_activations.py --models {arguments.models} --bits {arguments.bits}"
             f" --groups {arguments.groups} --eval {arguments.eval}`", ""]
    for task in selected:
        rows = probe(task, arguments.bits, arguments.groups)
        lines += [f"## {task.name}", "", f"| quantizers narrowed | {task.primary_metric} | SQNR dB |", "|---|---|---|"]
        lines += [f"| {r['narrowed']} | {r[task.primary_metric]:.4f} | {r['sqnr_db']:.2f} |" for r in rows] + [""]
        print("\n".join(lines[-len(rows) - 3:]), flush=True)
    os.makedirs(arguments.out, exist_ok=True)
    with open(os.path.join(arguments.out, "narrow_activations.md"), "w") as handle:
        handle.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
