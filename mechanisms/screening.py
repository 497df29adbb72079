"""SA-DPSGD: DP-SGD with simulated-annealing update screening (Fu, Chen, Ling 2022).

MECHANISMS.md section 4, from the authors' deleted code (v2, ``SGD_and_DP/SA_DPSGD.py``). Each
DP-SGD step yields a *candidate*; its loss change dE against the last accepted model decides:
accept when dE <= 0, otherwise accept with probability ``exp(-dE * k * t)`` (t = accepted steps
so far, k the annealing rate); a rejection restores the parameters of the last accepted model
(and, in the sound variant by default, the optimizer state: ``restore_optimizer``); after ``max_rejections`` consecutive rejections the next candidate
is accepted by force.

Two variants:

* ``published``: dE is the plain mean cross-entropy on ``validation_size`` examples held out of
  the training data (the authors' second version), read without noise; training runs until the
  planned number of steps has been *accepted*, and epsilon counts the accepted steps only, as
  published. Neither is sound (rejected candidates still shape every later iterate; the
  held-out examples get no protection at all), so the run says ``formal: false`` and records the
  epsilon that counting every candidate would give beside the published one.
* ``sound`` (default): dE is the sum over a Poisson-sampled batch of the training data (rate
  ``validation_size / N``) of per-example loss differences clipped to ``[-C_v, C_v]``, released
  with Gaussian noise of std ``2 C_v sigma_v`` and divided by the expected batch size (the
  DPSUR test). Every candidate step is counted; the run is the composition of two
  Poisson-sampled Gaussian events (training ``(q, sigma)``, test ``(q_v, sigma_v)``) in
  dp-accounting. With add/remove adjacency the test's sensitivity is ``C_v``; the noise is
  sized for ``2 C_v`` (replace-one), so the accounting of the test is conservative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dp_accounting
import torch
from dp_accounting import DpEvent
from torch import nn
from torch.nn import functional as F

from .accounting import dpsgd_event, epsilon
from .annealing import Annealer, Snapshot, acceptance_probability
from .base import Mechanism, Privacy, TrainResult
from .canaries import GradientCanaries
from .dpsgd import (
    DpSgdConfig,
    DpSgdPlan,
    dpsgd_gradient,
    dpsgd_law,
    dpsgd_step,
    plan_dpsgd,
    refuse_batchnorm,
)
from .registry import register_mechanism
from .sampling import poisson_lot, steps_per_epoch
from .training import make_optimizer, make_scheduler, progress_bar

__all__ = [
    "VARIANTS",
    "Annealer",
    "ScreeningConfig",
    "Snapshot",
    "acceptance_probability",
    "noisy_loss_change",
    "screening_event",
    "train_screening",
]

VARIANTS = ("sound", "published")


@dataclass(frozen=True, kw_only=True)
class ScreeningConfig(DpSgdConfig):
    """DP-SGD options plus the screening.

    ``anneal_rate`` is k, ``max_rejections`` is mu0. ``validation_size`` is the number of
    held-out examples (``published``) or the expected size of the Poisson-sampled test batch
    (``sound``). ``validation_clip`` (C_v) and ``validation_noise_multiplier`` (sigma_v) size
    the sound variant's noisy test. DPSUR uses C_v = 0.001 with a threshold rule; the annealing
    rule ``exp(-dE k t)`` needs dE on the scale of a loss change, so C_v defaults to 0.1 (with
    0.001 every candidate is accepted). DPSUR's sigma_v in [0.8, 1.3] is for N = 60,000; on a
    training set of a few thousand the test batch is a much larger share of the data, so sigma_v
    defaults to 8 (the released value is one scalar, which stays informative: up to 256 C_v of
    signal against 16 C_v of noise), costing about 0.02 of epsilon 8 on mnist5k.
    """

    variant: str = "sound"
    anneal_rate: float = 10.0
    max_rejections: int = 5
    validation_size: int = 256
    validation_clip: float = 0.1
    validation_noise_multiplier: float = 8.0
    # a rejection restores the optimizer's state (momentum) too; None: as each variant's
    # default (sound: yes, a rejected candidate leaves no trace in any state; published: no,
    # the published code restores the weights only)
    restore_optimizer: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not (self.anneal_rate >= 0) or not math.isfinite(self.anneal_rate):
            raise ValueError(f"anneal_rate must be a finite number >= 0, got {self.anneal_rate}")
        if self.max_rejections < 0:
            raise ValueError(f"max_rejections must be >= 0, got {self.max_rejections}")
        if self.validation_size < 1:
            raise ValueError(f"validation_size must be >= 1, got {self.validation_size}")
        if not (self.validation_clip > 0):
            raise ValueError(f"validation_clip must be > 0, got {self.validation_clip}")
        if not (self.validation_noise_multiplier > 0):
            raise ValueError(
                f"validation_noise_multiplier must be > 0, got {self.validation_noise_multiplier}"
            )


def screening_event(
    *, noise_multiplier: float, sample_rate: float, steps: int, test_noise_multiplier: float, test_rate: float
) -> DpEvent:
    """The sound variant's run: ``steps`` training steps and ``steps`` noisy tests, composed."""
    return dp_accounting.ComposedDpEvent(
        [
            dpsgd_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps),
            dpsgd_event(noise_multiplier=test_noise_multiplier, sample_rate=test_rate, steps=steps),
        ]
    )


