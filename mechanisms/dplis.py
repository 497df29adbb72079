"""DPlis: DP-SGD with randomized smoothing of the loss (Wang et al., PoPETs 2021).

MECHANISMS.md section 5, from the authors' code (``wangwenxiao/DPlis``, ``dp_train.py``,
``--mode smooth_loss``). Each step replaces example i's gradient by
``h_i = sum_k grad l(theta + xi_k; z_i)`` over K parameter perturbations
``xi_k ~ N(0, sigma_s^2 I)`` drawn once per step and shared by the whole lot; ``h_i`` is then
clipped, summed, noised and applied exactly as in DP-SGD. The perturbations do not depend on
the data and each example's contribution is still clipped to C, so the privacy analysis, the
DpEvent and the epsilon are DP-SGD's.

The smoothing std follows the reference code's units: ``sigma_s = r * (lr / B) * sigma * C``
(``lr`` the current mean-gradient learning rate, so the radius follows the schedule; B the
expected lot size), or an absolute ``smooth_sigma``. The code sums over k (``smooth_reduce =
"sum"``, the default); ``"mean"`` averages, which differs only where clipping does not bind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Mechanism, TrainResult
from .canaries import CanaryLot, GradientCanaries
from .dpsgd import (
    DpSgdConfig,
    DpSgdPlan,
    GradientFn,
    add_noise,
    privatise_canaries,
    refuse_batchnorm,
    train_private,
)
from .per_example import Workspace, clip_and_sum, ghost_per_example_grads, ghost_supported, per_example_grads
from .registry import register_mechanism

__all__ = ["DplisConfig", "dplis_gradient", "smoothed_noisy_gradient", "smoothing_sigma", "train_dplis"]


@dataclass(frozen=True, kw_only=True)
class DplisConfig(DpSgdConfig):
    """DP-SGD options plus the smoothing: K samples, radius r (or an absolute std)."""

    smooth_samples: int = 10
    smooth_radius: float = 1.0
    smooth_sigma: float | None = None
    smooth_reduce: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.smooth_samples < 1:
            raise ValueError(f"smooth_samples must be >= 1, got {self.smooth_samples}")
        if self.smooth_radius < 0:
            raise ValueError(f"smooth_radius must be >= 0, got {self.smooth_radius}")
        if self.smooth_sigma is not None and self.smooth_sigma < 0:
            raise ValueError(f"smooth_sigma must be >= 0, got {self.smooth_sigma}")
        if self.smooth_reduce not in ("sum", "mean"):
            raise ValueError(f"smooth_reduce must be 'sum' or 'mean', got {self.smooth_reduce!r}")


def smoothing_sigma(config: DplisConfig, plan: DpSgdPlan, lr: float) -> float:
    """``smooth_sigma`` if set, else ``r * (lr / B) * sigma * C`` (the reference code's units)."""
    if config.smooth_sigma is not None:
        return config.smooth_sigma
    return config.smooth_radius * (lr / plan.expected_batch_size) * plan.noise_multiplier * config.clip_norm


def smoothed_noisy_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    smooth_sigma: float,
    smooth_samples: int,
    generator: torch.Generator,
    reduce: str = "sum",
    physical_batch_size: int = 1024,
    workspace: Workspace | None = None,
    engine: str = "auto",
    canaries: CanaryLot | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """DPlis's privatised mean gradient of one lot and the lot's summed (non-private) loss.

    A ``canaries`` lot is privatised as DPlis privatises an example: a canary's gradient does
    not depend on the parameters, so its ``h`` is K summed over the K samples (or averaged),
    then clipped, summed and noised by DP-SGD's code.

    The K perturbations are drawn first (none when ``smooth_sigma`` is 0, so that the noise
    that follows is DP-SGD's draw for draw), shared by every example and every physical chunk.
    Memory is B x d for the accumulated ``h``: never K x B x d. The model's parameters are
    shifted in place to theta + xi_k for each k and always restored exactly.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    original = {n: p.detach().clone() for n, p in params.items()}
    perturbations: list[dict[str, torch.Tensor] | None] = []
    for _ in range(smooth_samples):
        if smooth_sigma > 0:
            perturbations.append(
                {
                    n: torch.normal(
                        0.0, smooth_sigma, p.shape, generator=generator, device=p.device, dtype=p.dtype
                    )
                    for n, p in params.items()
                }
            )
        else:
            perturbations.append(None)
    if engine == "ghost" and not ghost_supported(model):
        raise ValueError("engine 'ghost' does not support this model's layers; use 'vmap'")
    fast = engine != "vmap" and ghost_supported(model)
    workspace = workspace or Workspace()
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    loss_sum = 0.0
    try:
        for start in range(0, len(y), physical_batch_size):
            xb, yb = x[start : start + physical_batch_size], y[start : start + physical_batch_size]
            # h lives in the workspace: a fresh B x d allocation per step costs page faults
            h = {
                n: workspace.get((-1, f"dplis.{n}"), (len(yb), *p.shape), p).zero_()
                for n, p in params.items()
            }
            for xi in perturbations:
                with torch.no_grad():  # evaluate at theta + xi_k
                    for n, p in params.items():
                        p.copy_(original[n] if xi is None else original[n] + xi[n])
                if fast:
                    g = ghost_per_example_grads(model, xb, yb, workspace=workspace)
                else:
                    g = per_example_grads(model, xb, yb)
                for n in h:
                    h[n].add_(g[n])
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(original[n])
                loss_sum += float(nn.functional.cross_entropy(model(xb), yb, reduction="sum"))
            if reduce == "mean":
                h = {n: t / smooth_samples for n, t in h.items()}
            summed, _ = clip_and_sum(h, clip_norm)
            for n, t in summed.items():
                total[n] += t
    finally:
        with torch.no_grad():  # whatever happens, the model leaves with its own parameters
            for n, p in params.items():
                p.copy_(original[n])
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
            norm_multiplier=float(smooth_samples) if reduce == "sum" else 1.0,
        )
    return total, loss_sum


def dplis_gradient(
    config: DplisConfig, plan: DpSgdPlan, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> GradientFn:
    """DPlis's privatised gradient of a lot; sigma_s follows the optimizer's current lr."""
    workspace = Workspace()

    def gradient(
        m: nn.Module, xb: torch.Tensor, yb: torch.Tensor, canaries: CanaryLot | None = None
    ) -> tuple[dict[str, torch.Tensor], float]:
        return smoothed_noisy_gradient(
            m,
            xb,
            yb,
            clip_norm=config.clip_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            smooth_sigma=smoothing_sigma(config, plan, optimizer.param_groups[0]["lr"]),
            smooth_samples=config.smooth_samples,
            generator=generator,
            reduce=config.smooth_reduce,
            physical_batch_size=config.physical_batch_size,
            workspace=workspace,
            engine=config.engine,
            canaries=canaries,
        )

    return gradient


def train_dplis(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: DplisConfig,
    generator: torch.Generator,
    canaries: GradientCanaries | None = None,
) -> TrainResult:
    """Train with DPlis; privacy accounting identical to DP-SGD's (same DpEvent), and so is
    the law a canary coordinate follows."""
    return train_private(
        model,
        x,
        y,
        config=config,
        generator=generator,
        name="dplis",
        make_gradient=lambda plan, optimizer: dplis_gradient(config, plan, optimizer, generator),
        note="DPlis (DP-SGD with loss smoothing): the same Poisson-sampled Gaussian event as DP-SGD; "
        "epsilon from dp-accounting",
        canaries=canaries,
    )


DPLIS = register_mechanism(
    Mechanism(
        "dplis",
        DplisConfig,
        train_dplis,
        "DPlis: DP-SGD with randomized smoothing of the loss (formal epsilon, as DP-SGD)",
        validate_model=refuse_batchnorm,
        gradient_canaries=True,
    )
)
