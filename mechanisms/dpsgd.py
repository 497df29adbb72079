"""DP-SGD (Abadi et al. 2016) with Opacus conventions (MECHANISMS.md section 1).

Each step: a Poisson-sampled lot; per-example gradients clipped to L2 norm C over all
parameters; Gaussian noise N(0, sigma^2 C^2) added to the sum; the sum divided by the
*expected* lot size; the optimizer (SGD, momentum or Adam) steps on that noisy gradient only.
The run is described by a DpEvent (Poisson-sampled Gaussian composed over the steps taken) and
epsilon comes from a dp-accounting accountant.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from dp_accounting import DpEvent
from torch import nn

from .accounting import ACCOUNTANTS, calibrate_noise_multiplier, dpsgd_event, epsilon
from .base import Mechanism, Privacy, TrainConfig, TrainResult
from .canaries import CanaryLot, GradientCanaries, StepLaw
from .per_example import Workspace
from .privatise import GradientFn, add_noise, gaussian_law, noisy_gradient, privatise_canaries
from .registry import register_mechanism
from .sampling import poisson_lot, steps_per_epoch
from .training import check_finite, make_optimizer, make_scheduler, progress_bar

__all__ = [
    "DpSgdConfig",
    "DpSgdPlan",
    "GradientFn",
    "add_noise",
    "dpsgd_epoch",
    "dpsgd_gradient",
    "dpsgd_law",
    "dpsgd_step",
    "gaussian_law",
    "noisy_gradient",
    "plan_dpsgd",
    "privatise_canaries",
    "refuse_batchnorm",
    "train_dpsgd",
    "train_private",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DpSgdConfig(TrainConfig):
    """DP-SGD options. Give exactly one of ``noise_multiplier`` or ``epsilon``.

    ``batch_size`` is the expected lot size qN. ``physical_batch_size`` bounds how many
    examples go through the per-example engine at once (memory only; the maths is unchanged).
    """

    # Defaults tuned for the tanh CNN on mnist5k (held-out accuracy about 0.93 at epsilon 8).
    epochs: int = 40
    batch_size: int = 256
    lr: float = 0.1
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: str = "pld"
    allow_large_delta: bool = False
    physical_batch_size: int = 1024
    engine: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.noise_multiplier is None) == (self.epsilon is None):
            raise ValueError("give exactly one of noise_multiplier or epsilon")
        if self.noise_multiplier is not None and not (self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.epsilon is not None and not (self.epsilon > 0):
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.clip_norm > 0):
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be >= 1, got {self.physical_batch_size}")
        if self.engine not in ("auto", "ghost", "vmap"):
            raise ValueError(f"engine must be auto, ghost or vmap, got {self.engine!r}")


@dataclass(frozen=True)
class DpSgdPlan:
    """The privacy-relevant numbers of a run, fixed before training starts."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    expected_batch_size: float


