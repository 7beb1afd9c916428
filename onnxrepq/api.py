"""The public surface: quantize(), fuse(), inspect(). The CLI only parses arguments and calls these."""
from __future__ import annotations

import hashlib
from collections import Counter
import itertools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .calibrate.channel_stats import ChannelStats, find_outliers, outlier_cover
from .calibrate.collect import collect_histograms, float_tensors
from .calibrate.data import calibration_set, input_specs
from .calibrate.images import ImageFolder, is_image_folder
from .config import BiasCorrectionConfig, QuantConfig
from .emit.bias_correction import CorrectBias
from .emit.codebook import ClusterWeights, EmitCodebookWeights, build_codebooks
from .emit.constant_operands import QuantizeConstantOperands
from .emit.finalize import FoldWeightQuantizers, QuantizeBias
from .emit.int4_matmul import Int4Weight, StoreInt4Weights, pack_int4_initializers, storage_label, weight_only_int4
from .emit.redundant_clips import DropRedundantClips
from .emit.placement import plan_quantization, relead
from .emit.targets import TARGETS, TargetRules
from .graph.io import ModelLike, check_model, load_model
from .passes.base import PassRecord, run_passes
from .passes.cleanup import Cleanup
from .passes.constants import ConstantsToInitializers
from .passes.fold_affine import FoldAffineIntoConv
from .passes.equalize import EqualizeConfig, EqualizeCrossLayer, channel_extremes, equalization_pairs
from .passes.fold_constants import FoldConstants
from .passes.fuse_branches import FuseParallelBranches
from .passes.fuse_hardswish import FuseHardSwish
from .passes.hard_gates import HardGatesAsConv
from .passes.insert_qdq import ActivationQuant, InsertQDQ, WeightQuant
from .passes.names import NameNodes
from .passes.opset import UpgradeOpset
from .progress import Progress
from .reconstruct.learn import ReconstructBlocks
from .search.criteria import activation_range, weight_scales
from .search.mixed_precision import MixedPrecisionResult, choose_bit_widths, sensitivity_runs
from .emit.saturation import pairs_overflow, reduced_weight_grid, resolve_weight_range, weight_zero_point
from .emit.weight_pairs import KeepWeightPairs, is_depthwise, pair_limit_for
from .search.weight_pairs import PairLimit
from .search.quant_grid import IntGrid, activation_grid, affine_params, symmetric_params, weight_grid


@dataclass
class QuantizeResult:
    """What quantize() learned on the way, for the report and the model metadata."""

    model: onnx.ModelProto
    passes: list[PassRecord] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_samples: int = 0
    calibration_hash: str = ""
    # What the user should hear about: the recipe ran differently from what was asked, and why.
    notices: list[str] = field(default_factory=list)
    # For the report: the float model the quantized one is compared with, and the data it was calibrated on.
    float_model: Optional[onnx.ModelProto] = field(default=None, repr=False)
    calibration_data: Any = field(default=None, repr=False)


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
        # HardSwish first: its "/ 6" is a scale the affine folding would otherwise take into
        # the next conv, leaving a pattern nobody recognises.
        FuseHardSwish(),
        FoldAffineIntoConv(),
        Cleanup(),
        NameNodes(),
    ]


def target_passes(rules: TargetRules) -> list:
    """Float rewrites, exact in float, that give the target runtime integer kernels where it has none."""
    return [HardGatesAsConv()] if rules.hard_gates_as_conv else []


def normalize(model: ModelLike, config: Optional[QuantConfig] = None) -> tuple[gs.Graph, list[PassRecord]]:
    """The normalized float graph; given a config (a quantization is planned), also shaped for its target."""
    proto = load_model(model)
    graph = gs.import_onnx(proto)
    passes = normalization_passes(config) + (target_passes(TARGETS[config.target]) if config is not None else [])
    return run_passes(graph, passes)


