"""Block-reconstruction ablations on the zoo (issue #5): one component changed at a time, same data.

Usage: python tools/ablate_reconstruction.py [--models repvgg,qarepvgg,acnet,dbb,mobileone] [--eval 1000]
                                             [--iterations 100] [--jobs 2] [--out DIR]

Every variant of a model quantizes from the same calibration set (models/<name>/calib.npy, 64 images)
with the same seed and is scored on the same held-out images (the first --eval of the zoo's test split):
top-1, output SQNR against the float model's logits, and the seconds quantize took. The variants
(VARIANTS below) change one ReconstructionConfig field from the defaults; "fast" is the scale-search-only
recipe they are measured against. All run at W8A8 and W4A8 (weight_bits=4: 8-bit weights leave little for
learned rounding to fix); base, affine and fast also at W6A6. Writes DIR/ablations.md (the table) and
DIR/ablations.json (the rows).

Granularity, as partition() cuts the zoo's fused (plain-chain) graphs: a block holds at most
max_layers_per_block weight layers, packed in order. 1 = layer-wise, which on the RepVGG-style nets is
also unit-wise (a fused unit is one conv); 2 (the default) = one MobileOne unit (depthwise + pointwise)
or two RepVGG-style units; 4 = block-wise, up to four units. On the Q/DQ graph reconstruction sees,
partition() finds no single-entry/single-exit cuts (a conv reading its weight's DequantizeLinear counts
as reading from outside), so blocks are chunks in node order and a 4-layer block can span a stride-2
conv (RepVGG: 4, 3, 2, 1 layers in 4 stages, not one block per resolution).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxrepq.api import quantize_with_result  # noqa: E402
from onnxrepq.config import QuantConfig, ReconstructionConfig  # noqa: E402
from tools.bench_lib import metrics  # noqa: E402
from tools.bench_lib.methods import REPO_ROOT  # noqa: E402

ZOO = ("repvgg", "qarepvgg", "acnet", "dbb", "mobileone")


@dataclass(frozen=True)
class Variant:
    name: str
    meaning: str
    changes: dict = field(default_factory=dict)   # ReconstructionConfig fields changed from the defaults
    fast: bool = False


VARIANTS = (
    Variant("fast", "scale search only, no reconstruction (reference)", fast=True),
    Variant("base", "defaults: loss auto (MAE at W8A8, MSE below), AdaRound, learned steps, no QPR affine,"
            " block-only, <= 2 layers per block"),
    Variant("mse", "loss = MSE", {"loss": "mse"}),
    Variant("mae", "loss = MAE", {"loss": "mae"}),
    Variant("affine", "affine = True (the QPR per-channel gamma/beta learned too)", {"affine": True}),
    Variant("stage", "stage_supervision = True (blocks, then each stage's continuous parameters)",
            {"stage_supervision": True}),
    Variant("nearest", "rounding = nearest (no AdaRound; steps and affine still learned)", {"rounding": "nearest"}),
    Variant("layer", "max_layers_per_block = 1: layer-wise (= unit-wise on the RepVGG-style nets)",
            {"max_layers_per_block": 1}),
    Variant("block4", "max_layers_per_block = 4: block-wise, up to four units (may span a resolution change)",
            {"max_layers_per_block": 4}),
)
# (weight bits, activation bits) -> the variants run there
# (base already is MAE at W8A8 and MSE below 8 bits, so each setting runs only the other loss)
SETTINGS = {(8, 8): [v.name for v in VARIANTS if v.name != "mae"],
            (4, 8): [v.name for v in VARIANTS if v.name != "mse"],
            (6, 6): ["fast", "base", "mae", "affine"]}


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo model names")
    parser.add_argument("--eval", type=int, default=1000, help="held-out test images scored")
    parser.add_argument("--iterations", type=int, default=ReconstructionConfig().iterations,
                        help="Adam steps per block (the default config's)")
    parser.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="models quantized in parallel processes")
    parser.add_argument("--out", default="ablations", help="folder for ablations.md and ablations.json")
    return parser.parse_args(argv)


def config_for(variant: Variant, weight_bits: int, activation_bits: int, iterations: int) -> QuantConfig:
    # fast is always set explicitly: the default recipe is not a constant of these ablations.
    reconstruction = ReconstructionConfig(iterations=iterations, **variant.changes)
    return QuantConfig(weight_bits=weight_bits, activation_bits=activation_bits, seed=0, fast=variant.fast,
                       reconstruction=reconstruction)


def run_model(model: str | onnx.ModelProto, inputs: dict[str, np.ndarray], batch: int = 250) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model,
                                   options, providers=["CPUExecutionProvider"])
    count = len(next(iter(inputs.values())))
    return np.concatenate([session.run(None, {k: v[i:i + batch] for k, v in inputs.items()})[0]
                           for i in range(0, count, batch)])


def ablate_model(name: str, model_path: str, calibration: dict[str, np.ndarray], eval_inputs: dict[str, np.ndarray],
                 labels: np.ndarray, settings: dict = SETTINGS, iterations: int = 100,
                 variants=VARIANTS) -> list[dict]:
    """One row per (width, variant) on this model, every row quantized and scored on the same data."""
    by_name = {v.name: v for v in variants}
    reference = run_model(model_path, eval_inputs)
    fp32 = 100 * metrics.top1(reference, labels)
    rows = []
    for (weight_bits, activation_bits), names in settings.items():
        for variant in (by_name[n] for n in names):
            config = config_for(variant, weight_bits, activation_bits, iterations)
            started, cpu_started = time.perf_counter(), time.process_time()
            result = quantize_with_result(model_path, calibration, config)
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            outputs = run_model(result.model, eval_inputs)
            notes = [n for r in result.passes if r.name == "reconstruct_blocks" for n in r.notes]
            row = {"model": name, "bits": f"W{weight_bits}A{activation_bits}", "variant": variant.name,
                   "fp32_top1": fp32, "top1": 100 * metrics.top1(outputs, labels),
                   "sqnr_db": metrics.sqnr_db(reference, outputs), "seconds": seconds, "cpu_seconds": cpu_seconds,
                   "blocks": notes[0].split(";")[0] if notes else ""}
            rows.append(row)
            print(f"[{name}] {row['bits']} {variant.name:9s} top-1 {row['top1']:.2f} (fp32 {fp32:.2f})"
                  f" sqnr {row['sqnr_db']:.2f} dB {seconds:.1f} s ({cpu_seconds:.1f} s CPU) {row['blocks']}",
                  flush=True)
    return rows


def zoo_model_rows(name: str, eval_count: int, iterations: int, settings: dict = SETTINGS) -> list[dict]:
    from tools.zoo.data import make_split
    images, labels = make_split("test", count=eval_count)
    folder = os.path.join(REPO_ROOT, "models", name)
    path = os.path.join(folder, "model.onnx")
    input_name = onnx.load(path, load_external_data=False).graph.input[0].name
    calibration = {input_name: np.load(os.path.join(folder, "calib.npy")).astype(np.float32)}
    return ablate_model(name, path, calibration, {input_name: np.asarray(images, np.float32)}, np.asarray(labels),
                        settings=settings, iterations=iterations)


def markdown(rows: list[dict], variants=VARIANTS) -> str:
    """Per model and width: top-1 % / SQNR dB / CPU seconds of each variant, FP32 top-1 beside the name.

    CPU seconds, not wall: on a shared machine the wall time of the same run varies several-fold.
    """
    order = [v.name for v in variants]
    lines = ["| model (fp32 top-1) | bits | " + " | ".join(order) + " |", "|---|---|" + "---|" * len(order)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for bits in dict.fromkeys(r["bits"] for r in rows if r["model"] == model):
            cells = {r["variant"]: f"{r['top1']:.2f} / {r['sqnr_db']:.1f} / {r['cpu_seconds']:.0f}"
                     for r in rows if r["model"] == model and r["bits"] == bits}
            fp32 = next(r["fp32_top1"] for r in rows if r["model"] == model)
            lines.append(f"| {model} ({fp32:.2f}) | {bits} | " + " | ".join(cells.get(n, "") for n in order) + " |")
    legend = ["", "Cells: top-1 % / output SQNR dB vs FP32 logits / quantize CPU seconds"
                  " (ablations.json has wall seconds too). Variants:"]
    legend += [f"- `{v.name}`: {v.meaning}" for v in variants]
    return "\n".join(lines + legend) + "\n"


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    models = [m for m in arguments.models.split(",") if m]
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        raise SystemExit(f"unknown zoo models: {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    settings = chosen_settings(arguments.variants)
    os.makedirs(arguments.out, exist_ok=True)
    started = time.perf_counter()
    command = "python tools/ablate_reconstruction.py " + " ".join(argv if argv is not None else sys.argv[1:])
    done: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(max(1, arguments.jobs)) as pool:
        futures = {pool.submit(zoo_model_rows, m, arguments.eval, arguments.iterations, settings): m for m in models}
        for future in as_completed(futures):   # written after each model, so a cut-short run keeps its rows
            done[futures[future]] = future.result()
            rows = [row for m in models for row in done.get(m, [])]
            table = write_outputs(rows, arguments, command.strip(), time.perf_counter() - started)
    print(table)
    return 0


def chosen_settings(variants: str) -> dict:
    """SETTINGS restricted to the named variants; an unknown name is refused."""
    wanted = [v for v in variants.split(",") if v]
    unknown = sorted(set(wanted) - {v.name for v in VARIANTS})
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)}; choose from {', '.join(v.name for v in VARIANTS)}")
    if not wanted:
        return SETTINGS
    return {bits: [n for n in names if n in wanted] for bits, names in SETTINGS.items() if set(names) & set(wanted)}


def write_outputs(rows: list[dict], arguments, command: str, seconds: float) -> str:
    table = f"Command: `{command}` ({seconds:.0f} s in all; {arguments.eval} test images)\n\n" + markdown(rows)
    with open(os.path.join(arguments.out, "ablations.md"), "w") as handle:
        handle.write(table)
    with open(os.path.join(arguments.out, "ablations.json"), "w") as handle:
        json.dump({"command": command, "eval_images": arguments.eval, "iterations": arguments.iterations,
                   "variants": {v.name: v.meaning for v in VARIANTS}, "rows": rows}, handle, indent=1)
    return table


if __name__ == "__main__":
    raise SystemExit(main())
