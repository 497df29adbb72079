"""Poisson sampling of lots: each example joins a lot independently with probability q.

Lots vary in size (Binomial(N, q)); DP-SGD divides the noisy sum by the *expected* size qN.
Shuffling into fixed-size batches is not Poisson sampling, and the accountant's epsilon would
not apply to it (MECHANISMS.md section 1, pitfall 1).
"""

from __future__ import annotations

import torch

__all__ = ["poisson_lot", "steps_per_epoch"]


def poisson_lot(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of one Poisson-sampled lot from ``n`` examples (int64, sorted, maybe empty)."""
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    mask = torch.rand(n, generator=generator, device=generator.device) < sample_rate
    return mask.nonzero().flatten()


def steps_per_epoch(n: int, sample_rate: float) -> int:
    """Number of lots that make one expected pass over ``n`` examples: round(1/q), at least 1.

    >>> steps_per_epoch(2500, 64 / 2500)
    39
    """
    return max(1, round(1.0 / sample_rate))
