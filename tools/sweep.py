"""Quantize every ONNX model to be found here and tabulate how each fares: a robustness sweep.

    python tools/sweep.py                       # markdown table on stdout
    python tools/sweep.py --out sweep.md        # ... or into a file
    python tools/sweep.py --models rec,repvgg   # only models whose path contains one of these

Models: every *.onnx inside the installed Python packages (site-packages), skipping test-data folders
(onnx ships some 150 single-operator conformance cases under onnx/backend/test), plus models/*/model.onnx.
Inputs are random smooth fields (normalised, about [-2, 2]) in the model's input spec, dynamic batch 1 and
other dynamic dims 64 (the last 320), or the first fallback size the float model runs on. Each model is
quantized (default recipe) by the onnxrepq CLI in a child process (tools/bench_lib/measure.py), so a crash
or a hang becomes a failed row with its exit code and one-line reason, and the sweep goes on.
"""
import argparse
import glob
import os
import site
import sys
import sysconfig
import tempfile
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from tools.bench_lib import methods, metrics, runtime  # noqa: E402
from tools.bench_lib.calib_files import write_calibration  # noqa: E402
from tools.bench_lib.ort_quantize import one_line  # noqa: E402

TEST_FOLDERS = {"test", "tests", "testdata", "test_data"}
# Dynamic (height-like, last) sizes tried in turn: 64 x 320 suits OCR lines, pages (multiples of 32) and
# classifiers alike; a model that refuses it gets the next.
DYNAMIC_SIZES = ((64, 320), (64, 64), (224, 224), (48, 320))
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
               "tensor(bool)": np.bool_}


@dataclass
class Row:
    model: str
    input_shapes: str = ""
    exit_code: int | str | None = None  # the quantizer child's; None when it did not run
    error: str | None = None
    sqnr_db: float | None = None
    int8_weights: float | None = None
    speedup: float | None = None
    quantize_s: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None


