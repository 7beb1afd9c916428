"""The quantizers under comparison, each run as a command in its own measured child process."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE_FLAGS = {"fast": ["--fast"], "default": [], "reconstruct": ["--reconstruct"],
                # below 8 bits (issue 6): fast recipe and with reconstruction
                "w6a6": ["--fast", "--bits", "6"], "w4a8": ["--fast", "--wbits", "4", "--abits", "8"],
                "w6a6-reconstruct": ["--reconstruct", "--bits", "6"],
                "w4a8-reconstruct": ["--reconstruct", "--wbits", "4", "--abits", "8"],
                # mixed precision at the weight size of uniform W4A8
                "mixed-w4": ["--fast", "--budget-mean-bits", "4"],
                "mixed-w4-reconstruct": ["--reconstruct", "--budget-mean-bits", "4"],
                "clustered-w4": ["--fast", "--wbits", "4", "--abits", "8", "--clustered-weights"],
                # issue 10 ablations on the fast recipe
                "bias-correction": ["--fast", "--bias-correction"], "equalize": ["--fast", "--equalize"],
                "reconstruct-bias-correction": ["--reconstruct", "--bias-correction"],
                "reconstruct-equalize": ["--reconstruct", "--equalize"],
                "outlier-ranges": ["--fast", "--outlier-ranges"],
                "reconstruct-outlier-ranges": ["--reconstruct", "--outlier-ranges"],
                # full 8-bit weights with the int16 pair limit instead of [-64, 64] (hosts without VNNI)
                "fast-paired": ["--fast", "--weight-range", "paired"], "default-paired": ["--weight-range", "paired"]}
ORT_CALIBRATIONS = ("minmax", "percentile")
ONNXREPQ_MAIN = "import sys; from onnxrepq.cli import main; sys.exit(main())"  # what the console script runs


@dataclass(frozen=True)
class Method:
    name: str
    arguments: tuple[str, ...]  # a command line after `python`, with {model}, {output}, {calib} placeholders

    def command(self, model: str, output: str, calib: str) -> list[str]:
        return [sys.executable] + [a.format(model=model, output=output, calib=calib) for a in self.arguments]


def ort_method(calibration: str) -> Method:
    return Method(f"ort-{calibration}",
                  ("-m", "tools.bench_lib.ort_quantize", "{model}", "{output}", "{calib}", calibration))


def onnxrepq_method(recipe: str, seed: int = 0) -> Method:
    return Method(f"onnxrepq-{recipe}", ("-c", ONNXREPQ_MAIN, "quantize", "{model}", "-o", "{output}",
                                         "--calib", "{calib}", "--seed", str(seed), *RECIPE_FLAGS[recipe]))


def child_environment() -> dict:
    """Children import `tools.*` from the repository, whatever directory the bench was started in."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, environment.get("PYTHONPATH")]))
    return environment


def run_quantizer(method: Method, model: str, output: str, calib: str, limits: tuple[float, float],
                  log_path: str) -> dict:
    """Returns {returncode, wall_s, peak_rss_mb, error?, notes?}; `error` is set when no model came out.

    limits: (timeout in seconds, memory cap in MB) for the quantizer's process tree.
    """
    timeout_s, memory_cap_mb = limits
    wrapper = [sys.executable, "-m", "tools.bench_lib.measure", str(timeout_s), str(memory_cap_mb), log_path, "--",
               *method.command(model, output, calib)]
    # cwd: the scratch folder, because onnxruntime's symbolic shape inference drops
    # sym_shape_infer_temp.onnx into the working directory when it fails.
    completed = subprocess.run(wrapper, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(output)),
                               env=child_environment())
    if completed.returncode != 0:
        return {"error": "measure wrapper: " + last_line(completed.stderr)}
    stats = json.loads(completed.stdout.strip().splitlines()[-1])
    with open(log_path, errors="replace") as log:
        log_text = log.read()
    stats.update(json_notes(log_text))
    if stats["returncode"] in ("timeout", "memory cap"):
        limit = f"{timeout_s:.0f} s" if stats["returncode"] == "timeout" else f"{memory_cap_mb:.0f} MB"
        stats["error"] = f"stopped at the {stats['returncode']} ({limit}) after {stats['wall_s']:.0f} s"
    elif isinstance(stats["returncode"], int) and stats["returncode"] < 0:
        stats["error"] = f"killed by signal {-stats['returncode']} after {stats['wall_s']:.0f} s: {last_line(log_text)}"
    elif stats["returncode"] != 0 or not os.path.exists(output):
        stats["error"] = f"exit {stats['returncode']}: {last_line(log_text)}"
    return stats


def last_line(text: str) -> str:
    """The most telling line of a log: the last one naming an error, else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    chosen = (errors or lines or ["(no output)"])[-1]
    # onnxruntime puts the reason at the end of long messages: keep both ends
    return chosen if len(chosen) <= 240 else chosen[:100] + " ... " + chosen[-135:]


def json_notes(log_text: str) -> dict:
    """A child may print one JSON object as its last line (ort_quantize reports {"notes": [...]})."""
    lines = [line for line in log_text.splitlines() if line.strip()]
    if lines and lines[-1].startswith("{"):
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    return {}