def equalize_on_data(graph: gs.Graph, normalized: onnx.ModelProto, calibration, samples: int = 64,
                     absorb_high_bias: bool = False) -> tuple[gs.Graph, onnx.ModelProto, PassRecord]:
    """Cross-layer equalization on the per-channel ranges of the tensors between conv pairs.

    It needs the normalized float model run on data, so it runs after ``normalize`` rather than
    inside it; ``samples`` feeds are enough for channel maxima (the range search sees them all).
    """
    between = [pair.second.inputs[0].name for pair in equalization_pairs(graph)]
    ranges, minima = channel_extremes(normalized, between, itertools.islice(iter(calibration), samples))
    config = EqualizeConfig(absorb_high_bias=absorb_high_bias)
    graph, (record,) = run_passes(graph, [EqualizeCrossLayer(config, ranges, minima)])
    return graph, _export(graph), record


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
    floats = {name for name, tensor in graph.tensors().items()
              if not isinstance(tensor, gs.Constant) and tensor.dtype in (None, np.float32)}
    plan = plan_quantization(graph, TARGETS[config.target], floats, config.float_patterns)
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

    specs = input_specs(normalized)
    if is_image_folder(calibration):
        calibration = ImageFolder(calibration, config.calibration.images, specs)
    calibration_data = calibration_set(calibration, specs, config.calibration.max_samples)
    if config.equalize:
        started = time.perf_counter()
        graph, normalized, record = equalize_on_data(graph, normalized, calibration_data,
                                                     absorb_high_bias=config.absorb_high_bias)
        records.append(record)
        timings["equalize"] = time.perf_counter() - started
    first = next(iter(calibration_data))
    rules = TARGETS[config.target]
    floats = float_tensors(normalized, first) | {spec.name for spec in specs if spec.dtype == np.float32}
    plan = plan_quantization(graph, rules, floats, config.float_patterns)

    leaders = sorted({plan.leader(name) for name in plan.activations}, key=plan.activations.index)
    started = time.perf_counter()
    channel_stats: dict[str, ChannelStats] = {}
    with Progress("calibrating", enabled=progress) as bar:
        histograms = collect_histograms(normalized, leaders, calibration_data, config.calibration,
                                        seed=config.seed, progress=bar.update, channel_stats=channel_stats)
    timings["calibrate"] = time.perf_counter() - started

    started = time.perf_counter()
    grid = activation_grid(config.activation_bits, rules.signed_activations)
    activation_params: dict[str, ActivationQuant] = {}
    methods = _activation_methods(graph, plan, config)
    moved_ranges: dict[str, tuple] = {}
    for name in leaders:
        lo, hi = activation_range(histograms[name], methods.get(name, config.scale_search), grid, config.percentile,
                                  symmetric=rules.symmetric_activations)
        cover = outlier_cover(channel_stats[name]) if config.outlier_aware_ranges and name in channel_stats else None
        if cover is not None:
            plain = (lo, hi)
            lo, hi = activation_range(histograms[name], methods.get(name, config.scale_search), grid,
                                      config.percentile, symmetric=rules.symmetric_activations, cover=cover)
            if (lo, hi) != plain:
                moved_ranges[name] = (plain, (lo, hi))
        scale, zero_point = (symmetric_params(max(-lo, hi), grid) if rules.symmetric_activations
                             else affine_params(lo, hi, grid))
        activation_params[name] = ActivationQuant(scale, zero_point, grid)
    nodes = {node.name: node for node in graph.nodes}
    weight_range = resolve_weight_range(config.weight_range, rules.u8s8_pair_saturation)

    def grid_for(bits: int, stored_signed: bool = False) -> IntGrid:
        """Every layer's grid at ``bits``; ``stored_signed``: for int8 storage whatever the range says."""
        full = weight_grid(bits)
        unlimited = weight_range == "full" or (weight_range == "unsigned" and not stored_signed)
        return full if unlimited or not pairs_overflow(grid, full) else reduced_weight_grid(grid, full)

    wgrid = grid_for(config.weight_bits)
    mixed = _mixed_precision(normalized, graph, plan, calibration_data, config, grid_for, progress)
    if mixed is not None:
        records.append(PassRecord("mixed_precision", True, [
            f"weights {mixed.size_mb:.3f} MB nominal, {mixed.bitops_g:.3f} G bit operations per sample"
            + ("" if mixed.met_budget else " (budget not reached: every layer at the lowest width)"),
            "bits per layer: " + ", ".join(f"{b} x{n}" for b, n in sorted(
                Counter(mixed.bits.values()).items(), reverse=True)),
            f"relative output error on the calibration samples: {mixed.joint_error:.4g} with the chosen widths,"
            f" {mixed.uniform_error:.4g} with all at {mixed.uniform_bits} bits"
            + (f" (uniform {mixed.uniform_bits}-bit kept)" if mixed.kept_uniform else "")
            + (f" (the knapsack's widths read {mixed.knapsack_error:.4g}: chosen with a pull of {mixed.pull:g}"
               " toward uniform)" if mixed.pull and not mixed.kept_uniform else "")]))
        timings["mixed_precision"] = mixed.seconds
    weight_params, widths, paired = {}, {}, {}
    for slot in plan.weights:
        node = nodes[slot.node]
        settings = config.for_node(node.name, node.op)
        widths[slot.node] = mixed.bits[slot.node] if mixed is not None else settings.weight_bits
        node_grid, pairs = _layer_weight_grid(node, slot, grid_for(widths[slot.node]), widths[slot.node],
                                              weight_range, grid)
        if pairs is not None:
            paired[slot.node] = (pairs, node_grid)
        weight_params[slot.node] = WeightQuant(
            weight_scales(node.inputs[slot.input_index].values, slot.axis, settings.weight_scale_search, node_grid,
                          pairs), slot.axis, node_grid,
            weight_zero_point(is_depthwise(node), node_grid, weight_range, grid))
    range_note = _weight_range_note(weight_params, widths, paired, config.weight_range, weight_range)
    if range_note:
        records.append(PassRecord("weight_range", True, [range_note]))
    int4: dict[str, Int4Weight] = {}
    if config.fast and not config.clustered_weights:
        before = plan
        graph, plan, int4 = weight_only_int4(graph, plan, widths, rules, floats, config, records)
        nodes = {node.name: node for node in graph.nodes}
        activation_params, histograms, methods, channel_stats, moved_ranges = (
            relead(found, before, plan) for found in (activation_params, histograms, methods, channel_stats,
                                                       moved_ranges))
    codebooks = (build_codebooks(graph, plan, weight_params, widths, grid_for(8, stored_signed=True))
                 if config.clustered_weights else {})   # codebook entries are int8 whatever the range
    timings["search"] = time.perf_counter() - started

    layers = _layer_rows(graph, plan, weight_params, activation_params, config, histograms, methods)
    for row in layers:
        if row["name"] in widths:
            row["nominal_bits"] = widths[row["name"]]   # what was asked; weight_bits is what the grid holds
        if row["name"] in codebooks:
            row.update(codebooks[row["name"]].as_row())
        if row["name"] in int4:
            row["weight_storage"] = storage_label(int4[row["name"]])
    _add_outliers(layers, channel_stats)
    for row in layers:
        if row.get("input_tensor") in moved_ranges:
            row["input_outlier_range"] = [[float(v) for v in r] for r in moved_ranges[row["input_tensor"]]]  # [plain, chosen]
    layer_grids = {slot.node: weight_params[slot.node].grid for slot in plan.weights}
    notices = []
    reconstruct = [] if config.fast else [ReconstructBlocks(normalized, list(calibration_data), wgrid,
                                                            config.reconstruction, config.seed, progress,
                                                            layer_grids, narrowest_bits=min(
                                                                config.activation_bits, *widths.values(), 8))]
    started = time.perf_counter()
    weight_inputs = {slot.node: slot.input_index for slot in plan.weights}
    clustering = [ClusterWeights(codebooks, weight_inputs)] if codebooks else []
    weight_params |= {name: WeightQuant(book.scale, book.axis, book.grid) for name, book in codebooks.items()}
    insert = InsertQDQ(replace(plan, weights=[s for s in plan.weights if s.node not in int4]), activation_params,
                       weight_params, rules.narrow_activation_clip)
    # guarded unless asked for by name: the user then wants the correction, not our judgement of it
    correction = BiasCorrectionConfig(guard=config.bias_correction is None)
    correct = [CorrectBias(normalized, calibration_data, correction, config.seed, progress,
                           reconstructed=bool(reconstruct))] if config.corrects_bias else []
    store_int4 = [StoreInt4Weights(int4)] if int4 else []
    paired = {name: held for name, held in paired.items() if name not in int4 and name not in codebooks}
    keep_pairs = [KeepWeightPairs(paired)] if paired else []
    constant_operands = [QuantizeConstantOperands(rules.int8_ops)] if rules.quantize_constant_operands else []
    graph, emitted = run_passes(graph, [*clustering, *store_int4, insert, *constant_operands, *reconstruct, *keep_pairs, *correct,
                                        DropRedundantClips(), FoldWeightQuantizers(),
                                        *([QuantizeBias()] if rules.int32_bias else []),
                                        *([EmitCodebookWeights(codebooks)] if codebooks else [])])
    timings["reconstruct_and_emit"] = time.perf_counter() - started
    records += emitted
    notices += [learner.unlearned_note() for learner in reconstruct if learner.unlearned]
    quantized = _export(graph)
    for store in store_int4:
        pack_int4_initializers(quantized, store.initializers)
    result = QuantizeResult(quantized, records, layers, timings, calibration_data.count(),
                            _hash_calibration(calibration_data), notices, normalized, calibration_data)
    _write_metadata(result, config)
    return result


