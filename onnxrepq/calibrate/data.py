"""Calibration data: every accepted form becomes a re-iterable stream of checked feed dicts.

Files are opened memory-mapped and read one batch at a time, so the data set never has to fit
in memory; one-shot Python iterables are spooled to a temporary folder on first use.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError

Feed = dict[str, np.ndarray]

@dataclass(frozen=True)
class InputSpec:
    """What the model expects of one input: its dtype, and its shape with None for free dims."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def fixed_batch(self) -> int | None:
        return self.shape[0] if self.shape else None


def input_specs(model) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs excluded), read from the graph: no
    onnxruntime session is built just to ask for them."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)) if tensor_type.elem_type \
            else np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


class CalibrationSet:
    """A re-iterable, validated source of feed dicts with at most ``max_samples`` samples.

    Each feed holds one batch; ``len(feed[name])`` samples of it count towards the limit.
    """

    def __init__(self, batches: Callable[[], Iterator[Feed]], specs: Sequence[InputSpec], max_samples: int,
                 description: str):
        self._batches = batches
        self.specs = list(specs)
        self.max_samples = max_samples
        self.description = description

    def __iter__(self) -> Iterator[Feed]:
        seen = 0
        for raw in self._batches():
            feed = _check_feed(raw, self.specs)
            count = len(next(iter(feed.values())))
            if seen + count > self.max_samples:
                keep = self.max_samples - seen
                feed = {k: v[:keep] for k, v in feed.items()}
                count = keep
            for start in range(0, count, self._step()):
                yield {spec.name: _check_values(feed[spec.name][start:start + self._step()], spec)
                       for spec in self.specs}
            seen += count
            if seen >= self.max_samples:
                break
        if seen == 0:
            raise CalibrationError(f"calibration data {self.description} holds no samples")

    def _step(self) -> int:
        # One sample per run keeps memory flat; a model with a fixed batch gets exactly that batch.
        fixed = {s.fixed_batch for s in self.specs}
        fixed.discard(None)
        return fixed.pop() if len(fixed) == 1 else 1

    def count(self) -> int:
        return sum(len(next(iter(feed.values()))) for feed in self)


def calibration_set(source: Any, specs: Sequence[InputSpec], max_samples: int) -> CalibrationSet:
    """Accept a path (.npy, .npz, folder), an ndarray, a dict of arrays, an iterable of feed dicts,
    or anything with onnxruntime's ``CalibrationDataReader.get_next()``."""
    if isinstance(source, (str, os.PathLike)):
        return CalibrationSet(_path_batches(Path(source), specs), specs, max_samples, str(source))
    if isinstance(source, np.ndarray):
        return CalibrationSet(lambda: iter([_single_input_feed(source, specs, "array")]), specs, max_samples,
                              "array")
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        return CalibrationSet(lambda: iter([arrays]), specs, max_samples, "dict")
    if hasattr(source, "get_next"):
        return CalibrationSet(_spooled(_reader_batches(source), max_samples), specs, max_samples,
                              "CalibrationDataReader")
    if isinstance(source, Iterable):
        return CalibrationSet(_spooled(_iterable_batches(source, specs), max_samples), specs, max_samples,
                              "iterable")
    raise CalibrationError(f"unsupported calibration source of type {type(source).__name__}")


def _path_batches(path: Path, specs: Sequence[InputSpec]) -> Callable[[], Iterator[Feed]]:
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise CalibrationError(f"calibration folder {path} holds no .npy or .npz files")
    elif path.suffix in (".npy", ".npz"):
        files = [path]
    else:
        raise CalibrationError(f"calibration data must be .npy, .npz or a folder of them: {path}")

    def batches() -> Iterator[Feed]:
        for file in files:
            yield _load_file(file, specs)

    return batches


def _load_file(file: Path, specs: Sequence[InputSpec]) -> Feed:
    try:
        if file.suffix == ".npy":
            return _single_input_feed(np.load(file, mmap_mode="r", allow_pickle=False), specs, str(file))
        with np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"cannot read calibration file {file}: {str(exc).splitlines()[0][:200]}") from None


