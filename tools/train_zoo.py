"""Trains the re-parameterized model zoo on CPU and writes models/<family>/.

Run from the repository root:  python -m tools.train_zoo [--family repvgg dbb ...]

Per family this writes model.onnx (training form, eval mode: BatchNormalization and parallel
branches kept), deploy.onnx (torch-side reparameterize()), calib.npy (first 64 calibration
images) and card.json (accuracies measured with onnxruntime).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from tools.zoo import card, data, export, nets, ort_eval, training

SHIPPED_CALIBRATION_IMAGES = 64

# Chosen so all five train in about 25 minutes on one shared CPU thread; the families with more
# branches per block cost more per epoch and get fewer epochs.
DEFAULT_EPOCHS = {"repvgg": 10, "qarepvgg": 10, "acnet": 8, "dbb": 5, "mobileone": 10}


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", nargs="+", default=list(nets.FAMILY_SPECS), choices=list(nets.FAMILY_SPECS))
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--epochs", type=int, default=None, help="override the per-family default")
    parser.add_argument("--seed", type=int, default=0, help="network initialisation, data order and dataset seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="1 by default: on a CPU shared with other jobs, 2 threads ran 3x slower than 1")
    return parser.parse_args(argv)


def measure(directory: Path, splits: dict, quick_count: int) -> dict:
    """Every accuracy on the card, all through onnxruntime."""
    test_images, test_labels = splits["test"]
    calibration = splits["calib"][0]
    model_int8 = ort_eval.ort_int8_top1(directory / "model.onnx", calibration, test_images, test_labels)
    deploy_int8 = ort_eval.ort_int8_top1(directory / "deploy.onnx", calibration, test_images, test_labels)
    return {
        "fp32_top1": ort_eval.top1(directory / "model.onnx", test_images, test_labels),
        "fp32_top1_first_1000_test": ort_eval.top1(directory / "model.onnx", test_images[:quick_count], test_labels[:quick_count]),
        "deploy_fp32_top1": ort_eval.top1(directory / "deploy.onnx", test_images, test_labels),
        "ort_int8_top1": model_int8.top1,
        "ort_int8_deploy_top1": deploy_int8.top1,
        "ort_int8_method": f"{ort_eval.method_description(len(calibration))}; "
                           f"model.onnx: {model_int8.note}; deploy.onnx: {deploy_int8.note}",
    }


def build_card(
    spec: nets.NetworkSpec,
    recipe: training.TrainingRecipe,
    result: training.TrainingResult,
    models: dict[str, torch.nn.Module],
    ops: dict[str, dict[str, int]],
    accuracies: dict,
) -> card.ModelCard:
    model, deployed, seed = models["model"], models["deploy"], recipe.seed
    return card.ModelCard(
        family=spec.family,
        dataset=data.describe(seed),
        onnxrepq_int8_top1=None,
        params=nets.parameter_count(model),
        deploy_params=nets.parameter_count(deployed),
        train_seconds=round(result.seconds, 1),
        training={**dataclasses.asdict(recipe), "optimizer": "AdamW + OneCycle", "threads": torch.get_num_threads(),
                  "final_loss": round(result.final_loss, 4), "final_train_top1": round(result.train_top1, 2)},
        network=dataclasses.asdict(spec),
        model_ops=ops["model"],
        deploy_ops=ops["deploy"],
        command=f"python -m tools.train_zoo --family {spec.family}" + (f" --seed {seed}" if seed else ""),
        **accuracies,
    )


def train_family(family: str, arguments: argparse.Namespace, splits: dict) -> card.ModelCard:
    spec = nets.FAMILY_SPECS[family]
    recipe = training.TrainingRecipe(epochs=arguments.epochs or DEFAULT_EPOCHS[family], seed=arguments.seed)
    model = nets.build_network(spec, seed=arguments.seed)
    print(f"{family}: {nets.parameter_count(model)} parameters, {recipe.epochs} epochs", flush=True)
    result = training.train(model, *splits["train"], recipe, log=lambda line: print(line, flush=True))
    models = {"model": model, "deploy": model.reparameterize()}
    directory = arguments.out / family
    ops = {form: export.export_model(network, directory / f"{form}.onnx") for form, network in models.items()}
    np.save(directory / "calib.npy", splits["calib"][0][:SHIPPED_CALIBRATION_IMAGES])
    accuracies = measure(directory, splits, card.QUICK_TEST_COUNT)
    model_card = build_card(spec, recipe, result, models, ops, accuracies)
    card.write_card(model_card, directory)
    return model_card


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    print("command:", shlex.join(["python", "-m", "tools.train_zoo", *argv]))
    splits = {split: data.make_split(split, seed=arguments.seed) for split in data.SPLIT_SIZES}
    for family in arguments.family:
        model_card = train_family(family, arguments, splits)
        print(f"{family}: fp32 {model_card.fp32_top1:.2f}%  ort-int8 {model_card.ort_int8_top1:.2f}%  "
              f"ort-int8(deploy) {model_card.ort_int8_deploy_top1:.2f}%  train {model_card.train_seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
