"""The public surface: quantize(), fuse(), inspect(). The CLI only parses arguments and calls these."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .calibrate.collect import collect_histograms, observe
from .calibrate.data import calibration_set, input_specs
from .calibrate.runner import session_for
from .config import QuantConfig
from .emit.finalize import FoldWeightQuantizers, QuantizeBias
from .emit.placement import plan_quantization
from .emit.targets import TARGETS
from .errors import ModelError
from .graph.io import ModelLike, load_model
from .passes.base import PassRecord, run_passes
from .passes.cleanup import Cleanup
from .passes.constants import ConstantsToInitializers
from .passes.fold_affine import FoldAffineIntoConv
from .passes.fold_constants import FoldConstants
from .passes.fuse_branches import FuseParallelBranches
from .passes.fuse_hardswish import FuseHardSwish
from .passes.insert_qdq import ActivationQuant, InsertQDQ, WeightQuant
from .passes.names import NameNodes
from .passes.opset import UpgradeOpset
from .progress import Progress
from .search.criteria import activation_range, weight_scales
from .search.quant_grid import activation_grid, affine_params, symmetric_params, weight_grid


@dataclass
class QuantizeResult:
    """What quantize() learned on the way, for the report and the model metadata."""

    model: onnx.ModelProto
    passes: list[PassRecord] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0
    calibration_hash: str = ""


def normalization_passes(config: Optional[QuantConfig] = None) -> list:
    """Load-time passes that make an exported graph quantizable without the user's help.

    Branch fusion runs before the affine folding so that a BN inside a branch is fused with its
    group rather than folded into one branch's conv first (either is exact; the group is faster).
    """
    config = config or QuantConfig()
    fusion = [FuseParallelBranches()] if config.fuse_branches else []
    return [
        ConstantsToInitializers(),
        UpgradeOpset(),
        FoldConstants(),
        Cleanup(),
        *fusion,
        FoldAffineIntoConv(),
        FuseHardSwish(),
        Cleanup(),
        NameNodes(),
    ]


def normalize(model: ModelLike, config: Optional[QuantConfig] = None) -> tuple[gs.Graph, list[PassRecord]]:
    proto = load_model(model)
    graph = gs.import_onnx(proto)
    return run_passes(graph, normalization_passes(config))


def fuse(model: ModelLike) -> onnx.ModelProto:
    """The float deploy form: branches fused, BN and affine ops folded, nothing quantized."""
    graph, _ = normalize(model)
    return _export(graph)


@dataclass
class Inspection:
    inputs: list[tuple[str, str, list]]
    outputs: list[tuple[str, str, list]]
    opset: int
    op_counts: dict[str, int]
    normalized_op_counts: dict[str, int]
    passes: list[PassRecord]
    quantizable: list[tuple[str, str]]
    left_float: dict[str, str]


def inspect(model: ModelLike, config: Optional[QuantConfig] = None) -> Inspection:
    """What the pipeline would do to a model, without calibration data."""
    config = config or QuantConfig()
    proto = load_model(model)
    graph, records = normalize(proto, config)
    float_tensors = {name for name, tensor in graph.tensors().items()
                     if not isinstance(tensor, gs.Constant) and tensor.dtype in (None, np.float32)}
    plan = plan_quantization(graph, TARGETS[config.target], float_tensors, config.keep_float)
    nodes = {node.name: node for node in graph.nodes}
    return Inspection(
        inputs=[_describe(value) for value in proto.graph.input
                if value.name not in {i.name for i in proto.graph.initializer}],
        outputs=[_describe(value) for value in proto.graph.output],
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        op_counts=_count_ops(n.op_type for n in proto.graph.node),
        normalized_op_counts=_count_ops(n.op for n in graph.nodes),
        passes=records,
        quantizable=[(slot.node, nodes[slot.node].op) for slot in plan.weights],
        left_float=plan.left_float,
    )


def _describe(value: onnx.ValueInfoProto) -> tuple[str, str, list]:
    tensor_type = value.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.dim_value > 0 else "?") for d in tensor_type.shape.dim]
    return value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name if tensor_type.elem_type \
        else "?", dims


def _count_ops(ops) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def quantize(model: ModelLike, calibration: Any, config: Optional[QuantConfig] = None,
             progress: bool = False) -> onnx.ModelProto:
    """Quantize ``model`` (path or ModelProto) with ``calibration`` data; returns the QDQ model."""
    return quantize_with_result(model, calibration, config, progress).model


def quantize_with_result(model: ModelLike, calibration: Any, config: Optional[QuantConfig] = None,
                         progress: bool = False) -> QuantizeResult:
    config = config or QuantConfig()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    graph, records = normalize(model, config)
    normalized = _export(graph)
    timings["normalize"] = time.perf_counter() - started

    specs = input_specs(session_for(normalized))
    calibration_data = calibration_set(calibration, specs, config.calibration.max_samples)
    first = next(iter(calibration_data))
    observed = observe(normalized, first)
    float_tensors = {name for name, value in observed.items() if value.dtype == np.float32}
    # observe() returns node outputs only; the graph inputs feed the first conv and are float too
    float_tensors |= {spec.name for spec in specs if spec.dtype == np.float32}
    rules = TARGETS[config.target]
    plan = plan_quantization(graph, rules, float_tensors, config.keep_float)

    leaders = sorted({plan.leader(name) for name in plan.activations}, key=plan.activations.index)
    started = time.perf_counter()
    with Progress("calibrating", enabled=progress) as bar:
        histograms = collect_histograms(normalized, leaders, calibration_data, config.calibration,
                                        seed=config.seed, progress=bar.update)
    timings["calibrate"] = time.perf_counter() - started

    started = time.perf_counter()
    grid = activation_grid(config.activation_bits, rules.signed_activations)
    activation_params: dict[str, ActivationQuant] = {}
    for name in leaders:
        lo, hi = activation_range(histograms[name], config.scale_search, grid, config.percentile,
                                  symmetric=rules.symmetric_activations)
        scale, zero_point = (symmetric_params(max(-lo, hi), grid) if rules.symmetric_activations
                             else affine_params(lo, hi, grid))
        activation_params[name] = ActivationQuant(scale, zero_point, grid)
    nodes = {node.name: node for node in graph.nodes}
    wgrid = weight_grid(config.weight_bits)
    weight_params = {}
    for slot in plan.weights:
        weight = nodes[slot.node].inputs[slot.input_index].values
        weight_params[slot.node] = WeightQuant(weight_scales(weight, slot.axis, config.weight_scale_search, wgrid),
                                               slot.axis, wgrid)
    timings["search"] = time.perf_counter() - started

    layers = _layer_rows(graph, plan, weight_params, activation_params)
    graph, emitted = run_passes(graph, [InsertQDQ(plan, activation_params, weight_params),
                                        FoldWeightQuantizers(), QuantizeBias()])
    records += emitted
    result = QuantizeResult(_export(graph), records, layers, timings, calibration_data.count(),
                            _hash_calibration(calibration_data))
    _write_metadata(result, config)
    return result


def _layer_rows(graph, plan, weight_params, activation_params) -> list[dict[str, Any]]:
    rows = []
    nodes = {node.name: node for node in graph.nodes}
    for slot in plan.weights:
        node = nodes[slot.node]
        quant = weight_params[slot.node]
        rows.append({
            "name": node.name, "op": node.op,
            "weight_bits": int(np.log2(quant.grid.qmax + 1)) + 1,
            "input": node.inputs[0].name,
            "input_scale": (activation_params[plan.leader(node.inputs[0].name)].scale
                            if plan.leader(node.inputs[0].name) in activation_params else None),
            "weight_absmax": float(np.abs(node.inputs[slot.input_index].values).max()),
        })
    for name, reason in plan.left_float.items():
        rows.append({"name": name, "op": nodes[name].op if name in nodes else "?", "float": reason})
    return rows


def _hash_calibration(data) -> str:
    digest = hashlib.sha256()
    for feed in data:
        for key in sorted(feed):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(feed[key]).tobytes())
    return digest.hexdigest()[:16]


def _write_metadata(result: QuantizeResult, config: QuantConfig) -> None:
    entries = {
        "onnxrepq.version": __version__,
        "onnxrepq.recipe": json.dumps(asdict(config), sort_keys=True),
        "onnxrepq.calibration_sha256": result.calibration_hash,
        "onnxrepq.calibration_samples": str(result.calibration_samples),
        "onnxrepq.layers": json.dumps([{k: r[k] for k in ("name", "op") if k in r} | (
            {"weight_bits": r["weight_bits"]} if "weight_bits" in r else {"float": r.get("float")})
            for r in result.layers], sort_keys=True),
    }
    props = result.model.metadata_props
    existing = {p.key: p for p in props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            props.add(key=key, value=value)


def _export(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    # graphsurgeon writes value_info for every typed tensor, shapes or not; the checker wants
    # a shape on each, and onnxruntime infers them anyway.
    kept = [vi for vi in model.graph.value_info if vi.type.tensor_type.HasField("shape")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise RuntimeError(f"produced an invalid model: {str(exc).splitlines()[0][:200]}") from exc
    return model