@torch.no_grad()
def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Per-example cross-entropy of ``model`` (no gradient)."""
    out = [
        F.cross_entropy(model(x[i : i + batch]), y[i : i + batch], reduction="none")
        for i in range(0, len(y), batch)
    ]
    return torch.cat(out) if out else torch.zeros(0, device=x.device)


def noisy_loss_change(
    before: torch.Tensor,
    after: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    expected_size: float,
    generator: torch.Generator,
) -> float:
    """The sound test's release: ``(sum_i clip(after_i - before_i) + N(0, (2 C_v sigma_v)^2)) / b_v``.

    Each example's loss difference is clipped to ``[-C_v, C_v]``, so adding or removing one
    example moves the sum by at most C_v (2 C_v under replace-one, the noise's scale).
    """
    diff = (after - before).clamp(-clip, clip)
    noise = torch.normal(0.0, 2 * clip * noise_multiplier, (1,), generator=generator, device=generator.device)
    return (float(diff.sum()) + float(noise)) / expected_size


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand(1, generator=generator, device=generator.device))


def train_screening(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: ScreeningConfig,
    generator: torch.Generator,
    canaries: GradientCanaries | None = None,
) -> TrainResult:
    """Train with SA-DPSGD screening; see the module docstring for the two variants.

    ``canaries`` step with every candidate and are rolled back with it; only accepted steps
    are released, so only they enter the white-box-steps statistics. The acceptance test reads
    the real model only (the canary block does not change any loss), so the decisions carry no
    information about the canaries.
    """
    refuse_batchnorm(model)
    published = config.variant == "published"
    restore_optimizer = not published if config.restore_optimizer is None else config.restore_optimizer
    if published:
        if config.validation_size >= len(y):
            raise ValueError(
                f"validation_size {config.validation_size} leaves no training data out of {len(y)} examples"
            )
        order = torch.randperm(len(y), generator=generator, device=generator.device).to(x.device)
        held, train = order[: config.validation_size], order[config.validation_size :]
        xv, yv = x[held], y[held]
        x, y = x[train], y[train]
        plan = plan_dpsgd(config, len(y))
        test_rate = 0.0
    else:
        if config.validation_size > len(y):
            raise ValueError(
                f"validation_size {config.validation_size} exceeds the {len(y)} training examples"
            )
        test_rate = config.validation_size / len(y)
        sigma_v = config.validation_noise_multiplier
        plan = plan_dpsgd(
            config,
            len(y),
            make_event=lambda s, q, t: screening_event(
                noise_multiplier=s, sample_rate=q, steps=t, test_noise_multiplier=sigma_v, test_rate=test_rate
            ),
        )
    extra = canaries.parameters() if canaries is not None else []
    if canaries is not None:
        canaries.law = dpsgd_law(config, plan)
    optimizer = make_optimizer(model, config, extra)
    scheduler = make_scheduler(optimizer, config, plan.steps)
    gradient = dpsgd_gradient(config, plan, generator)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    annealer = Annealer(config.anneal_rate, config.max_rejections)
    snapshot = Snapshot(model, optimizer, extra)
    per_epoch = steps_per_epoch(len(y), plan.sample_rate)
    accepted_loss = math.inf  # published: L_acc starts at +infinity, so the first step is accepted
    history: list[dict[str, float]] = []
    loss_total, loss_count = 0.0, 0

    def done() -> bool:
        # published: until the planned number of steps is *accepted*; sound: candidate steps
        return annealer.accepted >= plan.steps if published else annealer.candidates >= plan.steps

    model.train()
    with progress_bar(plan.steps, f"screening-{config.variant}", config.progress) as bar:
        while not done():
            epoch, step = annealer.candidates // per_epoch + 1, annealer.candidates % per_epoch + 1
            if not published:
                test = poisson_lot(len(y), test_rate, generator)
                before = _losses(model, x[test], y[test])
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
                release=False,
            )
            loss_total, loss_count = loss_total + loss_sum, loss_count + size
            if published:
                candidate_loss = float(_losses(model, xv, yv).mean())  # read without noise, as published
                delta_e = candidate_loss - accepted_loss
            else:
                delta_e = noisy_loss_change(
                    before,
                    _losses(model, x[test], y[test]),
                    clip=config.validation_clip,
                    noise_multiplier=sigma_v,
                    expected_size=config.validation_size,
                    generator=generator,
                )
            accepted_before = annealer.accepted
            if annealer.decide(delta_e, _uniform(generator)):
                snapshot.take()
                if canaries is not None:
                    canaries.commit()
                if published:
                    accepted_loss = candidate_loss
            else:
                snapshot.restore(optimizer=restore_optimizer)
                if canaries is not None:
                    canaries.discard()
            if published:
                bar.update(annealer.accepted - accepted_before)
            else:
                bar.update(1)
            if annealer.candidates % per_epoch == 0 or done():
                history.append(
                    {
                        "epoch": epoch,
                        "train_loss": loss_total / max(1, loss_count),
                        "accepted_steps": annealer.accepted,
                        "candidate_steps": annealer.candidates,
                    }
                )
                loss_total, loss_count = 0.0, 0
    return _result(model, config, plan, annealer, test_rate, history)


def _result(
    model: nn.Module,
    config: ScreeningConfig,
    plan: DpSgdPlan,
    annealer: Annealer,
    test_rate: float,
    history: list[dict[str, float]],
) -> TrainResult:
    extras: dict[str, Any] = {
        "variant": config.variant,
        "candidate_steps": annealer.candidates,
        "accepted_steps": annealer.accepted,
        "acceptance_rate": annealer.accepted / max(1, annealer.candidates),
        "forced_acceptances": annealer.forced,
    }
    if config.variant == "published":
        stated = epsilon(
            dpsgd_event(
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=annealer.accepted
            ),
            delta=config.delta,
            accountant=config.accountant,
        )
        every = epsilon(
            dpsgd_event(
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=annealer.candidates,
            ),
            delta=config.delta,
            accountant=config.accountant,
        )
        extras["epsilon_counting_every_candidate"] = every
        event = None
        privacy = Privacy(
            formal=False,
            epsilon=stated,
            delta=config.delta,
            accountant=config.accountant,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=annealer.accepted,
            clip_norm=config.clip_norm,
            note=(
                f"SA-DPSGD as published: epsilon {stated:.4g} counts only the {annealer.accepted} accepted "
                f"of {annealer.candidates} candidate steps. Not a guarantee: rejected candidates still "
                f"spend privacy (counting every candidate gives epsilon {every:.4g}), and the acceptance "
                f"test reads {config.validation_size} held-out training examples without noise, which "
                "have no DP protection at all."
            ),
        )
    else:
        event = screening_event(
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=annealer.candidates,
            test_noise_multiplier=config.validation_noise_multiplier,
            test_rate=test_rate,
        )
        extras["validation_sample_rate"] = test_rate
        privacy = Privacy(
            formal=True,
            epsilon=epsilon(event, delta=config.delta, accountant=config.accountant),
            delta=config.delta,
            accountant=config.accountant,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=annealer.candidates,
            clip_norm=config.clip_norm,
            note=(
                "SA-DPSGD, sound variant: every candidate step counted; the acceptance test releases "
                "clipped per-example loss differences on a Poisson-sampled batch with Gaussian noise; "
                f"training (q={plan.sample_rate:.4g}, sigma={plan.noise_multiplier:.4g}) and test "
                f"(q={test_rate:.4g}, sigma={config.validation_noise_multiplier:.4g}) composed as two "
                "Poisson-sampled Gaussian events in dp-accounting, add/remove-one adjacency"
            ),
        )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state, history, event, privacy, extras)


SCREENING = register_mechanism(
    Mechanism(
        "screening",
        ScreeningConfig,
        train_screening,
        "SA-DPSGD: DP-SGD with simulated-annealing update screening (sound variant formal; "
        "published variant formal: false)",
        validate_model=refuse_batchnorm,
        gradient_canaries=True,
    )
)