def site_package_folders() -> list[str]:
    folders = list(site.getsitepackages()) + [site.getusersitepackages()]
    folders += [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    unique = {os.path.realpath(folder) for folder in folders if os.path.isdir(folder)}
    return sorted(unique)


def discover_models(package_folders: list[str] | None = None, repo_root: str = methods.REPO_ROOT) -> list[str]:
    """Every *.onnx under the package folders outside test-data folders, then the zoo's models."""
    found = []
    for folder in package_folders if package_folders is not None else site_package_folders():
        for parent, children, files in os.walk(folder):
            children[:] = sorted(c for c in children if c not in TEST_FOLDERS)
            found += [os.path.join(parent, name) for name in sorted(files) if name.endswith(".onnx")]
    found += sorted(glob.glob(os.path.join(repo_root, "models", "*", "model.onnx")))
    return list(dict.fromkeys(found))


def display_name(path: str) -> str:
    """The path below site-packages or the repository, which names the package or zoo family."""
    for root in site_package_folders() + [methods.REPO_ROOT]:
        if os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
            return os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return path


def concrete_shape(dims: list, size: tuple[int, int]) -> tuple[int, ...]:
    """Dynamic dims made concrete: batch (axis 0) 1, the last one size[1], any other size[0]."""
    shape = []
    for axis, dim in enumerate(dims):
        fixed = isinstance(dim, int) and dim > 0
        shape.append(dim if fixed else 1 if axis == 0 else size[1] if axis == len(dims) - 1 else size[0])
    return tuple(shape)


def structured_array(shape: tuple[int, ...], count: int, dtype, rng: np.random.Generator) -> np.ndarray:
    """``count`` samples stacked on axis 0: smooth fields over the last two axes (images) or plain noise."""
    full = (count * shape[0], *shape[1:]) if shape else (count,)
    if not np.issubdtype(dtype, np.floating):
        return rng.integers(0, 2 if dtype == np.bool_ else 10, full).astype(dtype)
    if len(full) < 3:
        return rng.standard_normal(full).astype(dtype)
    coarse = rng.standard_normal((*full[:-2], -(-full[-2] // 8), -(-full[-1] // 8)))
    smooth = np.repeat(np.repeat(coarse, 8, axis=-2), 8, axis=-1)[..., :full[-2], :full[-1]]
    return np.clip(smooth + 0.3 * rng.standard_normal(full), -2.0, 2.0).astype(dtype)


def make_inputs(session, count: int, seed: int, size: tuple[int, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {arg.name: structured_array(concrete_shape(arg.shape, size), count, NUMPY_TYPES.get(arg.type, np.float32),
                                       rng) for arg in session.get_inputs()}


def batches(session, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The stacked samples as feeds of the model's batch (1 where it is dynamic)."""
    batch = next((d for d in session.get_inputs()[0].shape[:1] if isinstance(d, int) and d > 0), 1)
    count = len(next(iter(inputs.values()))) // batch
    return [{name: array[i * batch:(i + 1) * batch] for name, array in inputs.items()} for i in range(count)]


def float_outputs(session, feeds: list[dict]) -> list[np.ndarray]:
    """Each tensor output of float type over all feeds, concatenated on axis 0 (maps and labels are skipped)."""
    runs = [session.run(None, feed) for feed in feeds]
    kept = [i for i, value in enumerate(runs[0]) if isinstance(value, np.ndarray) and value.dtype.kind == "f"]
    return [np.concatenate([np.asarray(run[i], np.float64).reshape(len(run[i]) if run[i].ndim else 1, -1)
                            for run in runs]) for i in kept]


def pick_size(session) -> tuple[int, int]:
    """The first dynamic size the float model runs on; the first of all when none does (the error shows later)."""
    for size in DYNAMIC_SIZES:
        try:
            session.run(None, batches(session, make_inputs(session, 1, 0, size))[0])
            return size
        except Exception:  # noqa: BLE001 - any refusal means: try the next size
            continue
    return DYNAMIC_SIZES[0]


def quantize_in_child(model_path: str, output_path: str, calib_path: str, timeout_s: float,
                      memory_cap_mb: float) -> dict:
    """Run the CLI in its own process; {returncode, wall_s, error?} with a one-line error on failure."""
    return methods.run_quantizer(methods.onnxrepq_method("default"), model_path, output_path, calib_path,
                                 (timeout_s, memory_cap_mb), output_path + ".log")


def short_error(stats: dict, log_path: str, path: str, name: str) -> str:
    """The child's error with the model's long path put as its short name before the line is cut to length."""
    if not isinstance(stats.get("returncode"), int) or stats["returncode"] <= 0 or not os.path.exists(log_path):
        return stats["error"]  # stopped by a limit or a signal: the wrapper's own words
    with open(log_path, errors="replace") as log:
        return f"exit {stats['returncode']}: {methods.last_line(log.read().replace(path, name))}"


def sweep_model(path: str, work_dir: str, arguments) -> Row:
    """One table row; never raises: whatever goes wrong is the row's error."""
    row = Row(display_name(path))
    try:
        float_session = runtime.make_session(path)
        size = pick_size(float_session)
        calibration = make_inputs(float_session, arguments.calib_samples, seed=0, size=size)
        held_out = batches(float_session, make_inputs(float_session, arguments.eval_samples, seed=1, size=size))
        row.input_shapes = ", ".join("x".join(map(str, a.shape[1:])) for a in calibration.values())
        reference = float_outputs(float_session, held_out)
    except Exception as error:  # noqa: BLE001 - a model the runtime cannot read or run is a finding
        row.error = f"float model: {one_line(error)}"
        return row
    stem = os.path.join(tempfile.mkdtemp(dir=work_dir), "model")
    output = stem + ".int8.onnx"
    stats = quantize_in_child(path, output, write_calibration(calibration, stem + ".calib"), arguments.timeout,
                              arguments.memory_cap_mb)
    row.exit_code, row.quantize_s = stats.get("returncode"), stats.get("wall_s")
    if "error" in stats:
        row.error = short_error(stats, output + ".log", path, row.model)
        return row
    try:
        measure_quantized(row, float_session, runtime.make_session(output), held_out, reference, arguments)
        row.int8_weights = metrics.int8_weight_fraction(onnx.load(output))
    except Exception as error:  # noqa: BLE001
        row.error = f"quantized model: {one_line(error)}"
    return row


def measure_quantized(row: Row, float_session, int8_session, held_out: list[dict], reference: list[np.ndarray],
                      arguments) -> None:
    quantized = float_outputs(int8_session, held_out)
    row.sqnr_db = min((metrics.sqnr_db(r, q) for r, q in zip(reference, quantized)), default=None)
    latency = runtime.interleaved_latency_ms({"fp32": float_session, "int8": int8_session}, held_out[0],
                                             arguments.latency_runs)
    row.speedup = latency["fp32"] / latency["int8"]


def cell(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | input | quantized | output SQNR dB | int8 weights | speed-up (fp32/int8) | quantize s (child process) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        status = "yes" if row.succeeded else f"**failed**: {row.error}".replace("|", "/")
        lines.append(f"| {row.model} | {row.input_shapes or '-'} | {status} | {cell(row.sqnr_db, '{:.1f}')} |"
                     f" {cell(row.int8_weights, '{:.0%}')} | {cell(row.speedup, '{:.2f}x')} |"
                     f" {cell(row.quantize_s, '{:.1f}')} |")
    return "\n".join(lines) + "\n"


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the markdown table here instead of stdout")
    parser.add_argument("--models", default="", help="comma-separated substrings of model paths to keep")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=4, help="held-out inputs for the SQNR")
    parser.add_argument("--latency-runs", type=int, default=20, help="timed runs per model (median, 2 threads)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per quantizer run")
    parser.add_argument("--memory-cap-mb", type=float, default=8000.0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    wanted = [part for part in arguments.models.split(",") if part]
    paths = [p for p in discover_models() if not wanted or any(part in p for part in wanted)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxrepq-sweep-") as work_dir:
        for path in paths:
            rows.append(sweep_model(path, work_dir, arguments))
            print(f"sweep: {rows[-1].model}: {'ok' if rows[-1].succeeded else rows[-1].error}", file=sys.stderr)
    table = markdown_table(rows)
    if arguments.out:
        with open(arguments.out, "w") as handle:
            handle.write(table)
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