def refuse_batchnorm(model: nn.Module) -> None:
    """Raise if ``model`` has BatchNorm (or InstanceNorm with running statistics): they mix
    examples, so per-example clipping is void."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise ValueError(
                f"module {name or 'model'!r} is {type(module).__name__} with running statistics: they average "
                "over the examples of every batch, outside per-example clipping. Use track_running_stats=False "
                "or GroupNorm."
            )
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"module {name or 'model'!r} is {type(module).__name__}: BatchNorm mixes the "
                "examples of a batch, so per-example gradients and the DP guarantee do not "
                "hold. Use GroupNorm or LayerNorm instead."
            )


def check_delta(delta: float, n: int, allow_large: bool) -> None:
    """delta must be below 1/N (MECHANISMS.md section 1): an error unless explicitly allowed."""
    if delta >= 1.0 / n:
        msg = (
            f"delta={delta} is not below 1/N = {1.0 / n:.3g} for N = {n} training examples; "
            "such a delta allows leaking a whole record with non-negligible probability"
        )
        if not allow_large:
            raise ValueError(msg + " (pass --allow-large-delta to accept it anyway)")
        warnings.warn("WEAK GUARANTEE: " + msg, stacklevel=3)


def plan_dpsgd(
    config: DpSgdConfig, n: int, make_event: Callable[[float, float, int], DpEvent] | None = None
) -> DpSgdPlan:
    """Sample rate q = B/N, steps = epochs * round(1/q), and the noise multiplier.

    With ``config.epsilon`` the multiplier is calibrated with dp-accounting so that the whole
    run's epsilon at ``config.delta`` is at most the target. ``make_event(sigma, q, steps)``
    describes the whole run for calibration (default: DP-SGD's event); mechanisms that spend
    privacy elsewhere too (screening's noisy acceptance test) pass their own.
    """
    make_event = make_event or (lambda s, q, t: dpsgd_event(noise_multiplier=s, sample_rate=q, steps=t))
    if config.batch_size > n:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {n} training examples")
    check_delta(config.delta, n, config.allow_large_delta)
    q = config.batch_size / n
    steps = config.epochs * steps_per_epoch(n, q)
    sigma = config.noise_multiplier
    if sigma is None:
        assert config.epsilon is not None
        sigma = calibrate_noise_multiplier(
            target_epsilon=config.epsilon,
            delta=config.delta,
            make_event=lambda s: make_event(s, q, steps),
            accountant=config.accountant,
        )
        logger.info("calibrated noise multiplier %.4f for epsilon %s", sigma, config.epsilon)
    return DpSgdPlan(q, steps, float(sigma), q * n)


def dpsgd_gradient(config: DpSgdConfig, plan: DpSgdPlan, generator: torch.Generator) -> GradientFn:
    """DP-SGD's privatised gradient of a lot, with a workspace shared across steps."""
    workspace = Workspace()

    def gradient(
        model: nn.Module, x: torch.Tensor, y: torch.Tensor, canaries: CanaryLot | None = None
    ) -> tuple[dict[str, torch.Tensor], float]:
        return noisy_gradient(
            model,
            x,
            y,
            clip_norm=config.clip_norm,
            noise_multiplier=plan.noise_multiplier,
            expected_batch_size=plan.expected_batch_size,
            generator=generator,
            physical_batch_size=config.physical_batch_size,
            engine=config.engine,
            workspace=workspace,
            canaries=canaries,
        )

    return gradient


def dpsgd_step(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    plan: DpSgdPlan,
    gradient: GradientFn,
    generator: torch.Generator,
    at: tuple[int, int],
    canaries: GradientCanaries | None = None,
    release: bool = True,
) -> tuple[float, int]:
    """One step: a Poisson lot, its privatised gradient, the optimizer and schedule steps.

    ``params`` are the model's trainable parameters by name; ``at`` is (epoch, step) for the
    non-finite-loss error. Returns the lot's summed (non-private) loss and its size.
    ``canaries`` draw their lot with the same sampler and rate (their own generator), are
    privatised by the same gradient function and stepped by the same optimizer; the step is
    recorded as released unless ``release`` is False (the caller then commits or discards it).
    """
    lot = poisson_lot(len(y), plan.sample_rate, generator)
    canary_lot = canaries.draw(plan.sample_rate, poisson_lot) if canaries is not None else None
    grads, loss_sum = gradient(model, x[lot], y[lot], canary_lot)
    if len(lot):
        check_finite(loss_sum, *at)
    for name, g in grads.items():
        params[name].grad = g
    if canaries is not None:
        assert canary_lot is not None
        canaries.record(canary_lot)
        if release:
            canaries.commit()
    optimizer.step()
    scheduler.step()
    return loss_sum, len(lot)


def dpsgd_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    plan: DpSgdPlan,
    config: DpSgdConfig,
    generator: torch.Generator,
    epoch: int = 1,
    gradient: GradientFn,
    on_step: Callable[[], None] | None = None,
    canaries: GradientCanaries | None = None,
) -> float:
    """One epoch (``plan.steps / epochs`` Poisson lots) of DP-SGD; returns the mean train loss.

    ``gradient`` computes a lot's privatised gradient (:func:`dpsgd_gradient` for DP-SGD);
    mechanisms built on DP-SGD (DPlis) pass their own. The loss is a diagnostic computed on private data
    without noise: it is not covered by the DP guarantee and never used by training.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total, count = 0.0, 0
    for step in range(1, plan.steps // config.epochs + 1):
        loss_sum, size = dpsgd_step(
            model,
            params,
            optimizer,
            scheduler,
            x,
            y,
            plan=plan,
            gradient=gradient,
            generator=generator,
            at=(epoch, step),
            canaries=canaries,
        )
        total += loss_sum
        count += size
        if on_step is not None:
            on_step()
    return total / max(1, count)


def train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: DpSgdConfig,
    generator: torch.Generator,
    name: str = "dpsgd",
    make_gradient: Callable[[DpSgdPlan, torch.optim.Optimizer], GradientFn] | None = None,
    note: str = "",
    make_event: Callable[[float, float, int], DpEvent] | None = None,
    extras: dict | None = None,
    canaries: GradientCanaries | None = None,
    make_law: Callable[[DpSgdPlan], StepLaw] | None = None,
) -> TrainResult:
    """The DP-SGD training loop and accounting, for DP-SGD and mechanisms that reuse both.

    ``make_event(sigma, q, steps)`` describes the run for calibration and the final epsilon
    (default: DP-SGD's Poisson-sampled Gaussian event). With ``canaries``, ``make_law(plan)``
    states the per-step law the mechanism claims for a canary coordinate (default: DP-SGD's).
    """
    refuse_batchnorm(model)
    make_event = make_event or (lambda s, q, t: dpsgd_event(noise_multiplier=s, sample_rate=q, steps=t))
    plan = plan_dpsgd(config, len(y), make_event)
    if canaries is not None:
        canaries.law = (make_law or (lambda p: dpsgd_law(config, p)))(plan)
    optimizer = make_optimizer(model, config, canaries.parameters() if canaries is not None else ())
    scheduler = make_scheduler(optimizer, config, plan.steps)
    gradient = make_gradient(plan, optimizer) if make_gradient else dpsgd_gradient(config, plan, generator)
    history: list[dict[str, float]] = []
    model.train()
    with progress_bar(plan.steps, name, config.progress) as bar:
        for epoch in range(1, config.epochs + 1):
            loss = dpsgd_epoch(
                model,
                optimizer,
                scheduler,
                x,
                y,
                plan=plan,
                config=config,
                generator=generator,
                epoch=epoch,
                on_step=lambda: bar.update(1),
                gradient=gradient,
                canaries=canaries,
            )
            history.append({"epoch": epoch, "train_loss": loss})
    event = make_event(plan.noise_multiplier, plan.sample_rate, plan.steps)
    eps = epsilon(event, delta=config.delta, accountant=config.accountant)
    privacy = Privacy(
        formal=True,
        epsilon=eps,
        delta=config.delta,
        accountant=config.accountant,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps,
        clip_norm=config.clip_norm,
        note=note
        or "DP-SGD with Poisson sampling; epsilon from dp-accounting "
        f"({config.accountant.upper()}), add/remove-one adjacency",
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state, history, event, privacy, dict(extras or {}))


def dpsgd_law(config: DpSgdConfig, plan: DpSgdPlan) -> StepLaw:
    """DP-SGD's claimed per-step law for a canary coordinate (see :func:`gaussian_law`)."""
    return gaussian_law(
        clip_norm=config.clip_norm,
        noise_multiplier=plan.noise_multiplier,
        expected_batch_size=plan.expected_batch_size,
        sample_rate=plan.sample_rate,
    )


def train_dpsgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: DpSgdConfig,
    generator: torch.Generator,
    canaries: GradientCanaries | None = None,
) -> TrainResult:
    """Train with DP-SGD; returns the weights, history, DpEvent and the accounted epsilon.

    ``canaries`` (optional) audit the privatisation white-box, riding along in the same run.
    """
    return train_private(model, x, y, config=config, generator=generator, name="dpsgd", canaries=canaries)


DPSGD = register_mechanism(
    Mechanism(
        "dpsgd",
        DpSgdConfig,
        train_dpsgd,
        "DP-SGD: per-example clipping, Poisson sampling, Gaussian noise (formal epsilon)",
        validate_model=refuse_batchnorm,
        gradient_canaries=True,
    )
)