def _single_input_feed(array: np.ndarray, specs: Sequence[InputSpec], where: str) -> Feed:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise CalibrationError(f"{where}: a bare array fits single-input models only; this model takes"
                               f" {names} (use .npz or a dict keyed by input name)")
    return {specs[0].name: array}


def _reader_batches(reader) -> Iterator[Feed]:
    while True:
        feed = reader.get_next()
        if feed is None:
            return
        yield dict(feed)


def _iterable_batches(source: Iterable, specs: Sequence[InputSpec]) -> Iterator[Feed]:
    for item in source:
        if isinstance(item, Mapping):
            yield {k: _to_numpy(v) for k, v in item.items()}
        elif isinstance(item, (list, tuple)) and item and not isinstance(item[0], (int, float)):
            # (inputs, labels) pairs as a DataLoader yields them: the first element is the input
            yield _single_input_feed(_to_numpy(item[0]), specs, "iterable")
        else:
            yield _single_input_feed(_to_numpy(item), specs, "iterable")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _spooled(batches: Iterator[Feed], max_samples: int) -> Callable[[], Iterator[Feed]]:
    """Replay a one-shot stream: the first pass writes each batch to disk, later passes read it."""
    folder = tempfile.TemporaryDirectory(prefix="onnxrepq-calib-")
    files: list[Path] = []
    state = {"done": False, "seen": 0}

    def replay() -> Iterator[Feed]:
        # What an earlier pass spooled comes from disk, also when that pass stopped early
        # (quantize() reads one batch first): the stream has moved past those batches.
        for file in list(files):
            with np.load(file, allow_pickle=False) as archive:
                yield {name: archive[name] for name in archive.files}
        if state["done"]:
            return
        for feed in batches:
            file = Path(folder.name) / f"{len(files):06d}.npz"
            np.savez(file, **feed)
            files.append(file)
            yield feed
            state["seen"] += len(next(iter(feed.values()))) if feed else 0
            if state["seen"] >= max_samples:
                break
        state["done"] = True

    replay.folder = folder  # keep the folder alive as long as the replay function
    return replay


def _check_feed(feed: Feed, specs: Sequence[InputSpec]) -> Feed:
    if not isinstance(feed, Mapping) or not feed:
        raise CalibrationError("each calibration batch must be a non-empty dict of input name -> array")
    expected = {s.name for s in specs}
    missing = expected - set(feed)
    if missing:
        raise CalibrationError(f"calibration data lacks model input(s) {', '.join(sorted(missing))};"
                               f" it has {', '.join(sorted(feed))}")
    checked: Feed = {}
    counts = set()
    for spec in specs:
        array = np.asarray(feed[spec.name])
        array = _check_array(array, spec)
        counts.add(len(array))
        checked[spec.name] = array
    if len(counts) != 1:
        raise CalibrationError(f"calibration inputs disagree on the number of samples: {sorted(counts)}")
    return checked


def _check_array(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    rank = len(spec.shape)
    if array.ndim == rank - 1 and rank > 0:
        array = array[None]  # one sample without its batch axis
    if array.ndim != rank:
        raise CalibrationError(f"input {spec.name!r} expects rank {rank} {_shape_text(spec.shape)},"
                               f" calibration data has shape {tuple(array.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if axis == 0:
            continue
        if want is not None and want != got:
            raise CalibrationError(f"input {spec.name!r} expects {_shape_text(spec.shape)},"
                                   f" calibration data has shape {tuple(array.shape)}")
    if array.dtype != spec.dtype and not (np.issubdtype(spec.dtype, np.floating)
                                          and np.issubdtype(array.dtype, np.floating)):
        raise CalibrationError(f"input {spec.name!r} expects {spec.dtype}, calibration data is {array.dtype}")
    return array


def _check_values(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Convert and scan one step's slice, not the whole batch: a memory-mapped file converted or
    scanned at once (float64 data for a float32 input, say) would be copied into memory whole."""
    array = np.ascontiguousarray(array, dtype=spec.dtype)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise CalibrationError(f"calibration data for input {spec.name!r} contains NaN or Inf")
    return array


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
