"""What the bench measures per model: its calibration and held-out inputs and how outputs are scored.

Three PP-OCR models and ddddocr's LSTM recognizer use synthetic data from tools.ocr_data; zoo models
(models/<name>/) bring their own calib.npy and are scored on tools.zoo.data.make_split("test").
"""
import glob
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch

from tools import ocr_data
from tools.bench_lib import metrics

DET_THRESHOLD = 0.3  # PaddleOCR's det_db_thresh
LSTM_HEIGHT, LSTM_WIDTH = 64, 427  # ddddocr scales lines to height 64; 427 keeps the 320/48 aspect of rec's lines


@dataclass
class Sizes:
    """Sample counts; --quick shrinks them.

    Held-out sets are large enough to tell recipes apart: at 200 lines one line of exact match is
    0.5 points, and the classifier's SQNR on 200 two-class softmax outputs moved 1 to 2 dB between
    seeds of one recipe (5 near-0.5 samples carried half its noise energy); 1000 images hold it to
    about 0.5 dB. The first 200 of each set are the 200 of earlier runs."""
    rec_eval: int = 500
    rec_calib: int = 64
    cls_eval: int = 1000
    cls_calib: int = 64
    det_eval: int = 40
    det_calib: int = 32
    det_size: int = 480
    lstm_eval: int = 200
    lstm_calib: int = 64
    zoo_eval: int | None = None  # None = the whole test split


@dataclass
class Task:
    name: str
    model_path: str
    calibration: dict[str, np.ndarray]
    eval_inputs: dict[str, np.ndarray]
    score: Callable[[np.ndarray, np.ndarray], dict]  # (outputs, fp32 outputs) -> accuracy metrics
    primary_metric: str
    batch_size: int = 16
    card_path: str | None = None


def rapidocr_model(file_name: str) -> str | None:
    """Path of a model bundled with rapidocr_onnxruntime, found without importing it (it needs cv2)."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "models", file_name)
    return path if os.path.exists(path) else None


def ddddocr_model() -> str | None:
    """ddddocr's text recognizer, found without importing the package (it needs cv2)."""
    spec = importlib.util.find_spec("ddddocr")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "common.onnx")
    return path if os.path.exists(path) else None


def single_input_task(name: str, model_path: str, calibration: np.ndarray, eval_inputs: np.ndarray,
                      score, primary_metric: str, **options) -> Task:
    """All benchmarked models take one image tensor; key the arrays by the model's input name."""
    input_name = onnx.load(model_path, load_external_data=False).graph.input[0].name
    return Task(name, model_path, {input_name: calibration}, {input_name: eval_inputs}, score, primary_metric,
                **options)


def rec_task(sizes: Sizes) -> Task | None:
    path = rapidocr_model("ch_PP-OCRv4_rec_infer.onnx")
    if path is None:
        return None
    characters = ocr_data.rec_characters(onnx.load(path, load_external_data=False))
    eval_images, labels = ocr_data.rec_split("eval", sizes.rec_eval)
    calib_images, _ = ocr_data.rec_split("calib", sizes.rec_calib)

    def score(outputs, reference):
        # PaddleOCR's space class shows up at the ends of crops with margins; a reader strips it.
        predictions, fp32 = ([ocr_data.ctc_greedy_decode(o, characters).strip() for o in values]
                             for values in (outputs, reference))
        # agree_fp32: lines read as FP32 reads them. Against the labels a quantized model can gain by
        # luck (FP32 reads 0.9 characters a line fewer than the labels hold, so a lean away from blank
        # helps), and 500 lines put about 2 points of noise on a difference of exact match.
        return {"exact_match": metrics.exact_match(predictions, labels),
                "cer": metrics.character_error_rate(predictions, labels),
                "agree_fp32": metrics.exact_match(predictions, fp32),
                # the lean itself: characters a line read beyond FP32's reading (negative: toward blank)
                "chars_vs_fp32": float(np.mean([len(p) - len(f) for p, f in zip(predictions, fp32)]))}

    return single_input_task("ppocrv4-rec", path, calib_images, eval_images, score, "exact_match")


def grey_lines(images: np.ndarray) -> np.ndarray:
    """rec's [-1, 1] RGB lines as ddddocr feeds its model: grey in [0, 1], LSTM_HEIGHT x LSTM_WIDTH."""
    grey = torch.from_numpy((images * 0.5 + 0.5).mean(axis=1, keepdims=True))
    resized = torch.nn.functional.interpolate(grey, size=(LSTM_HEIGHT, LSTM_WIDTH), mode="bilinear",
                                              align_corners=False)
    return resized.numpy().clip(0.0, 1.0).astype(np.float32)


