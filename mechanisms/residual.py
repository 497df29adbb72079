"""Residual perturbation (Tao, Ling, Shi, Wang; arXiv:2408.05723; ICLR 2021 submission).

MECHANISMS.md section 2. No code or full text of the paper was available: the forward pass is
a labelled reconstruction. Every residual block's join ``y = shortcut + branch`` gets Gaussian
noise, fresh per example, per block and per forward pass:

* strategy ``1`` (multiplicative, SDE dx = F dt + gamma x dB): ``y + gamma * x * xi``, with x
  the block input as it reaches the join (the shortcut path);
* strategy ``2`` (additive, dx = F dt + gamma dB): ``y + gamma * xi``;
* ``branch`` (noise in the residual mapping): ``shortcut + branch * (1 + gamma * xi)``.

Training is ordinary SGD on the noisy network: no per-example gradients, no clipping. The
noise stays on at inference (``perturb_at_eval``, the only setting in which any DP claim about
the released model could hold); predictions average the softmax over ``eval_passes`` passes.
There is no formal guarantee here: the published theorem's assumptions are not verified, so
runs say ``formal: false`` and the leakage is measured empirically by the attacks.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .base import Mechanism, Privacy, TrainConfig, TrainResult
from .models import PerturbationSlot, residual_blocks
from .registry import register_mechanism
from .sgd import train_sgd

__all__ = ["NoisySlot", "ResidualConfig", "SoftmaxEnsemble", "install_noise", "train_residual"]

STRATEGIES = ("1", "2", "branch")
NOTE = (
    "residual perturbation: no formal guarantee. The published DP theorem's assumptions are not "
    "verified here and no epsilon is computed; leakage is measured empirically by the attacks."
)


@dataclass(frozen=True, kw_only=True)
class ResidualConfig(TrainConfig):
    """SGD options plus the noise: strategy, gamma, inference noise and passes."""

    strategy: str = "2"
    gamma: float = 0.1
    perturb_at_eval: bool = True
    eval_passes: int = 1
    ensemble: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.eval_passes < 1:
            raise ValueError(f"eval_passes must be >= 1, got {self.eval_passes}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {self.ensemble}")


class NoisySlot(PerturbationSlot):
    """A perturbation slot that adds Gaussian noise at the residual join.

    Noise comes from ``generator`` (seeded by the mechanism, so runs are reproducible and the
    global RNG is untouched); it is drawn in training mode, and in eval mode only when
    ``perturb_at_eval``.
    """

    def __init__(
        self, strategy: str, gamma: float, perturb_at_eval: bool, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.strategy, self.gamma, self.perturb_at_eval = strategy, gamma, perturb_at_eval
        self.generator = generator

    def _normal(self, like: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return torch.empty_like(like).normal_(mean, std, generator=self.generator)

    def forward(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0 or (not self.training and not self.perturb_at_eval):
            return shortcut + branch
        # The noise draw is most of this mechanism's cost over plain SGD, so each strategy is
        # one draw and one fused operation; the multiplicative ones draw m = 1 + gamma xi
        # directly as N(1, gamma^2), and their backward is a single product with m.
        if self.strategy == "1":  # shortcut + branch + gamma * x * xi = branch + x * m
            return torch.addcmul(branch, shortcut, self._normal(shortcut, 1.0, self.gamma))
        if self.strategy == "2":  # shortcut + branch + gamma * xi, xi drawn with std gamma
            return (shortcut + branch).add_(self._normal(shortcut, 0.0, self.gamma))
        # branch: shortcut + branch * (1 + gamma xi) = shortcut + branch * m
        return torch.addcmul(shortcut, branch, self._normal(branch, 1.0, self.gamma))

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, gamma={self.gamma}, perturb_at_eval={self.perturb_at_eval}"


class SoftmaxEnsemble(nn.Module):
    """E independently trained members averaged at the softmax.

    ``forward`` returns ``log(mean_e softmax(member_e(x)))``: log-probabilities, usable as
    logits (their softmax is the averaged softmax), so accuracy and attack signals need nothing
    special.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.members))


def _reinitialise(module: nn.Module, seed: int) -> nn.Module:
    """Fresh default initialisation of every layer, from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if m is not module and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return module


def _slot_seed(seed: int, member: int, purpose: int = 0) -> int:
    """Independent seeds per member: ``purpose`` 0 for the noise, 1 for the initialisation."""
    return int(np.random.SeedSequence([seed % 2**63, purpose, member]).generate_state(1)[0])


def install_noise(model: nn.Module, config: TrainConfig, seed: int) -> nn.Module:
    """The released predictor: noisy slots in every residual block; with ``ensemble`` E > 1,
    E copies of the architecture (members 1..E-1 freshly initialised) averaged at the softmax.
    ``seed`` has no default: a default would give every caller that omits it the same noise.

    Returns ``model`` itself (slots filled in place) when E = 1, else a :class:`SoftmaxEnsemble`.
    """
    assert isinstance(config, ResidualConfig)
    if isinstance(model, SoftmaxEnsemble):
        for i, member in enumerate(model.members):
            _install_slots(member, config, _slot_seed(seed, i))
        return model
    if config.ensemble > 1:
        members = [model] + [
            _reinitialise(copy.deepcopy(model), _slot_seed(seed, i, purpose=1))
            for i in range(1, config.ensemble)
        ]
        return install_noise(SoftmaxEnsemble(members), config, seed)
    return _install_slots(model, config, seed)


def _install_slots(model: nn.Module, config: ResidualConfig, seed: int) -> nn.Module:
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            "residual perturbation needs a model with residual blocks (resnet8, resnet20, or a user "
            "model built from mechanisms.models.BasicBlock); this model has none"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for block in blocks:
        block.perturb = NoisySlot(config.strategy, config.gamma, config.perturb_at_eval, generator)
    return model


def train_residual(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, config: ResidualConfig, generator: torch.Generator
) -> TrainResult:
    """Install the noise (seeded from ``generator``) and train with ordinary SGD."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    model = install_noise(model, config, seed)
    members = list(model.members) if isinstance(model, SoftmaxEnsemble) else [model]
    history: list[dict[str, float]] = []
    for i, member in enumerate(members):  # independent training runs on the same data
        result = train_sgd(member, x, y, config=config, generator=generator)
        history += [{**h, "member": i} for h in result.history] if len(members) > 1 else result.history
    privacy = Privacy(formal=False, note=NOTE)
    extras = {
        "strategy": config.strategy,
        "gamma": config.gamma,
        "perturb_at_eval": config.perturb_at_eval,
        "eval_passes": config.eval_passes,
        "ensemble": config.ensemble,
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state, history, None, privacy, extras)


def _refuse_non_residual(model: nn.Module) -> None:
    if not residual_blocks(model):
        raise ValueError(
            "residual perturbation needs a model with residual blocks (resnet8 or resnet20); "
            f"{type(model).__name__} has none"
        )


RESIDUAL = register_mechanism(
    Mechanism(
        "residual",
        ResidualConfig,
        train_residual,
        "residual perturbation: Gaussian noise in every residual block (no formal guarantee)",
        validate_model=_refuse_non_residual,
        prepare=install_noise,
        stochastic=lambda c: bool(getattr(c, "gamma", 0) > 0 and getattr(c, "perturb_at_eval", False)),
        eval_passes=lambda c: int(getattr(c, "eval_passes", 1)),
    )
)
