"""Deterministic CPU training of a zoo network.

Weights are trained plainly (AdamW, weight decay, label smoothing) and nothing regularises the
branch structure: the channel outliers that real re-parameterized nets carry after fusion come
from the identity/1x1 branches and their BatchNorms, and the zoo exists to reproduce them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainingRecipe:
    epochs: int
    batch_size: int = 64  # on this data, 64 learned ~3x faster per sample than 128
    peak_learning_rate: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class TrainingResult:
    seconds: float
    final_loss: float
    train_top1: float  # on the last epoch's batches, in training mode


def epoch_orders(sample_count: int, epochs: int, seed: int) -> np.ndarray:
    """All epochs' shuffles from one seeded generator: the data order is fixed up front and
    does not depend on torch's global RNG state."""
    generator = np.random.default_rng(seed)
    return np.stack([generator.permutation(sample_count) for _ in range(epochs)])


def make_optimizer(model: nn.Module, recipe: TrainingRecipe, total_steps: int):
    """No decay on BatchNorm and bias parameters, the usual convention: decaying BN gammas
    would shrink the very branch scales the zoo is meant to exhibit."""
    decayed = [p for p in model.parameters() if p.ndim > 1]
    undecayed = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": recipe.weight_decay}, {"params": undecayed, "weight_decay": 0.0}],
        lr=recipe.peak_learning_rate,
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.peak_learning_rate, total_steps=total_steps, pct_start=recipe.warmup_fraction
    )
    return optimizer, schedule


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, recipe: TrainingRecipe, log=print) -> TrainingResult:
    torch.manual_seed(recipe.seed)
    torch.set_flush_denormal(True)  # AdamW's second moments of tiny gradients go subnormal; slow on x86
    inputs, targets = torch.from_numpy(images), torch.from_numpy(labels)
    batches_per_epoch = len(images) // recipe.batch_size  # drop the ragged tail: BN hates batches of 3
    optimizer, schedule = make_optimizer(model, recipe, recipe.epochs * batches_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    model.train()
    started = time.perf_counter()
    for epoch, order in enumerate(epoch_orders(len(images), recipe.epochs, recipe.seed)):
        loss_sum, correct = 0.0, 0
        for batch in range(batches_per_epoch):
            index = torch.from_numpy(order[batch * recipe.batch_size:(batch + 1) * recipe.batch_size])
            logits = model(inputs[index])
            loss = criterion(logits, targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item()
            correct += int((logits.argmax(1) == targets[index]).sum())
        seen = batches_per_epoch * recipe.batch_size
        log(f"  epoch {epoch + 1}/{recipe.epochs} loss {loss_sum / batches_per_epoch:.3f} "
            f"train-top1 {100 * correct / seen:.1f}% ({time.perf_counter() - started:.0f}s)")
    model.eval()
    return TrainingResult(time.perf_counter() - started, loss_sum / batches_per_epoch, 100 * correct / seen)
