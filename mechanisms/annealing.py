"""Simulated annealing for update screening (SA-DPSGD): the acceptance probability of a step that
raised the (noisy) loss, the annealer that decides with it, and the snapshot a rejected step
is rolled back to. :mod:`mechanisms.screening` holds the mechanism, its test and accounting.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["Annealer", "Snapshot", "acceptance_probability"]


def acceptance_probability(delta_e: float, accepted: int, rate: float) -> float:
    """``1`` if the loss did not rise, else ``exp(-dE * k * t)`` (t accepted steps so far)."""
    if delta_e <= 0:
        return 1.0
    return math.exp(-delta_e * rate * accepted)


class Annealer:
    """The acceptance rule's state: accepted steps t and consecutive rejections mu."""

    def __init__(self, rate: float, max_rejections: int) -> None:
        self.rate, self.max_rejections = rate, max_rejections
        self.accepted = self.rejections = self.forced = self.candidates = 0

    def decide(self, delta_e: float, u: float) -> bool:
        """Accept or reject a candidate with loss change ``delta_e``, ``u`` ~ U(0, 1)."""
        self.candidates += 1
        if self.rejections >= self.max_rejections:
            accept = True
            self.forced += int(u >= acceptance_probability(delta_e, self.accepted, self.rate))
        else:
            accept = u < acceptance_probability(delta_e, self.accepted, self.rate)
        if accept:
            self.accepted += 1
            self.rejections = 0
        else:
            self.rejections += 1
        return accept


class Snapshot:
    """A copy of a model's state dict, its optimizer's per-parameter state and ``extra``
    tensors that step with the model (an audit's canary block)."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: list[torch.Tensor] | None = None
    ) -> None:
        self.model, self.optimizer, self.extra = model, optimizer, list(extra or [])
        self.take()

    @staticmethod
    def _copy(value: Any) -> Any:
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    def take(self) -> None:
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.extra_values = [t.detach().clone() for t in self.extra]
        self.state = {p: {k: self._copy(v) for k, v in s.items()} for p, s in self.optimizer.state.items()}

    def restore(self, optimizer: bool = True) -> None:
        """Back to the snapshot: the weights (and canary block) always, the optimizer's state
        (momentum) when ``optimizer``."""
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.weights[k])
            for t, value in zip(self.extra, self.extra_values, strict=True):
                t.copy_(value)
        if not optimizer:
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self.optimizer.state[p] = {k: self._copy(v) for k, v in self.state[p].items()}
                else:
                    self.optimizer.state.pop(p, None)
