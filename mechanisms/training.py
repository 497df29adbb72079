"""Pieces of a training loop shared by the mechanisms: optimizer, schedule, evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import NonFiniteLossError, TrainConfig

__all__ = ["accuracy", "check_finite", "make_optimizer", "make_scheduler", "progress_bar"]


def make_optimizer(
    model: nn.Module, config: TrainConfig, extra: Sequence[torch.Tensor] = ()
) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters, then ``extra`` ones.

    ``extra`` holds tensors that step with the model but are not part of it (an audit's
    canary block). Every optimizer here updates each parameter on its own, so extra ones leave
    the model's updates unchanged, bit for bit.
    """
    params = [p for p in model.parameters() if p.requires_grad] + list(extra)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Constant, or cosine decay from ``lr`` to 0 over ``total_steps`` optimizer steps."""
    if config.schedule == "cosine":
        steps = max(1, total_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)


def check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLossError(epoch, step, loss)


@torch.no_grad()
def accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024, passes: int = 1
) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in eval mode, batched.

    With ``passes`` > 1 (a model whose inference is random) the prediction is the argmax of the
    softmax averaged over that many forward passes.
    """
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i : i + batch_size]
        probs = sum(torch.softmax(model(xb), dim=1) for _ in range(passes))
        correct += int((probs.argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(y)


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step", leave=False)
