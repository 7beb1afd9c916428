"""Child process that runs one command and reports its wall time and peak memory as JSON.

Why a wrapper: getrusage(RUSAGE_CHILDREN).ru_maxrss is the largest peak of *any* waited-for child, so
it only measures one command when the measuring process has exactly one child. A fresh wrapper per
quantizer run gives each method its own number.
Why a memory cap: onnxruntime's histogram calibration keeps every intermediate tensor of every sample
and took the whole (shared) machine on PP-OCRv4 det; the wrapper kills the command above the cap instead.
Usage: python -m tools.bench_lib.measure TIMEOUT_S MEMORY_CAP_MB LOG_PATH -- COMMAND...
"""
import json
import resource
import subprocess
import sys
import time

import psutil

POLL_S = 0.2


def tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for member in [process] + process.children(recursive=True):
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total / 2 ** 20


def kill_tree(process: psutil.Process) -> None:
    for member in process.children(recursive=True) + [process]:
        try:
            member.kill()
        except psutil.Error:
            pass


def run_capped(command: list[str], timeout_s: float, memory_cap_mb: float, log) -> int | str:
    """The command's exit code, or 'timeout' / 'memory cap' when the wrapper stopped it."""
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    watched = psutil.Process(child.pid)
    deadline = time.monotonic() + timeout_s
    while child.poll() is None:
        verdict = "timeout" if time.monotonic() > deadline else None
        try:
            if tree_rss_mb(watched) > memory_cap_mb:
                verdict = "memory cap"
        except psutil.Error:
            pass
        if verdict:
            kill_tree(watched)
            child.wait()
            return verdict
        time.sleep(POLL_S)
    return child.returncode


def measure(command: list[str], timeout_s: float, memory_cap_mb: float, log_path: str) -> dict:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        returncode = run_capped(command, timeout_s, memory_cap_mb, log)
    wall_s = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return {"returncode": returncode, "wall_s": wall_s, "peak_rss_mb": peak_kib / 1024.0}


if __name__ == "__main__":
    timeout, memory_cap, log_path, separator, *command = sys.argv[1:]
    assert separator == "--", "usage: measure TIMEOUT_S MEMORY_CAP_MB LOG_PATH -- COMMAND..."
    print(json.dumps(measure(command, float(timeout), float(memory_cap), log_path)))
