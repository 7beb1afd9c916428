"""Command line: parses arguments into a QuantConfig and calls the API; nothing else.

Exit codes: 0 success, 1 internal error (a bug of ours), 2 bad usage or bad input,
3 ``compare`` found the quantized model below ``--min-sqnr``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

from . import __version__
from .calibrate.images import ImagePreprocess
from .config import SCALE_SEARCHES, TARGETS, WEIGHT_RANGES, QuantConfig, load_recipe, recipe_toml
from .errors import UserError

EXIT_INTERNAL, EXIT_USAGE, EXIT_GATE = 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exits with 2 and a usage block; keep one line
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxrepq", description="Post-training quantization of ONNX models "
                     "(re-parameterized networks included) to INT8 QDQ graphs for onnxruntime and TensorRT.")
    parser.add_argument("--version", action="version", version=f"onnxrepq {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{quantize,fuse,inspect,compare}", parser_class=_Parser)

    quantize = commands.add_parser("quantize", help="quantize a float model with calibration data")
    quantize.add_argument("model", nargs="?", help="float ONNX model")
    quantize.add_argument("-o", "--output", help="where to write the quantized model (required)")
    quantize.add_argument("--calib", help=".npy, .npz, a folder of them (samples on axis 0), or a folder of"
                          " .png/.jpg images (required)")
    quantize.add_argument("--recipe", metavar="FILE", help="QuantConfig as .toml/.yaml/.json; flags given override it")
    quantize.add_argument("--print-recipe", action="store_true", help="print the effective recipe (TOML) and exit")
    quantize.add_argument("--report", metavar="DIR", help="write DIR/report.json and DIR/report.html")
    quantize.add_argument("--bits", type=int, default=None, help="weight and activation bits (default 8)")
    quantize.add_argument("--wbits", type=int, default=None, help="weight bits, 2..8")
    quantize.add_argument("--abits", type=int, default=None, help="activation bits (8)")
    quantize.add_argument("--scale-search", choices=SCALE_SEARCHES, default=None,
                          help="how activation ranges are chosen (default mse)")
    quantize.add_argument("--weight-scale-search", choices=SCALE_SEARCHES, default=None,
                          help="how per-channel weight scales are chosen (default mse)")
    quantize.add_argument("--target", choices=TARGETS, default=None, help="default ort-cpu")
    quantize.add_argument("--weight-range", choices=WEIGHT_RANGES, default=None,
                          help="reduced: 8-bit weights held to [-64, 64], paired: full 8-bit weights with"
                          " same-sign adjacent pairs held to |a|+|b| <= 128, so onnxruntime CPUs without VNNI do"
                          " not saturate; unsigned: full 8-bit weights stored as uint8, exact on any CPU but run"
                          " by slower u8 x u8 kernels; auto (default) reduces when this host lacks VNNI, else full")
    quantize.add_argument("--seed", type=int, default=None, help="default 0")
    quantize.add_argument("--fast", action="store_true", help="scale search only, no block reconstruction: minutes faster")
    quantize.add_argument("--clustered-weights", action="store_true",
                          help="per-channel k-means codebooks of 2^wbits int8 entries instead of the uniform grid"
                          " (needs --fast)")
    quantize.add_argument("--reconstruct", action="store_true",
                          help="block-wise reconstruction (AdaRound, LSQ steps, MAE loss at 8 bits, MSE below;"
                          " the QPR affine is a config-file option): the default")
    quantize.add_argument("--calib-samples", type=int, default=None, help="use at most this many samples")
    quantize.add_argument("--budget-size", type=float, default=None, metavar="MB",
                          help="mixed precision: per-layer weight widths so that weights take at most MB"
                          " (nominal bits per weight, searched with onnxruntime)")
    quantize.add_argument("--budget-mean-bits", type=float, default=None, metavar="B",
                          help="mixed precision: weights take at most the size of uniform B-bit weights")
    quantize.add_argument("--budget-bitops", type=float, default=None, metavar="G",
                          help="mixed precision: at most G giga bit-operations (MACs x wbits x abits) per sample")
    quantize.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                          help="node name or op type (glob) to leave in float; repeatable")
    quantize.add_argument("--no-fuse", action="store_true", help="do not fuse parallel conv branches")
    quantize.add_argument("--equalize", action="store_true",
                          help="cross-layer equalization of Conv->Relu->Conv pairs on calibrated channel ranges"
                               " (the default)")
    quantize.add_argument("--no-equalize", action="store_true", help="no cross-layer equalization, whatever the recipe")
    quantize.add_argument("--absorb-high-bias", action=argparse.BooleanOptionalAction, default=None,
                          help="with --equalize: move Relu channels' calibration minima into the next conv's bias"
                               " (exact only on inputs that stay above them)")
    quantize.add_argument("--outlier-ranges", action=argparse.BooleanOptionalAction, default=None,
                          help="activation ranges reach the outlier channels' median-sample extremes")
    quantize.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                          help="move each layer's mean output shift into its bias, measured on the calibration data"
                               " (default: on with --fast only, and kept there only if the outputs come closer to"
                               " float; named, it is kept whatever the outputs do)")
    quantize.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                          help="calibration images are resized to H x W (default: the model's input size)")
    quantize.add_argument("--image-mean", type=float, nargs="+", metavar="M", help="per-channel mean after 1/255")
    quantize.add_argument("--image-std", type=float, nargs="+", metavar="S", help="per-channel std after 1/255")
    quantize.add_argument("--bgr", action="store_true", help="feed calibration images as BGR")
    quantize.add_argument("--nhwc", action="store_true", help="the model takes NHWC images")
    quantize.add_argument("--quiet", action="store_true", help="no progress bars")
    quantize.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    fuse = commands.add_parser("fuse", help="fuse parallel branches and fold BN: the float deploy form")
    fuse.add_argument("model")
    fuse.add_argument("-o", "--output", required=True)

    inspect = commands.add_parser("inspect", help="show inputs, ops, branch groups and what would be quantized")
    inspect.add_argument("model")
    inspect.add_argument("--json", action="store_true")
    inspect.add_argument("--runtime", action="store_true",
                         help="also count the integer kernels onnxruntime CPU makes of MODEL (a QDQ model)")

    compare = commands.add_parser("compare", help="compare a quantized model with its float original")
    compare.add_argument("float_model")
    compare.add_argument("quant_model")
    compare.add_argument("--data", required=True, help=".npy, .npz, or a folder of them")
    compare.add_argument("--samples", type=int, default=64)
    compare.add_argument("--min-sqnr", type=float, default=None, metavar="DB",
                         help="exit 3 when any output's SQNR is below this")
    compare.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"onnxrepq: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnxrepq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, the traceback on request
        if os.environ.get("ONNXREPQ_DEBUG"):
            raise
        print(f"onnxrepq: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
              " (set ONNXREPQ_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _config(args) -> QuantConfig:
    """The recipe (or the defaults), with every flag given on the command line put over it."""
    if args.bits is not None and (args.wbits is not None or args.abits is not None):
        raise UserError("--bits sets both widths; give either --bits or --wbits/--abits")
    if args.calib_samples is not None and args.calib_samples < 1:
        raise UserError("--calib-samples must be at least 1")
    if args.equalize and args.no_equalize:
        raise UserError("--equalize and --no-equalize contradict each other; give one")
    if args.fast and args.reconstruct:
        raise UserError("--fast and --reconstruct contradict each other; give one")
    base = load_recipe(args.recipe) if args.recipe else QuantConfig()
    given = {
        "weight_bits": args.wbits if args.wbits is not None else args.bits,
        "activation_bits": args.abits if args.abits is not None else args.bits,
        "scale_search": args.scale_search, "weight_scale_search": args.weight_scale_search,
        "target": args.target, "seed": args.seed, "weight_range": args.weight_range,
        "fuse_branches": False if args.no_fuse else None, "equalize": True if args.equalize else (False if args.no_equalize else None),
        "bias_correction": args.bias_correction, "outlier_aware_ranges": args.outlier_ranges,
        "absorb_high_bias": args.absorb_high_bias,
        "clustered_weights": True if args.clustered_weights else None,
        "fast": True if args.fast else (False if args.reconstruct else None),
        "keep_float": base.keep_float + tuple(args.keep_float) if args.keep_float else None,
    }
    calibration = {"max_samples": args.calib_samples, "images": _image_preprocess(args, base.calibration.images)}
    calibration = replace(base.calibration, **{k: v for k, v in calibration.items() if v is not None})
    budgets = {"budget_size_mb": args.budget_size, "budget_bitops_g": args.budget_bitops,
               "budget_mean_bits": args.budget_mean_bits}
    mixed = replace(base.mixed_precision, **{k: v for k, v in budgets.items() if v is not None})
    return replace(base, calibration=calibration, mixed_precision=mixed,
                   **{k: v for k, v in given.items() if v is not None})


def _image_preprocess(args, base: ImagePreprocess | None) -> ImagePreprocess | None:
    given = {"size": tuple(args.image_size) if args.image_size else None,
             "mean": tuple(args.image_mean) if args.image_mean else None,
             "std": tuple(args.image_std) if args.image_std else None,
             "channel_order": "BGR" if args.bgr else None, "layout": "NHWC" if args.nhwc else None}
    given = {k: v for k, v in given.items() if v is not None}
    return replace(base or ImagePreprocess(), **given) if given else None


def _quantize(args) -> int:
    from .api import quantize_with_result
    from .graph.io import check_output_path, has_external_data, save_model_atomic

    config = _config(args)
    if args.print_recipe:
        print(recipe_toml(config), end="")
        return 0
    missing = [flag for flag, value in (("MODEL", args.model), ("-o/--output", args.output),
                                        ("--calib", args.calib)) if value is None]
    if missing:
        raise UserError(f"the following arguments are required: {', '.join(missing)}")
    output = check_output_path(args.output, args.model)
    # weights shipped beside the input's graph come back beside the output's; asked before the
    # run, as reading the graph file costs a copy of an inline model's weights
    external_data = has_external_data(args.model)
    started = time.perf_counter()
    result = quantize_with_result(args.model, args.calib, config, progress=not args.quiet and sys.stderr.isatty())
    save_model_atomic(result.model, output, external_data=external_data)
    elapsed = time.perf_counter() - started
    quantized = sum(1 for row in result.layers if "weight_bits" in row)
    summary = {"output": str(output), "seconds": round(elapsed, 2), "quantized_layers": quantized,
               "float_layers": len(result.layers) - quantized, "calibration_samples": result.calibration_samples}
    if args.report:
        from .report import write_report

        report = write_report(result, config, args.report)
        summary.update(report=str(args.report), report_seconds=round(report["timings"]["report"], 2),
                       **{k: v for k, v in report["model"].items()})
    if not args.quiet:
        for notice in result.notices:
            print(f"onnxrepq: note: {notice}", file=sys.stderr)
    summary["notices"] = result.notices
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(f"wrote {output}: {quantized} layers int8, {summary['float_layers']} kept float,"
              f" {result.calibration_samples} calibration samples, {elapsed:.1f} s")
        if args.report:
            print(f"report: {args.report}/report.html (output SQNR {summary['min_sqnr_db']:.2f} dB,"
                  f" {summary['report_seconds']:.1f} s)")
    return 0


def _fuse(args) -> int:
    from .api import fuse
    from .graph.io import check_output_path, has_external_data, save_model_atomic

    output = check_output_path(args.output, args.model)
    save_model_atomic(fuse(args.model), output, external_data=has_external_data(args.model))
    print(f"wrote {output}")
    return 0


def _inspect(args) -> int:
    from .api import inspect

    report = inspect(args.model)
    coverage = _runtime_coverage(args.model) if args.runtime else None
    if args.json:
        data = asdict(report) | ({"runtime": asdict(coverage)} if coverage else {})
        print(json.dumps(data, default=str, indent=1))
        return 0
    print(f"opset {report.opset}")
    for label, values in (("input", report.inputs), ("output", report.outputs)):
        for name, dtype, dims in values:
            print(f"{label:6s} {name}: {dtype} {dims}")
    print("ops: " + ", ".join(f"{op} {count}" for op, count in report.op_counts.items()))
    print("after normalisation: " + ", ".join(f"{op} {count}" for op, count in report.normalized_op_counts.items()))
    for record in report.passes:
        for note in record.notes:
            print(f"  [{record.name}] {note}")
    if report.op_counts.get("DequantizeLinear"):
        # a QDQ model: every weight sits behind a DequantizeLinear, so listing each as "kept float" says nothing
        print(f"already quantized: DequantizeLinear {report.op_counts['DequantizeLinear']}, QuantizeLinear "
              f"{report.op_counts.get('QuantizeLinear', 0)}"
              + ("" if coverage else "; --runtime counts the integer kernels onnxruntime CPU makes of it"))
    else:
        print(f"would quantize {len(report.quantizable)} layers"
              f" ({', '.join(sorted({op for _, op in report.quantizable}))})")
        for name, reason in report.left_float.items():
            print(f"  kept float: {name}: {reason}")
    if coverage:
        print("onnxruntime CPU kernels:\n" + coverage.summary())
    return 0


def _runtime_coverage(path):
    from .emit.coverage import kernel_coverage
    from .graph.io import load_model

    return kernel_coverage(load_model(path))


def _compare(args) -> int:
    from .graph.io import load_model
    from .report.compare import compare_models

    comparison = compare_models(load_model(args.float_model), load_model(args.quant_model), args.data, args.samples)
    if args.json:
        print(json.dumps({"samples": comparison.samples, "speedup": comparison.speedup,
                          "outputs": [asdict(o) for o in comparison.outputs]}))
    else:
        for out in comparison.outputs:
            top1 = f", top-1 agreement {out.top1_agreement:.4f}" if out.top1_agreement is not None else ""
            print(f"{out.name}: SQNR {out.sqnr_db:.2f} dB, cosine {out.cosine:.6f}{top1}")
        print(f"{comparison.samples} samples, speed-up {comparison.speedup:.2f}x (float time / quantized time)")
    if args.min_sqnr is not None and comparison.min_sqnr_db < args.min_sqnr:
        print(f"onnxrepq: SQNR {comparison.min_sqnr_db:.2f} dB is below --min-sqnr {args.min_sqnr}", file=sys.stderr)
        return EXIT_GATE
    return 0


_COMMANDS = {"quantize": _quantize, "fuse": _fuse, "inspect": _inspect, "compare": _compare}


if __name__ == "__main__":
    sys.exit(main())