def _layer_weight_grid(node: gs.Node, slot, reduced: IntGrid, bits: int, weight_range: str,
                       activation: IntGrid) -> tuple[IntGrid, Optional[PairLimit]]:
    """The grid one layer's weights get, and the pair limit that keeps it exact where one applies.

    ``reduced`` is the grid ``weight_range`` gives every layer at ``bits``; where it is narrower than
    the full grid only to keep int16 pairs clear, "paired" gives depthwise convs (summed in int32)
    the full grid, and GEMM layers the full grid with the pair limit.
    """
    full = weight_grid(bits)
    if weight_range != "paired" or reduced == full:
        return reduced, None
    if is_depthwise(node):
        return full, None
    pairs = pair_limit_for(node, slot.input_index, slot.axis, activation)
    return (full, pairs) if pairs is not None else (reduced, None)


def _weight_range_note(weight_params: dict, widths: dict, paired: dict, asked: str, weight_range: str) -> str:
    """What the weight range did, or "" where every layer has its full grid."""
    held = Counter((p.grid.qmin, p.grid.qmax) for name, p in weight_params.items()
                   if p.grid != weight_grid(widths[name]))
    unsigned = sum(1 for p in weight_params.values() if p.zero_point)
    if not held and not paired and not unsigned:
        return ""
    parts = [f"{unsigned} layers on the full 8-bit grid stored as uint8 with zero point 128 (u8 x u8 kernels)"
             ] if unsigned else []
    if paired:
        parts.append(f"{len(paired)} layers on the full 8-bit grid with same-sign adjacent weight pairs held to"
                     f" |a| + |b| <= {next(iter(paired.values()))[0].limit}")
    parts += [f"{count} layers held to [{lo}, {hi}]" for (lo, hi), count in sorted(held.items())]
    label = asked if asked == weight_range else f"{asked}: {weight_range}"
    return (f"weight range {label}: " + "; ".join(parts)
            + ": u8 x s8 products saturate int16 pairs in onnxruntime on x86 without VNNI")


