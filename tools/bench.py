"""Benchmark onnxrepq against FP32 and onnxruntime's static quantizer, model by model, side by side.

    python tools/bench.py                     # everything; writes BENCHMARKS.md and BENCHMARKS.json
    python tools/bench.py --quick             # fewer samples, small det pages, no percentile: minutes
    python tools/bench.py --recipes none      # FP32 and onnxruntime baselines only
    python tools/bench.py --update-cards      # also write int8 top-1 into each zoo card.json
    python tools/bench.py --from-json A.json B.json   # re-render BENCHMARKS.md from saved runs

Every quantizer runs in a fresh child process (tools/bench_lib/measure.py) so its wall time and peak
memory are its own; all methods read the same calibration file. A failing method is recorded as
"failed: <reason>" and the run goes on.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnx  # noqa: E402

from tools.bench_lib import methods, metrics, report, runtime, tasks  # noqa: E402
from tools.bench_lib.calib_files import write_calibration  # noqa: E402

QUICK_SIZES = tasks.Sizes(rec_eval=60, rec_calib=16, cls_eval=60, cls_calib=16, det_eval=8, det_calib=8,
                          det_size=320, zoo_eval=500, lstm_eval=60, lstm_calib=16)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subset that finishes in a few minutes")
    parser.add_argument("--models", default="", help="comma-separated substrings of model names to keep")
    parser.add_argument("--recipes", default="default,reconstruct", help="onnxrepq recipes, comma-separated, or 'none'")
    parser.add_argument("--baselines", default=None,
                        help="onnxruntime calibrations (minmax,percentile) or 'none'; --quick defaults to minmax")
    parser.add_argument("--out", default=os.path.join(methods.REPO_ROOT, "BENCHMARKS.md"), help="markdown path")
    parser.add_argument("--json", default=None, help="raw results path (default: --out with .json)")
    parser.add_argument("--latency-runs", type=int, default=None, help="timed runs per model (default 50, quick 20)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per quantizer run")
    parser.add_argument("--memory-cap-mb", type=float, default=16_000.0,
                        help="a quantizer whose process tree exceeds this RSS is stopped and marked failed")
    parser.add_argument("--from-json", nargs="+", metavar="JSON",
                        help="measure nothing: write --out (and --json, all runs) from these saved results files")
    parser.add_argument("--update-cards", action="store_true", help="write int8 top-1 into zoo card.json files")
    return parser.parse_args(argv)


def selected_methods(arguments) -> list[methods.Method]:
    baselines = split_list(arguments.baselines or ("minmax" if arguments.quick else ",".join(methods.ORT_CALIBRATIONS)))
    recipes = split_list(arguments.recipes)
    unknown = set(baselines) - set(methods.ORT_CALIBRATIONS) | set(recipes) - set(methods.RECIPE_FLAGS)
    if unknown:
        print(f"bench.py: unknown baseline or recipe: {', '.join(sorted(unknown))}", file=sys.stderr)
        raise SystemExit(2)
    return [methods.ort_method(c) for c in baselines] + [methods.onnxrepq_method(r) for r in recipes]


def split_list(text: str) -> list[str]:
    return [] if text.strip() == "none" else [item.strip() for item in text.split(",") if item.strip()]


def build_tasks(arguments, sizes: tasks.Sizes) -> tuple[list[tasks.Task], list[str]]:
    notes = []
    ocr = [make(sizes) for make in (tasks.det_task, tasks.rec_task, tasks.cls_task)]
    if any(task is None for task in ocr):
        notes.append("rapidocr_onnxruntime (PP-OCR models) not installed: OCR models skipped")
    ocr.append(tasks.lstm_rec_task(sizes))
    if ocr[-1] is None:
        notes.append("ddddocr (pip install --no-deps ddddocr==1.6.1) not installed: its LSTM recognizer skipped")
    zoo, zoo_note = tasks.zoo_tasks(methods.REPO_ROOT, sizes)
    if zoo_note:
        notes.append(f"zoo skipped: {zoo_note}")
    keep = split_list(arguments.models)
    chosen = [task for task in ocr + zoo if task is not None and (not keep or any(k in task.name for k in keep))]
    return chosen, notes


def evaluate(task: tasks.Task, model_path: str, reference):
    """Accuracy, fidelity to FP32 and int8 share of one model file; returns (record, outputs)."""
    outputs = runtime.run_batches(runtime.make_session(model_path), task.eval_inputs, task.batch_size)
    record = {"accuracy": task.score(outputs, reference if reference is not None else outputs),
              "sqnr_db": metrics.sqnr_db(reference, outputs) if reference is not None else None,
              "int8_weight_fraction": metrics.int8_weight_fraction(onnx.load(model_path))}
    return record, outputs


def bench_method(task, method, work_dir, calib_path, reference, arguments) -> tuple[dict, str | None]:
    """Quantize with one method and evaluate the result; returns (record, output model path or None)."""
    output = os.path.join(work_dir, f"{method.name}.onnx")
    stats = methods.run_quantizer(method, task.model_path, output, calib_path,
                                  (arguments.timeout, arguments.memory_cap_mb),
                                  os.path.join(work_dir, f"{method.name}.log"))
    if "error" in stats:
        return {"failed": stats["error"], "quantize_s": stats.get("wall_s")}, None
    try:
        record, _ = evaluate(task, output, reference)
    except Exception as error:  # noqa: BLE001 - e.g. an invalid graph; recorded, the run goes on
        return {"failed": "evaluating output: " + methods.last_line(f"{type(error).__name__}: {error}")}, None
    record.update(quantize_s=stats["wall_s"], peak_rss_mb=stats["peak_rss_mb"])
    if stats.get("notes"):
        record["notes"] = "; ".join(stats["notes"])
    return record, output


def add_latency(task: tasks.Task, records: dict, model_paths: dict[str, str], runs: int) -> None:
    """Latency of every model that came out, measured in turns on the first evaluation sample."""
    sessions = {name: runtime.make_session(path) for name, path in model_paths.items()}
    feed = {name: array[:1] for name, array in task.eval_inputs.items()}
    latencies = runtime.interleaved_latency_ms(sessions, feed, runs)
    for name, latency in latencies.items():
        records[name].update(latency_ms=latency, speedup=latencies["fp32"] / latency)


def bench_task(task: tasks.Task, method_list, arguments) -> dict:
    result = {"model_path": task.model_path, "primary_metric": task.primary_metric,
              "eval_samples": len(next(iter(task.eval_inputs.values()))),
              "calib_samples": len(next(iter(task.calibration.values()))), "methods": {}}
    result["methods"]["fp32"], reference = evaluate(task, task.model_path, None)
    model_paths = {"fp32": task.model_path}
    print(f"[{task.name}] fp32 {result['methods']['fp32']['accuracy']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxrepq-bench-") as work_dir:
        calib_path = write_calibration(task.calibration, os.path.join(work_dir, "calib"))
        for method in method_list:
            record, output = bench_method(task, method, work_dir, calib_path, reference, arguments)
            result["methods"][method.name] = record
            if output:
                model_paths[method.name] = output
            print(f"[{task.name}] {method.name} {record.get('failed') or record['accuracy']}", flush=True)
        add_latency(task, result["methods"], model_paths, arguments.latency_runs)
    return result


def update_cards(task_list: list[tasks.Task], results: dict) -> None:
    """card.json gets int8 top-1 (in percent, like the card's fp32_top1) of onnxrepq's default recipe and
    of onnxruntime MinMax, when they ran, plus where the numbers came from."""
    for task in task_list:
        if task.card_path is None or not os.path.exists(task.card_path):
            continue
        with open(task.card_path) as handle:
            card = json.load(handle)
        ran = results["models"][task.name]["methods"]
        # the default recipe is reconstruction: a run of either name gives the card's onnxrepq number
        for key, names in (("onnxrepq_int8_top1", ("onnxrepq-default", "onnxrepq-reconstruct")),
                           ("ort_int8_top1", ("ort-minmax",))):
            record = next((ran[name] for name in names if "accuracy" in ran.get(name, {})), {})
            if "accuracy" in record:
                card[key] = round(100.0 * record["accuracy"]["top1"], 2)
        card["ort_int8_method"] = ("onnxruntime quantize_static: QDQ, per_channel=True, QUInt8 activations, QInt8 "
                                   "weights, MinMax (tools/bench_lib/ort_quantize.py); same calibration as onnxrepq")
        card["int8_top1_source"] = (f"{results['command']} ({results['machine']['date_utc']} UTC): calibrated on "
                                    f"calib.npy ({len(next(iter(task.calibration.values())))} images), "
                                    f"{len(next(iter(task.eval_inputs.values())))} test images")
        with open(task.card_path, "w") as handle:
            json.dump(card, handle, indent=2)
            handle.write("\n")


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    json_path = arguments.json or os.path.splitext(arguments.out)[0] + ".json"
    for path in (arguments.out, json_path):   # now, not after the first model's half hour of measuring
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if arguments.from_json:
        return render_only(arguments.from_json, arguments.out, json_path)
    if arguments.update_cards and arguments.quick:
        print("--update-cards needs the full test split; drop --quick", file=sys.stderr)
        return 2
    sizes = QUICK_SIZES if arguments.quick else tasks.Sizes()
    arguments.latency_runs = arguments.latency_runs or (20 if arguments.quick else 50)
    method_list = selected_methods(arguments)
    task_list, notes = build_tasks(arguments, sizes)
    results = {"command": "python tools/bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
               "machine": report.machine_note(), "notes": notes, "models": {},
               "settings": {"threads": runtime.INTRA_OP_THREADS, "latency_runs": arguments.latency_runs,
                            "description": describe(sizes, arguments.quick)}}
    for task in task_list:
        results["models"][task.name] = bench_task(task, method_list, arguments)
        with open(json_path, "w") as handle:  # after every model, so a killed run keeps what it measured
            json.dump(results, handle, indent=2)
        report.write_markdown([results], arguments.out)
    if arguments.update_cards:
        update_cards(task_list, results)
    print(f"wrote {arguments.out} and {json_path}")
    return 0


def render_only(json_paths: list[str], markdown_path: str, json_path: str) -> int:
    """Re-render the markdown from saved results; several runs make several sections and are kept
    together in `json_path` as {"runs": [...]} (a file in that form can be read back here too)."""
    runs = []
    for path in json_paths:
        with open(path) as handle:
            saved = json.load(handle)
        runs += saved["runs"] if "runs" in saved else [saved]
    report.write_markdown(runs, markdown_path)
    with open(json_path, "w") as handle:
        json.dump({"runs": runs}, handle, indent=2)
    print(f"wrote {markdown_path} and {json_path}")
    return 0


def describe(sizes: tasks.Sizes, quick: bool) -> str:
    return (f"{'Quick subset' if quick else 'Full run'}: rec {sizes.rec_eval} eval / {sizes.rec_calib} calib lines, "
            f"cls {sizes.cls_eval} / {sizes.cls_calib} lines, det {sizes.det_eval} / {sizes.det_calib} pages of "
            f"{sizes.det_size}x{sizes.det_size}, zoo test split {sizes.zoo_eval or 'all'}; synthetic OCR data from "
            "tools/ocr_data.py (calibration and evaluation seeds differ). SQNR: first model output vs FP32 on the "
            "evaluation inputs. Rec exact match compares after stripping leading/trailing spaces.")


if __name__ == "__main__":
    sys.exit(main())
