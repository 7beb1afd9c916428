"""Peak RSS and wall time of `onnxrepq quantize` against the number of calibration samples.

    python tools/memory_scaling.py models/repvgg/model.onnx --base-calib models/repvgg/calib.npy
    python tools/memory_scaling.py --rec            # PP-OCRv4 rec from rapidocr_onnxruntime, rendered lines

Each calibration set is the base set repeated with a little seeded noise up to the sample count,
and a recipe raises calibration.max_samples so that every sample is read (the default stops at 256).
Each run is a child process; its peak RSS comes from os.wait4, so runs do not mask one another as
RUSAGE_CHILDREN (a maximum over all children so far) would.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

SAMPLE_COUNTS = (16, 64, 256, 1024)


@dataclass(frozen=True)
class Row:
    samples: int
    peak_rss_mb: float
    wall_s: float


def grown_set(base: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` samples: the base set repeated, each repeat after the first with 1% seeded noise,
    so no two samples are identical and the statistics stay those of the base set."""
    rng = np.random.default_rng(seed)
    repeats = -(-count // len(base))
    noise = 0.01 * float(base.std())
    parts = [base] + [base + rng.normal(0.0, noise, base.shape).astype(base.dtype) for _ in range(repeats - 1)]
    return np.concatenate(parts)[:count]


def measured_run(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    import subprocess

    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {child.returncode}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def scaling(model: str, base: np.ndarray, counts=SAMPLE_COUNTS, extra_args=(), folder: str | None = None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxrepq-memory-") as scratch:
        work = Path(folder or scratch)
        recipe = work / "recipe.toml"
        recipe.write_text(f"[calibration]\nmax_samples = {max(counts)}\n")
        for count in counts:
            calib = work / f"calib_{count}.npy"
            np.save(calib, grown_set(base, count))
            command = [sys.executable, "-m", "onnxrepq.cli", "quantize", model, "-o", str(work / "out.onnx"),
                       "--calib", str(calib), "--recipe", str(recipe), "--quiet", *extra_args]
            wall, peak = measured_run(command)
            rows.append(Row(count, peak, wall))
            calib.unlink()
    return rows


def markdown_table(title: str, rows: list[Row]) -> str:
    lines = [f"### {title}", "", "| samples | peak RSS MB | wall s |", "|---:|---:|---:|"]
    lines += [f"| {row.samples} | {row.peak_rss_mb:.0f} | {row.wall_s:.1f} |" for row in rows]
    return "\n".join(lines) + "\n"


def rec_model_and_base(count: int = 64) -> tuple[str, np.ndarray]:
    from tools import ocr_data
    from tools.bench_lib.tasks import rapidocr_model

    path = rapidocr_model("ch_PP-OCRv4_rec_infer.onnx")
    if path is None:
        raise SystemExit("rapidocr_onnxruntime is not installed (pip install --no-deps rapidocr-onnxruntime)")
    images, _ = ocr_data.rec_split("calib", count)
    return path, images.astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="float ONNX model (single input)")
    parser.add_argument("--base-calib", help=".npy of base samples (axis 0) for MODEL")
    parser.add_argument("--rec", action="store_true", help="PP-OCRv4 rec with 64 rendered text lines as the base")
    parser.add_argument("--samples", type=int, nargs="+", default=list(SAMPLE_COUNTS))
    parser.add_argument("cli_args", nargs="*", help="extra arguments for onnxrepq quantize (after --)")
    args = parser.parse_args(argv)
    if args.rec:
        model, base = rec_model_and_base()
        title = "PP-OCRv4 rec"
    elif args.model and args.base_calib:
        model, base, title = args.model, np.load(args.base_calib), args.model
    else:
        parser.error("give MODEL with --base-calib, or --rec")
    rows = scaling(model, base, args.samples, args.cli_args)
    print(markdown_table(f"{title} ({' '.join(args.cli_args) or 'default recipe'})", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
