"""One quantize run with some config fields changed, scored like the bench scores that model.

Usage: python tools/variant.py TASK NAME [--seed N] [--calib N] [--out results.jsonl] [FIELD=VALUE ...]

TASK is rec, cls, det, ddddocr or zoo/NAME for models/NAME/model.onnx (tools/bench_lib/tasks.py builds
the same data as tools/bench.py; the zoo is scored on all of its test split unless --zoo-eval says fewer).
FIELD is a QuantConfig field (``bias_correction=True``) or a ReconstructionConfig field prefixed with
``rec.`` (``rec.loss='mse'``); VALUE is a Python literal. The bench compares recipes against each
other and onnxruntime; this compares one recipe field at a time over seeds, which is what the
reconstruction ablations in BENCHMARKS.md need (the spread between seeds is as large as most
single-field effects there, so a variant is judged over several seeds, each one invocation).
Two invocations side by side use one core each: reconstruction runs torch on one thread.

Writes one JSON row (task, name, seed, changes, quantize seconds, output SQNR against FP32 and the
task's own scores) to stdout and appends it to --out.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from dataclasses import fields

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from onnxrepq.api import quantize_with_result  # noqa: E402
from onnxrepq.config import QuantConfig, ReconstructionConfig  # noqa: E402
from onnxrepq.graph.io import save_model_atomic  # noqa: E402
from tools.bench_lib import metrics, runtime, tasks  # noqa: E402

TASKS = {"rec": tasks.rec_task, "cls": tasks.cls_task, "det": tasks.det_task, "ddddocr": tasks.lstm_rec_task}


def parse_changes(pairs: list[str]) -> tuple[dict, dict]:
    """``FIELD=VALUE`` pairs -> (QuantConfig changes, ReconstructionConfig changes); unknown fields refused."""
    quant_fields = {f.name for f in fields(QuantConfig)} - {"seed", "reconstruction"}
    rec_fields = {f.name for f in fields(ReconstructionConfig)}
    quant, rec = {}, {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"variant: expected FIELD=VALUE, got {pair!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise SystemExit(f"variant: {key}: {text!r} is not a Python literal (quote strings: rec.loss=\"'mse'\")")
        target, known, name = (rec, rec_fields, key[4:]) if key.startswith("rec.") else (quant, quant_fields, key)
        if name not in known:
            raise SystemExit(f"variant: no config field {key!r}")
        target[name] = value
    return quant, rec


def run_model(model, task) -> np.ndarray:
    """The task's first output over its evaluation inputs, in the bench's session settings and batches."""
    source = model if isinstance(model, str) else model.SerializeToString()
    return runtime.run_batches(runtime.make_session(source), task.eval_inputs, task.batch_size)


def make_task(name: str, sizes: tasks.Sizes) -> tasks.Task | None:
    """The bench's task of that name; None where its model is not installed."""
    if name in TASKS:
        return TASKS[name](sizes)
    if name.startswith("zoo/"):
        zoo, _ = tasks.zoo_tasks(REPO_ROOT, sizes)   # named zoo/<folder> as the argument is
        for task in zoo:
            if task.name == name:
                return task
    raise SystemExit(f"variant: unknown task {name!r} (choose {', '.join(sorted(TASKS))} or zoo/NAME"
                     f" with models/NAME/model.onnx)")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help=f"{', '.join(sorted(TASKS))} or zoo/NAME")
    parser.add_argument("name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib", type=int, default=None, help="calibration samples (default: the bench's)")
    parser.add_argument("--zoo-eval", type=int, default=None, help="zoo test images (default: all)")
    parser.add_argument("--out", default="variants.jsonl")
    parser.add_argument("--save", default=None, help="also write the quantized model here (for later probes)")
    parser.add_argument("changes", nargs="*", metavar="FIELD=VALUE")
    return parser.parse_intermixed_args(argv)   # FIELD=VALUE may follow --seed and --out


def main(argv=None) -> int:
    args = parse_arguments(argv)
    quant, rec = parse_changes(args.changes)
    sizes = tasks.Sizes()
    if args.calib:
        sizes.rec_calib = sizes.cls_calib = sizes.det_calib = sizes.lstm_calib = args.calib
    sizes.zoo_eval = args.zoo_eval
    task = make_task(args.task, sizes)
    if task is None:
        raise SystemExit(f"variant: the {args.task} model is not installed (see README: the bench extra)")
    config = QuantConfig(seed=args.seed, reconstruction=ReconstructionConfig(**rec), **quant)
    started = time.perf_counter()
    model = quantize_with_result(task.model_path, task.calibration, config).model
    seconds = time.perf_counter() - started
    if args.save:
        save_model_atomic(model, args.save)
    reference, output = run_model(task.model_path, task), run_model(model, task)
    row = {"task": args.task, "name": args.name, "seed": args.seed, "changes": args.changes,
           "quantize_s": round(seconds, 1), "sqnr_db": round(float(metrics.sqnr_db(reference, output)), 2),
           **{key: round(float(value), 4) for key, value in task.score(output, reference).items()}}
    print(json.dumps(row))
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
