"""models/<name>/card.json: what a zoo model is, how it was made, and how accurate it is."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

CARD_FILE = "card.json"
QUICK_TEST_COUNT = 1000
"""The card also records top-1 on the first 1000 test images, which tests re-check in seconds."""


@dataclass(frozen=True)
class ModelCard:
    family: str
    dataset: dict
    fp32_top1: float
    fp32_top1_first_1000_test: float
    ort_int8_top1: float
    ort_int8_deploy_top1: float
    ort_int8_method: str
    onnxrepq_int8_top1: float | None
    deploy_fp32_top1: float
    params: int
    deploy_params: int
    train_seconds: float
    training: dict
    network: dict
    model_ops: dict
    deploy_ops: dict
    command: str


def write_card(card: ModelCard, directory: Path) -> Path:
    path = directory / CARD_FILE
    path.write_text(json.dumps(dataclasses.asdict(card), indent=2) + "\n")
    return path


def read_card(directory: Path) -> dict:
    """A plain dict: the benchmark tool adds keys (onnxrepq_int8_top1) this dataclass need not know."""
    return json.loads((directory / CARD_FILE).read_text())
