"""Privacy accounting through dp-accounting: events in, epsilon out. No formulas of our own.

Mechanisms describe what they did as a ``dp_accounting.DpEvent``; this module turns an event
into epsilon with a dp-accounting accountant (PLD by default, RDP on request) and calibrates a
noise multiplier to a target epsilon with ``dp_accounting.calibrate_dp_mechanism``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dp_accounting
from dp_accounting import DpEvent
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

__all__ = [
    "ACCOUNTANTS",
    "SIGMA_RANGE",
    "calibrate_noise_multiplier",
    "dpsgd_event",
    "epsilon",
    "make_accountant",
]

ACCOUNTANTS = ("pld", "rdp")

# Noise multipliers searched by calibration. Below 0.3 PLD accounting over many steps becomes
# slow and the guarantee meaningless; above 100 the model learns nothing.
SIGMA_RANGE = (0.3, 100.0)


def make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant: ``pld`` (tight, default) or ``rdp``."""
    if name == "pld":
        return PLDAccountant()
    if name == "rdp":
        return RdpAccountant()
    raise ValueError(f"unknown accountant {name!r}; known: {', '.join(ACCOUNTANTS)}")


def dpsgd_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> DpEvent:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism (DP-SGD)."""
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


class _QuietAbsl(logging.Filter):
    """Drops dp-accounting's RDP convergence chatter (orders it excludes by itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    log = logging.getLogger("absl")
    quiet = _QuietAbsl()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def epsilon(event: DpEvent, *, delta: float, accountant: str = "pld") -> float:
    """Epsilon of ``event`` at ``delta`` from a dp-accounting accountant."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    acc = make_accountant(accountant)
    with _quiet_rdp():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def _brent(
    target_epsilon: float,
    delta: float,
    make_event: Callable[[float], DpEvent],
    accountant: str,
    lo: float,
    hi: float,
) -> float:
    with _quiet_rdp():
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(accountant),
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
                tol=1e-4,
            )
        )


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    make_event: Callable[[float], DpEvent],
    accountant: str = "pld",
) -> float:
    """The smallest noise multiplier whose event has epsilon <= ``target_epsilon``.

    Raises ``ValueError`` naming the reachable range when no multiplier in ``SIGMA_RANGE``
    reaches the target. The result's epsilon is below the target by at most about 0.1%.

    For PLD, whose evaluations at small sigma take seconds, the search is bracketed first with
    the cheap RDP accountant (whose epsilon is a looser upper bound, so its sigma is larger),
    then refined with PLD inside ``[0.7 * sigma_rdp, sigma_rdp]``; every bracket end is checked
    with PLD itself, and the full range is used when a check fails.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    lo, hi = SIGMA_RANGE
    eps_hi = epsilon(make_event(hi), delta=delta, accountant=accountant)
    if eps_hi > target_epsilon:
        raise ValueError(
            f"target epsilon {target_epsilon} is not reachable: the smallest reachable epsilon "
            f"with this sample rate and number of steps is {eps_hi:.4g} (noise multiplier {hi}); "
            "train for fewer epochs, use a smaller batch, or raise the target"
        )
    too_large = ValueError(
        f"target epsilon {target_epsilon} is above the largest epsilon calibration considers "
        f"(noise multiplier {lo}); train for more epochs or set --noise-multiplier directly"
    )
    if epsilon(make_event(lo), delta=delta, accountant="rdp") <= target_epsilon:
        if (
            accountant == "rdp"
            or epsilon(make_event(lo), delta=delta, accountant=accountant) <= target_epsilon
        ):
            raise too_large
    if accountant == "rdp":
        return _brent(target_epsilon, delta, make_event, "rdp", lo, hi)
    s_rdp = _brent(target_epsilon, delta, make_event, "rdp", lo, hi)
    upper = s_rdp if epsilon(make_event(s_rdp), delta=delta, accountant=accountant) <= target_epsilon else hi
    lower = max(lo, 0.7 * s_rdp)
    if epsilon(make_event(lower), delta=delta, accountant=accountant) <= target_epsilon:
        lower = lo
        if epsilon(make_event(lo), delta=delta, accountant=accountant) <= target_epsilon:
            raise too_large
    return _brent(target_epsilon, delta, make_event, accountant, lower, upper)
