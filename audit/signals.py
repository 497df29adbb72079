"""Signals: a model's logits on the whole population for Q queries, float32 [N, Q, C].

Queries are the example itself plus augmentations: a horizontal flip for natural (3-channel)
images, then one-pixel shifts; or, for a model whose inference is itself random, Q repeated
passes of the unchanged example. Batched, under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["model_logits", "query_transforms"]

Transform = Callable[[torch.Tensor], torch.Tensor]

_SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1))


def _shift(dy: int, dx: int) -> Transform:
    def apply(x: torch.Tensor) -> torch.Tensor:
        # zero-filled translation by (dy, dx) pixels
        padded = F.pad(x, (1, 1, 1, 1))
        h, w = x.shape[-2:]
        return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]

    return apply


def query_transforms(
    input_shape: tuple[int, ...], queries: int, *, stochastic: bool = False
) -> list[Transform]:
    """The Q input transforms: identity first, then augmentations (or identities if stochastic)."""
    if queries < 1:
        raise ValueError(f"queries must be >= 1, got {queries}")
    identity: Transform = lambda x: x  # noqa: E731
    if stochastic:
        return [identity] * queries
    options: list[Transform] = [identity]
    if len(input_shape) == 3:
        if input_shape[0] == 3:
            options.append(lambda x: torch.flip(x, dims=(-1,)))
        options += [_shift(dy, dx) for dy, dx in _SHIFTS]
    if queries > len(options):
        kind = "tabular data" if len(input_shape) != 3 else "these images"
        raise ValueError(f"at most {len(options)} distinct queries exist for {kind}, asked for {queries}")
    return options[:queries]


@torch.no_grad()
def model_logits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    queries: int = 1,
    stochastic: bool = False,
    batch_size: int = 1024,
) -> np.ndarray:
    """Logits float32 [N, Q, C] of ``model`` (eval mode) on every row of ``x``."""
    transforms = query_transforms(tuple(x.shape[1:]), queries, stochastic=stochastic)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        out.append(torch.stack([model(t(xb)) for t in transforms], dim=1).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy()
