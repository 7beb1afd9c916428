"""onnxruntime CPU sessions with fixed settings, so every method's numbers come from the same runtime setup."""
import statistics
import time

import numpy as np
import onnxruntime as ort

ort.set_default_logger_severity(3)  # errors only: unused-initializer warnings drown the bench's own output
INTRA_OP_THREADS = 2  # fixed so latency ratios are comparable across runs and machines


def make_session(model_path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = INTRA_OP_THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])


def run_batches(session: ort.InferenceSession, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """First output of the model over all samples, concatenated on axis 0."""
    count = len(next(iter(inputs.values())))
    outputs = [session.run(None, {name: array[start:start + batch_size] for name, array in inputs.items()})[0]
               for start in range(0, count, batch_size)]
    return np.concatenate(outputs, axis=0)


def interleaved_latency_ms(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray],
                           runs: int, warmup: int = 3) -> dict[str, float]:
    """Median latency per session, timing them in turns (a, b, c, a, b, c, ...).

    Why in turns: on a shared machine the load drifts over seconds; alternating spreads that drift
    over all methods alike, so the FP32/INT8 ratio stays meaningful even when absolute times are not.
    """
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    timings = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            timings[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}
