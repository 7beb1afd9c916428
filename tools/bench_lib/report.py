"""BENCHMARKS.md: one table per model, the command that produced it and the machine it ran on."""
import datetime
import os
import platform

import onnxruntime

COMMON_COLUMNS = (("sqnr_db", "SQNR dB", "{:.1f}"), ("latency_ms", "latency ms", "{:.2f}"),
                  ("speedup", "speed-up", "{:.2f}x"), ("quantize_s", "quantize s", "{:.1f}"),
                  ("peak_rss_mb", "peak MB", "{:.0f}"), ("int8_weight_fraction", "int8 weights", "{:.0%}"))


def machine_note() -> dict:
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "load_1min_at_start": load,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def format_value(value, pattern: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "inf"
    return pattern.format(value)


def accuracy_columns(model_result: dict) -> list[str]:
    keys = []
    for record in model_result["methods"].values():
        keys += [key for key in record.get("accuracy", {}) if key not in keys]
    return keys


def model_table(name: str, model_result: dict) -> list[str]:
    accuracy_keys = accuracy_columns(model_result)
    header = ["method"] + accuracy_keys + [title for _, title, _ in COMMON_COLUMNS] + ["notes"]
    lines = [f"### {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, record in model_result["methods"].items():
        if "failed" in record:
            cells = [f"failed: {record['failed']}"] + ["-"] * (len(header) - 2)
        else:
            cells = [format_value(record["accuracy"].get(key), "{:.4f}") for key in accuracy_keys]
            cells += [format_value(record.get(key), pattern) for key, _, pattern in COMMON_COLUMNS]
            cells.append(record.get("notes", ""))
        lines.append("| " + " | ".join([method] + [c.replace("|", "/") for c in cells]) + " |")
    return lines + [""] + [f"- {note}" for note in model_result.get("notes", [])] + [""]


def run_section(results: dict) -> list[str]:
    machine = results["machine"]
    lines = ["Produced by:", "", "```", results["command"], "```", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, onnxruntime {machine['onnxruntime']}, "
             f"Python {machine['python']}, {machine['date_utc']} UTC, 1-min load average at start "
             f"{machine['load_1min_at_start']:.1f}. Latency: onnxruntime CPU, {results['settings']['threads']} intra-op "
             f"threads, graph optimisation ALL, batch 1, median of {results['settings']['latency_runs']} runs "
             "after warm-up, all methods of a model timed in turns; speed-up = FP32 latency / method latency. "
             "The machine is shared, so absolute latencies are noisy.",
             "", results["settings"]["description"], ""]
    lines += [f"- {note}" for note in results.get("notes", [])] + [""]
    for name, model_result in results["models"].items():
        lines += model_table(name, model_result)
    return lines


def write_markdown(runs: list[dict], path: str) -> None:
    """One section per bench run (a full run plus, say, a later zoo-only run)."""
    lines = ["# Benchmarks", ""]
    if len(runs) > 1:
        lines += [f"This file joins {len(runs)} bench runs (rendered with `tools/bench.py --from-json`); "
                  "each section names its command and machine state.", ""]
    for results in runs:
        lines += run_section(results)
    with open(path, "w") as handle:
        handle.write("\n".join(lines))
