"""Non-private baseline: ordinary mini-batch training (shuffled epochs, no clipping, no noise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mechanism, Privacy, TrainConfig, TrainResult
from .registry import register_mechanism
from .training import check_finite, make_optimizer, make_scheduler, progress_bar

__all__ = ["train_sgd"]


def train_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: TrainConfig,
    generator: torch.Generator,
) -> TrainResult:
    """Train ``model`` on (x, y) with shuffled mini-batches; no privacy guarantee.

    ``generator`` drives the shuffling; the same generator state gives the same weights.
    """
    n = len(y)
    steps_per_epoch = -(-n // config.batch_size)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    model.train()
    with progress_bar(config.epochs * steps_per_epoch, "sgd", config.progress) as bar:
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(n, generator=generator)
            total, count = 0.0, 0
            for step, start in enumerate(range(0, n, config.batch_size), 1):
                idx = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                check_finite(loss.item(), epoch, step)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
                count += len(idx)
                bar.update(1)
            history.append({"epoch": epoch, "train_loss": total / count})
    privacy = Privacy(formal=False, note="non-private baseline: no privacy guarantee")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state, history, None, privacy)


SGD = register_mechanism(Mechanism("sgd", TrainConfig, train_sgd, "non-private baseline (SGD/momentum/Adam)"))