def ctc_greedy_classes(logits: np.ndarray) -> tuple[int, ...]:
    """Best class per time step, repeats collapsed, blank (class 0) dropped: a reading without a charset."""
    best = np.argmax(logits, axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    return tuple(int(c) for c in best[keep] if c != 0)


def time_first_agreement(outputs: np.ndarray, reference: np.ndarray, count: int) -> float:
    """Share of lines read the same as FP32 reads them.

    The model's output is [T, 1, classes] per line and the bench concatenates lines on axis 0, so the
    [count * T, 1, classes] array splits into `count` equal runs of time steps."""
    lines, fp32_lines = (np.reshape(a, (count, -1, a.shape[-1])) for a in (outputs, reference))
    return float(np.mean([ctc_greedy_classes(o) == ctc_greedy_classes(r) for o, r in zip(lines, fp32_lines)]))


def lstm_rec_task(sizes: Sizes) -> Task | None:
    """ddddocr's labels index its own charset, which we do not map, so it is scored against FP32's reading."""
    path = ddddocr_model()
    if path is None:
        return None
    eval_lines = grey_lines(ocr_data.rec_split("eval", sizes.lstm_eval)[0])
    calib_lines = grey_lines(ocr_data.rec_split("calib", sizes.lstm_calib)[0])

    def score(outputs, reference):
        return {"agree_fp32": time_first_agreement(outputs, reference, len(eval_lines))}

    # batch 1: the export fixes the batch dimension of input1 to 1
    return single_input_task("ddddocr-rec", path, calib_lines, eval_lines, score, "agree_fp32", batch_size=1)


def cls_task(sizes: Sizes) -> Task | None:
    path = rapidocr_model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
    if path is None:
        return None
    eval_images, labels = ocr_data.cls_split("eval", sizes.cls_eval)
    calib_images, _ = ocr_data.cls_split("calib", sizes.cls_calib)

    def score(outputs, reference):
        return {"accuracy": metrics.top1(outputs, labels),
                "agree_fp32": metrics.top1(outputs, np.argmax(reference, axis=1))}

    return single_input_task("ppocr-mobile-cls", path, calib_images, eval_images, score, "accuracy")


def det_task(sizes: Sizes) -> Task | None:
    path = rapidocr_model("ch_PP-OCRv4_det_infer.onnx")
    if path is None:
        return None
    eval_pages = ocr_data.det_split("eval", sizes.det_eval, sizes.det_size)
    calib_pages = ocr_data.det_split("calib", sizes.det_calib, sizes.det_size)

    def score(outputs, reference):
        return {"map_iou": metrics.mean_mask_iou(reference, outputs, DET_THRESHOLD)}

    return single_input_task("ppocrv4-det", path, calib_pages, eval_pages, score, "map_iou", batch_size=1)


def zoo_tasks(root: str, sizes: Sizes) -> tuple[list[Task], str | None]:
    """One task per models/<name>/model.onnx; returns (tasks, note why none when the zoo is unusable)."""
    model_paths = sorted(glob.glob(os.path.join(root, "models", "*", "model.onnx")))
    if not model_paths:
        return [], "no models/<name>/model.onnx found"
    try:
        from tools.zoo.data import make_split
        images, labels = make_split("test", count=sizes.zoo_eval)
    except Exception as error:  # noqa: BLE001 - the zoo is optional for the bench
        return [], f"tools.zoo.data.make_split('test') unavailable: {type(error).__name__}: {error}"
    images, labels = np.asarray(images, dtype=np.float32), np.asarray(labels)
    tasks = []
    for path in model_paths:
        tasks.append(zoo_task(path, images, labels))
        # The torch-side re-parameterized export beside it: graph-level fusion of model.onnx
        # should quantize at least as well as this.
        deploy = os.path.join(os.path.dirname(path), "deploy.onnx")
        if os.path.exists(deploy):
            tasks.append(zoo_task(deploy, images, labels))
    return tasks, None


def zoo_task(model_path: str, images: np.ndarray, labels: np.ndarray) -> Task:
    folder = os.path.dirname(model_path)
    calibration = np.load(os.path.join(folder, "calib.npy")).astype(np.float32)
    deploy = os.path.basename(model_path) == "deploy.onnx"

    def score(outputs, _reference):
        return {"top1": metrics.top1(outputs, labels)}

    name = f"zoo/{os.path.basename(folder)}" + (" (torch deploy form)" if deploy else "")
    return single_input_task(name, model_path, calibration, images, score, "top1", batch_size=64,
                             card_path=None if deploy else os.path.join(folder, "card.json"))
