"""Accuracy against weight size: uniform widths beside mixed precision at the same sizes.

Usage: python tools/pareto.py [--models repvgg,rec] [--bits 3,4,5,6] [--out DIR] [--zoo-eval N]

For each model and each mean width B, quantizes uniform W{B}A8 and mixed precision with
``budget_mean_bits=B`` (the fast recipe otherwise), scores both on held-out data with the bench's
tasks (zoo top-1, PP-OCRv4 rec exact match) and output SQNR, and writes DIR/pareto.md (the table)
and DIR/pareto.png (one panel per model: metric against nominal weight MB). Sizes are nominal
(bits per weight, as mixed-precision papers count them); the int8 containers are 1 byte per weight.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxrepq.api import quantize_with_result  # noqa: E402
from onnxrepq.config import QuantConfig  # noqa: E402
from onnxrepq.search.mixed_precision import MixedPrecisionConfig  # noqa: E402
from tools.bench_lib import methods, tasks  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="repvgg,qarepvgg,acnet,dbb,mobileone,rec",
                        help="comma-separated substrings of task names (zoo deploy forms are skipped)")
    parser.add_argument("--bits", default="3,4,5,6", help="mean weight widths to compare at")
    parser.add_argument("--out", default="pareto", help="folder for pareto.md and pareto.png")
    parser.add_argument("--zoo-eval", type=int, default=1000, help="zoo test images scored")
    parser.add_argument("--rec-eval", type=int, default=200)
    return parser.parse_args(argv)


def select_tasks(arguments) -> list[tasks.Task]:
    sizes = tasks.Sizes(zoo_eval=arguments.zoo_eval, rec_eval=arguments.rec_eval)
    zoo, _ = tasks.zoo_tasks(methods.REPO_ROOT, sizes)
    candidates = [t for t in zoo if "deploy" not in t.name] + [t for t in (tasks.rec_task(sizes),) if t]
    wanted = [w for w in arguments.models.split(",") if w]
    return [t for t in candidates if any(w in t.name for w in wanted)]


def run(model, inputs: dict[str, np.ndarray], batch: int) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else model,
                                   providers=["CPUExecutionProvider"])
    name = next(iter(inputs))
    count = len(inputs[name])
    step = batch if session.get_inputs()[0].shape[0] in (None, "batch") or isinstance(
        session.get_inputs()[0].shape[0], str) else 1
    return np.concatenate([session.run(None, {name: inputs[name][i:i + step]})[0] for i in range(0, count, step)])


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - value) ** 2))
    return 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / max(noise, 1e-30))


def measure(task: tasks.Task, config: QuantConfig, reference: np.ndarray) -> dict:
    started = time.perf_counter()
    result = quantize_with_result(task.model_path, task.calibration, config)
    seconds = time.perf_counter() - started
    outputs = run(result.model, task.eval_inputs, task.batch_size)
    rows = [r for r in result.layers if "weight_bits" in r]
    nominal = [r.get("nominal_bits", r["weight_bits"]) for r in rows]
    size_mb = sum(r["weight_count"] * b for r, b in zip(rows, nominal)) / 8e6
    return {**task.score(outputs, reference), "sqnr_db": sqnr_db(reference, outputs), "size_mb": size_mb,
            "seconds": seconds, "widths": sorted(set(nominal))}


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    bits = [int(b) for b in arguments.bits.split(",")]
    os.makedirs(arguments.out, exist_ok=True)
    results = []
    for task in select_tasks(arguments):
        reference = run(task.model_path, task.eval_inputs, task.batch_size)
        fp32 = task.score(reference, reference)[task.primary_metric]
        for width in bits:
            for label, config in (("uniform", QuantConfig(weight_bits=width)),
                                  ("mixed", QuantConfig(mixed_precision=MixedPrecisionConfig(budget_mean_bits=width)))):
                row = {"model": task.name, "metric": task.primary_metric, "fp32": fp32, "bits": width,
                       "method": label, **measure(task, config, reference)}
                results.append(row)
                print(f"[{task.name}] {label} {width}: {task.primary_metric} {row[task.primary_metric]:.4f}"
                      f" sqnr {row['sqnr_db']:.2f} dB size {row['size_mb']:.3f} MB {row['seconds']:.1f} s", flush=True)
    write_markdown(results, os.path.join(arguments.out, "pareto.md"), argv)
    write_plot(results, os.path.join(arguments.out, "pareto.png"))
    return 0


def write_markdown(results: list[dict], path: str, argv) -> None:
    lines = ["| model | mean bits | uniform metric | mixed metric | uniform SQNR dB | mixed SQNR dB | size MB"
             " (uniform / mixed) | mixed widths |", "|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        for width in sorted({r["bits"] for r in rows}):
            u = next(r for r in rows if r["bits"] == width and r["method"] == "uniform")
            m = next(r for r in rows if r["bits"] == width and r["method"] == "mixed")
            metric = u["metric"]
            lines.append(f"| {model} (fp32 {metric} {u['fp32']:.4f}) | {width} | {u[metric]:.4f} | {m[metric]:.4f} |"
                         f" {u['sqnr_db']:.2f} | {m['sqnr_db']:.2f} | {u['size_mb']:.3f} / {m['size_mb']:.3f} |"
                         f" {', '.join(map(str, m['widths']))} |")
    command = "python tools/pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(path, "w") as handle:
        handle.write(f"Command: `{command.strip()}`\n\n" + "\n".join(lines) + "\n")


def write_plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    figure, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.0), squeeze=False)
    for axis, model in zip(axes[0], models):
        for method, marker in (("uniform", "o-"), ("mixed", "s-")):
            rows = sorted((r for r in results if r["model"] == model and r["method"] == method), key=lambda r: r["bits"])
            axis.plot([r["size_mb"] for r in rows], [r[r["metric"]] for r in rows], marker, label=method)
        axis.axhline(rows[0]["fp32"], color="gray", linestyle=":", label="fp32")
        axis.set_title(model, fontsize=9)
        axis.set_xlabel("weights, nominal MB", fontsize=8)
        axis.set_ylabel(rows[0]["metric"], fontsize=8)
        axis.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