def _mixed_precision(normalized, graph, plan, calibration_data, config: QuantConfig, grid_for, progress: bool
                     ) -> Optional[MixedPrecisionResult]:
    """Per-layer widths under the recipe's budget, or None when it sets none."""
    if not config.mixed_precision.enabled:
        return None
    started = time.perf_counter()
    with Progress("mixed precision", total=sensitivity_runs(plan, config.mixed_precision), enabled=progress) as bar:
        result = choose_bit_widths(normalized, graph, plan, calibration_data, config.mixed_precision, grid_for,
                                   config.activation_bits, progress=bar.update,
                                   weight_scale_search=config.weight_scale_search)
    result.seconds = time.perf_counter() - started
    return result


def _activation_methods(graph: gs.Graph, plan, config: QuantConfig) -> dict[str, str]:
    """Leader tensor -> range search, where an override gives a node's inputs another method than the default."""
    methods, planned = {}, set(plan.activations)
    for node in graph.nodes:
        method = config.for_node(node.name, node.op).scale_search
        if method != config.scale_search:
            methods.update({plan.leader(t.name): method for t in node.inputs if t.name in planned})
    return methods


def _layer_rows(graph, plan, weight_params, activation_params, config, histograms, methods) -> list[dict[str, Any]]:
    """One row per anchor in graph order: its weight quantization, or why it stayed float."""
    rows = []
    weights = {slot.node: slot for slot in plan.weights}
    for node in graph.nodes:
        if node.name in plan.left_float:
            rows.append({"name": node.name, "op": node.op, "output": node.outputs[0].name,
                         "float": plan.left_float[node.name]})
        elif node.name in weights:
            rows.append(_weight_row(node, weights[node.name], weight_params[node.name], config))
            leader = plan.leader(node.inputs[0].name)
            if leader in activation_params:
                rows[-1].update(_input_row(activation_params[leader], histograms[leader], leader,
                                           methods.get(leader, config.scale_search)))
    return rows


