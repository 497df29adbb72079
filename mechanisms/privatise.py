"""DP-SGD's privatisation of one lot: clipped per-example gradients summed, Gaussian noise, division
by the expected lot size; and the same for a lot of gradient canaries. :mod:`mechanisms.dpsgd`
plans the run and drives the loop; mechanisms built on DP-SGD reuse both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import per_example
from .canaries import CanaryLot, StepLaw
from .per_example import Workspace, clipped_grad_sum

__all__ = ["GradientFn", "add_noise", "gaussian_law", "noisy_gradient", "privatise_canaries"]


def noisy_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
    physical_batch_size: int = 1024,
    engine: str = "auto",
    workspace: Workspace | None = None,
    canaries: CanaryLot | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """The privatised mean gradient of one lot and the lot's summed (non-private) loss.

    ``(sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / expected_batch_size``, with the sum taken in
    chunks of at most ``physical_batch_size`` examples. An empty lot yields pure noise. A
    ``canaries`` lot is privatised with the same clip norm, noise multiplier and expected lot
    size (its noise from the canaries' own generator): see :func:`privatise_canaries`.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total: dict[str, torch.Tensor] = {}
    loss_sum = 0.0
    for start in range(0, len(y), physical_batch_size):
        part = clipped_grad_sum(
            model,
            x[start : start + physical_batch_size],
            y[start : start + physical_batch_size],
            clip_norm=clip_norm,
            engine=engine,
            workspace=workspace,
        )
        for n, g in part.grads.items():  # fresh tensors (ClippedSum's contract): no copy
            if n in total:
                total[n] += g
            else:
                total[n] = g
        loss_sum += part.loss_sum
    # parameter order fixes the order of the noise draws; an empty lot has no gradients
    total = {n: total[n] if n in total else torch.zeros_like(p) for n, p in params.items()}
    add_noise(
        total,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        generator=generator,
    )
    if canaries is not None:
        privatise_canaries(
            canaries,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
        )
    return total, loss_sum


def privatise_canaries(
    lot: CanaryLot,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    norm_multiplier: float = 1.0,
) -> None:
    """DP-SGD's privatisation of a canary lot, through the code real examples go through.

    Each canary's gradient (norm ``norm_multiplier * K``) is scaled by the same clip rule
    (``per_example.clip_factors``), the clipped gradients are summed onto the block, and
    ``add_noise`` adds N(0, sigma^2 C^2) per coordinate (from the canaries' generator) and
    divides by the expected lot size. Sets ``lot.released`` and ``lot.update``.
    """
    norms = lot.gradient_norms(clip_norm, norm_multiplier)
    block = lot.scatter(per_example.clip_factors(norms, clip_norm) * norms)
    add_noise(
        {"canaries": block},
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        generator=lot.generator,
    )
    lot.released = lot.update = block


def gaussian_law(
    *, clip_norm: float, noise_multiplier: float, expected_batch_size: float, sample_rate: float
) -> StepLaw:
    """The law DP-SGD claims for one canary coordinate: a clipped canary adds C, the noise has
    std sigma C, both divided by the expected lot size."""
    return StepLaw(
        "gaussian",
        scale=noise_multiplier * clip_norm / expected_batch_size,
        shift=clip_norm / expected_batch_size,
        sample_rate=sample_rate,
    )


def add_noise(
    total: dict[str, torch.Tensor],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """In place: ``(sum + N(0, sigma^2 C^2 I)) / expected_batch_size`` for every tensor."""
    std = noise_multiplier * clip_norm
    for t in total.values():
        noise = torch.normal(0.0, std, t.shape, generator=generator, device=t.device, dtype=t.dtype)
        t.add_(noise).div_(expected_batch_size)
    return total


# (model, x, y, canaries) -> (privatised mean gradient by parameter name, summed loss). A
# gradient function privatises the canary lot it is given (or None) in the same call.
GradientFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, CanaryLot | None], tuple[dict[str, torch.Tensor], float]
]
