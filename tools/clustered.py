"""Clustered (k-means codebook) against uniform weights at the same width, on the zoo.

Usage: python tools/clustered.py [--models repvgg,acnet] [--bits 4,3] [--zoo-eval N] [--out DIR]

For each model and width B, quantizes W{B}A8 with the fast recipe twice, uniform and with
``clustered_weights`` (2^B int8 codebook entries per output channel), scores both on held-out data
(zoo top-1) and by output SQNR against the float model, and writes DIR/clustered.md. Sizes are
nominal (search/clustering.py ``nominal_bits``): B bits per weight and a float32 scale per channel for
both, plus the int8 codebooks for the clustered model, so the codebooks' cost is on the table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnxrepq.api import quantize_with_result  # noqa: E402
from onnxrepq.config import QuantConfig  # noqa: E402
from onnxrepq.search.clustering import nominal_bits  # noqa: E402
from tools.bench_lib import methods, tasks  # noqa: E402
from tools.pareto import run, sqnr_db  # noqa: E402


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="repvgg,qarepvgg,acnet,dbb,mobileone",
                        help="comma-separated substrings of zoo task names (deploy forms are skipped)")
    parser.add_argument("--bits", default="4,3", help="weight widths to compare at")
    parser.add_argument("--out", default="clustered", help="folder for clustered.md")
    parser.add_argument("--zoo-eval", type=int, default=1000, help="zoo test images scored")
    return parser.parse_args(argv)


def select_tasks(arguments) -> list[tasks.Task]:
    zoo, why_none = tasks.zoo_tasks(methods.REPO_ROOT, tasks.Sizes(zoo_eval=arguments.zoo_eval))
    if not zoo:
        raise SystemExit(f"no zoo models: {why_none}")
    wanted = [w for w in arguments.models.split(",") if w]
    return [t for t in zoo if "deploy" not in t.name and any(w in t.name for w in wanted)]


def size_mb(layers: list[dict]) -> float:
    rows = [r for r in layers if "weight_bits" in r]
    return sum(nominal_bits(r["weight_count"], len(r["channel_absmax"]), r.get("nominal_bits", r["weight_bits"]),
                            r.get("codebook_entries", 0)) for r in rows) / 8e6


def measure(task, config: QuantConfig, reference) -> dict:
    started = time.perf_counter()
    result = quantize_with_result(task.model_path, task.calibration, config)
    seconds = time.perf_counter() - started
    outputs = run(result.model, task.eval_inputs, task.batch_size)
    return {**task.score(outputs, reference), "sqnr_db": sqnr_db(reference, outputs),
            "size_mb": size_mb(result.layers), "seconds": seconds}


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    os.makedirs(arguments.out, exist_ok=True)
    results = []
    for task in select_tasks(arguments):
        reference = run(task.model_path, task.eval_inputs, task.batch_size)
        fp32 = task.score(reference, reference)[task.primary_metric]
        for width in (int(b) for b in arguments.bits.split(",")):
            for clustered in (False, True):
                config = QuantConfig(fast=True, weight_bits=width, activation_bits=8, clustered_weights=clustered)
                row = {"model": task.name, "metric": task.primary_metric, "fp32": fp32, "bits": width,
                       "clustered": clustered, **measure(task, config, reference)}
                results.append(row)
                print(f"[{task.name}] W{width} {'clustered' if clustered else 'uniform'}:"
                      f" {task.primary_metric} {row[task.primary_metric]:.4f} sqnr {row['sqnr_db']:.2f} dB"
                      f" size {row['size_mb']:.4f} MB {row['seconds']:.1f} s", flush=True)
    write_markdown(results, os.path.join(arguments.out, "clustered.md"), argv)
    return 0


def write_markdown(results: list[dict], path: str, argv) -> None:
    lines = ["| model | W | uniform metric | clustered metric | uniform SQNR dB | clustered SQNR dB |"
             " size MB (uniform / clustered) |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        for width in sorted({r["bits"] for r in rows}, reverse=True):
            u, c = (next(r for r in rows if r["bits"] == width and r["clustered"] == k) for k in (False, True))
            metric = u["metric"]
            lines.append(f"| {model} (fp32 {metric} {u['fp32']:.4f}) | {width} | {u[metric]:.4f} | {c[metric]:.4f} |"
                         f" {u['sqnr_db']:.2f} | {c['sqnr_db']:.2f} | {u['size_mb']:.4f} / {c['size_mb']:.4f} |")
    command = "python tools/clustered.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(path, "w") as handle:
        handle.write(f"Command: `{command.strip()}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