def _weight_row(node: gs.Node, slot, quant: WeightQuant, config: QuantConfig) -> dict[str, Any]:
    weight = node.inputs[slot.input_index].values
    channel_absmax = np.abs(np.moveaxis(weight, slot.axis, 0).reshape(weight.shape[slot.axis], -1)).max(axis=1)
    return {"name": node.name, "op": node.op, "output": node.outputs[0].name,
            "weight_bits": int(np.log2(quant.grid.qmax + 1)) + 1, "weight_count": int(weight.size),
            # how the width is held: an int8 container (onnxruntime's int4 Conv dequantizes per run),
            # narrower grids as a clipped range in it; int4 weight-only MatMul/Gemm rows are relabelled
            "weight_storage": (f"uint8 [{quant.grid.qmin + quant.zero_point}, {quant.grid.qmax + quant.zero_point}]"
                               f" zero point {quant.zero_point}" if quant.zero_point else
                               f"{np.dtype(quant.grid.dtype).name} [{quant.grid.qmin}, {quant.grid.qmax}]"),
            "weight_scale_search": config.for_node(node.name, node.op).weight_scale_search,
            "weight_min": float(weight.min()), "weight_max": float(weight.max()),
            "weight_absmax": float(channel_absmax.max()),
            "channel_absmax": [round(float(v), 6) for v in channel_absmax],
            "input": node.inputs[0].name}


def _add_outliers(rows: list[dict[str, Any]], channel_stats: dict[str, ChannelStats]) -> None:
    """Which channels and calibration samples of each layer's input stand far above the rest (RepAPQ's
    observation): shown in the report, so a poor layer can be traced to a few channels or samples."""
    for row in rows:
        if row.get("input_tensor") in channel_stats:
            row.update(find_outliers(channel_stats[row["input_tensor"]]).as_row())


def _input_row(quant: ActivationQuant, histogram, leader: str, method: str) -> dict[str, Any]:
    """The input activation's quantization and a 64-bin summary of its calibration histogram."""
    centers, counts = histogram.centers, histogram.counts
    groups = 64 if len(counts) % 64 == 0 else 1
    coarse_counts, coarse_centers = counts.reshape(groups, -1).sum(axis=1), centers.reshape(groups, -1).mean(axis=1)
    used = np.flatnonzero(coarse_counts)
    span = slice(used[0], used[-1] + 1) if len(used) else slice(0, 0)
    return {"input_tensor": leader, "input_scale": quant.scale, "input_zero_point": quant.zero_point,
            "input_storage": f"{np.dtype(quant.grid.dtype).name} [{quant.grid.qmin}, {quant.grid.qmax}]",
            "input_scale_search": method,
            "input_range": [quant.scale * (quant.grid.qmin - quant.zero_point),
                            quant.scale * (quant.grid.qmax - quant.zero_point)],
            "input_observed": [float(histogram.min), float(histogram.max)],
            "input_histogram": {"centers": [round(float(c), 6) for c in coarse_centers[span]],
                                "counts": [int(c) for c in coarse_counts[span]]}}


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
        check_model(model)  # also past 2 GiB, where onnx.checker wants a path
    except Exception as exc:
        raise RuntimeError(f"produced an invalid model: {str(exc).splitlines()[0][:200]}") from exc
    return model
