"""Non-private baseline: ordinary mini-batch training (shuffled epochs, no clipping, no noise)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import Mechanism, Privacy, TrainConfig, TrainResult
from .canaries import GradientCanaries, StepLaw
from .registry import register_mechanism
from .training import check_finite, make_optimizer, make_scheduler, progress_bar

__all__ = ["sgd_epoch", "train_sgd"]


def sgd_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    epoch: int = 1,
    on_step: Callable[[], None] | None = None,
    canaries: GradientCanaries | None = None,
) -> float:
    """One shuffled pass over (x, y) in mini-batches; returns the mean training loss.

    ``canaries``: each included canary is seen once per epoch, at a step drawn from the
    canaries' own stream, and adds its gradient to that step's batch mean (no clipping, no
    noise: the contrast for the private mechanisms).
    """
    n = len(y)
    order = torch.randperm(n, generator=generator, device=generator.device)
    total = 0.0
    schedule = canaries.draw_epoch(-(-n // batch_size)) if canaries is not None else None
    for step, start in enumerate(range(0, n, batch_size), 1):
        idx = order[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        value = loss.item()
        check_finite(value, epoch, step)
        loss.backward()
        if canaries is not None:
            assert schedule is not None
            lot = canaries.lot_at(schedule, step - 1)
            lot.released = lot.update = lot.scatter(lot.norm / len(idx))
            canaries.record(lot)
            canaries.commit()
        optimizer.step()
        scheduler.step()
        total += value * len(idx)
        if on_step is not None:
            on_step()
    return total / n


def train_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: TrainConfig,
    generator: torch.Generator,
    canaries: GradientCanaries | None = None,
) -> TrainResult:
    """Train ``model`` on (x, y) with shuffled mini-batches; no privacy guarantee.

    ``generator`` drives the shuffling; the same generator state gives the same weights.
    A canary's gradient has norm ``canaries.norm`` (there is no clipping norm).
    """
    steps_per_epoch = -(-len(y) // config.batch_size)
    if canaries is not None:
        rate = min(1.0, config.batch_size / len(y))
        canaries.law = StepLaw("none", scale=0.0, shift=canaries.norm / config.batch_size, sample_rate=rate)
    optimizer = make_optimizer(model, config, canaries.parameters() if canaries is not None else ())
    scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    model.train()
    with progress_bar(config.epochs * steps_per_epoch, "sgd", config.progress) as bar:
        for epoch in range(1, config.epochs + 1):
            loss = sgd_epoch(
                model,
                optimizer,
                scheduler,
                x,
                y,
                batch_size=config.batch_size,
                generator=generator,
                epoch=epoch,
                on_step=lambda: bar.update(1),
                canaries=canaries,
            )
            history.append({"epoch": epoch, "train_loss": loss})
    privacy = Privacy(formal=False, note="non-private baseline: no privacy guarantee")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state, history, None, privacy)


SGD = register_mechanism(
    Mechanism(
        "sgd", TrainConfig, train_sgd, "non-private baseline (SGD/momentum/Adam)", gradient_canaries=True
    )
)
