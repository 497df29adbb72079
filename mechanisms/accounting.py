"""Privacy accounting through dp-accounting: events in, epsilon out. No formulas of our own.

Mechanisms describe what they did as a ``dp_accounting.DpEvent``; this module turns an event
into epsilon with a dp-accounting accountant (PLD by default, RDP on request) and calibrates a
noise multiplier to a target epsilon with ``dp_accounting.calibrate_dp_mechanism``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import DpEvent
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

__all__ = [
    "ACCOUNTANTS",
    "SIGMA_RANGE",
    "calibrate_noise_multiplier",
    "dpsgd_event",
    "epsilon",
    "gaussian_delta",
    "make_accountant",
    "student_t_delta",
    "student_t_gdp_mu",
    "student_t_max_loss",
    "student_t_noise_multiplier",
]

ACCOUNTANTS = ("pld", "rdp")

# Noise multipliers searched by calibration. Below 0.3 PLD accounting over many steps becomes
# slow and the guarantee meaningless; above 100 the model learns nothing.
SIGMA_RANGE = (0.3, 100.0)


# Calibration searches with a PLD accountant of this value discretisation (the default is
# 1e-4): about 10x faster per evaluation, its epsilon a pessimistic upper bound within about
# 1e-4 relative of the default's at DP-SGD's budgets; the result is confirmed (and if need be
# refined) with the default accountant, which also computes every recorded epsilon.
SEARCH_DISCRETISATION = 1e-3
# Calibration brackets the PLD search with RDP over these orders (fewer than dp-accounting's
# default, so each evaluation is cheaper; fewer orders only loosen RDP's upper bound, which
# keeps the bracket valid because every end is checked with PLD).
BRACKET_ORDERS = (
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
    6.0,
    8.0,
    10.0,
    12.0,
    16.0,
    20.0,
    24.0,
    32.0,
    48.0,
    64.0,
    128.0,
    256.0,
)


def make_accountant(name: str) -> dp_accounting.PrivacyAccountant:
    """A fresh dp-accounting accountant: ``pld`` (tight, default) or ``rdp`` (and
    ``pld-search``, the coarser PLD calibration searches with)."""
    if name == "pld":
        return PLDAccountant()
    if name == "pld-search":
        return PLDAccountant(value_discretization_interval=SEARCH_DISCRETISATION)
    if name == "rdp-bracket":
        return RdpAccountant(orders=BRACKET_ORDERS)
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


# Seconds this process has spent in accounting (calibration and epsilons; nested calls counted
# once), so that a training run can report its accounting apart from its training.
_CLOCK = {"seconds": 0.0, "depth": 0}


def accounting_seconds() -> float:
    """Seconds spent in :func:`calibrate_noise_multiplier` and :func:`epsilon` so far."""
    return _CLOCK["seconds"]


def _timed(fn: Callable[..., float]) -> Callable[..., float]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> float:
        _CLOCK["depth"] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _CLOCK["depth"] -= 1
            if _CLOCK["depth"] == 0:
                _CLOCK["seconds"] += time.perf_counter() - start

    return wrapper


# Epsilons already computed, by (the event's full description, delta, accountant): calibration
# confirms the sigma it returns with the default accountant, and the training run's final
# epsilon is then the same computation. The description is the event's repr, which names
# every parameter of every nested event (floats in full precision), never its identity.
_EPSILONS: dict[tuple[str, float, str], float] = {}


@_timed
def epsilon(event: DpEvent, *, delta: float, accountant: str = "pld") -> float:
    """Epsilon of ``event`` at ``delta`` from a dp-accounting accountant (memoised)."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    key = (repr(event), float(delta), accountant)
    if key not in _EPSILONS:
        acc = make_accountant(accountant)
        with _quiet_rdp():
            acc.compose(event)
            value = float(acc.get_epsilon(delta))
        if len(_EPSILONS) >= 4096:
            _EPSILONS.clear()
        _EPSILONS[key] = value
    return _EPSILONS[key]


def _brent(
    target_epsilon: float,
    delta: float,
    make_event: Callable[[float], DpEvent],
    accountant: str,
    lo: float,
    hi: float,
    tol: float = 1e-4,
) -> float:
    with _quiet_rdp():
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(accountant),
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
                tol=tol,
            )
        )


@_timed
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
    then refined with a coarser PLD (``SEARCH_DISCRETISATION``) inside ``[0.7 * sigma_rdp,
    sigma_rdp]``; every bracket end is checked, and the full range is used when a check fails.
    The result is confirmed with the default PLD accountant and, should its epsilon exceed the
    target, searched again with it just above.
    """
    if accountant == "pld":
        if (
            target_epsilon > 0
            and epsilon(make_event(SIGMA_RANGE[1]), delta=delta, accountant="pld-search") > target_epsilon
        ):
            # the coarse accountant's discretisation dominates at tiny epsilons: search exactly
            return _calibrate(target_epsilon, delta, make_event, "pld")
        sigma = _calibrate(target_epsilon, delta, make_event, "pld-search")
        if epsilon(make_event(sigma), delta=delta, accountant="pld") <= target_epsilon:
            return sigma
        lo, hi = sigma, min(SIGMA_RANGE[1], sigma * 1.05)
        if epsilon(make_event(hi), delta=delta, accountant="pld") > target_epsilon:
            hi = SIGMA_RANGE[1]
        return _brent(target_epsilon, delta, make_event, "pld", lo, hi)
    return _calibrate(target_epsilon, delta, make_event, accountant)


def _calibrate(
    target_epsilon: float, delta: float, make_event: Callable[[float], DpEvent], accountant: str
) -> float:
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    lo, hi = SIGMA_RANGE
    eps_hi = epsilon(make_event(hi), delta=delta, accountant=accountant)
    if eps_hi > target_epsilon:
        raise ValueError(
            f"target epsilon {target_epsilon} is not reachable: the smallest reachable epsilon "
            f"with this sample rate and number of steps is {eps_hi:.4g}, at noise multiplier {hi} "
            "(the largest that calibration searches); train for fewer epochs, use a smaller "
            "batch, raise the target, or set --noise-multiplier directly"
        )
    too_large = ValueError(
        f"target epsilon {target_epsilon} is above the largest epsilon calibration considers "
        f"(noise multiplier {lo}); train for more epochs or set --noise-multiplier directly"
    )
    rdp_ok = make_accountant("rdp").supports(make_event(lo))
    if epsilon(make_event(lo), delta=delta, accountant="rdp" if rdp_ok else accountant) <= target_epsilon:
        if (
            accountant == "rdp"
            or epsilon(make_event(lo), delta=delta, accountant=accountant) <= target_epsilon
        ):
            raise too_large
    if accountant == "rdp":
        return _brent(target_epsilon, delta, make_event, "rdp", lo, hi)
    if not make_accountant("rdp").supports(make_event(hi)):  # e.g. Poisson-sampled Laplace
        return _brent(target_epsilon, delta, make_event, accountant, lo, hi)
    s_rdp = _brent(target_epsilon, delta, make_event, "rdp-bracket", lo, hi, tol=1e-3)  # a bracket end only
    upper = s_rdp if epsilon(make_event(s_rdp), delta=delta, accountant=accountant) <= target_epsilon else hi
    lower = max(lo, 0.7 * s_rdp)
    if epsilon(make_event(lower), delta=delta, accountant=accountant) <= target_epsilon:
        lower = lo
        if epsilon(make_event(lo), delta=delta, accountant=accountant) <= target_epsilon:
            raise too_large
    return _brent(target_epsilon, delta, make_event, accountant, lower, upper)


# --- Student-t noise on a coordinate-wise bounded vector (gradient encoding) -----------------
#
# One coordinate: outputs P = t_nu(loc v, scale s) and Q = t_nu(loc 0, scale s). The privacy
# loss log P/Q = -((nu+1)/2) log1p(v (v - 2x) / (nu s^2 + x^2)) is bounded, and {loss > eps} is
# an interval whose ends solve a quadratic, so the hockey-stick divergence delta(eps) is exact
# in closed form from the t CDF. The pair is symmetric (reflect x -> v - x), so the add and
# remove directions coincide. Each coordinate is then bounded by the smallest Gaussian-DP
# mu with delta_t(eps) <= delta_G(eps; mu) for all eps >= 0 (checked on a grid with the
# decreasing-function interval argument, so the bound holds between grid points too). mu-GDP
# composes exactly across coordinates (mu_total^2 = sum mu_i^2), so a step is dominated by a
# Gaussian mechanism with noise multiplier 1 / mu_total, and its Poisson subsampling and
# composition over steps are accounted by dp-accounting like DP-SGD.


def student_t_delta(eps: np.ndarray, shift: float, df: float) -> np.ndarray:
    """Exact hockey-stick divergence H_{e^eps}(t_df(shift, 1) || t_df(0, 1)) for ``eps >= 0``."""
    from scipy import stats

    eps = np.asarray(eps, dtype=np.float64)
    v, c = abs(float(shift)), float(df)
    t = stats.t(df)
    if v == 0:
        return np.zeros_like(eps)
    a = np.exp(-2.0 * eps / (c + 1.0))
    one_minus_a = -np.expm1(-2.0 * eps / (c + 1.0))
    disc = a * v * v - one_minus_a**2 * c
    out = np.zeros_like(eps)
    zero = eps == 0
    out[zero] = 1.0 - 2.0 * t.sf(v / 2.0)
    live = (~zero) & (disc > 0)
    root = np.sqrt(np.where(live, disc, 0.0))
    x2 = np.where(live, (v + root) / np.where(one_minus_a > 0, one_minus_a, 1.0), 0.0)
    x1 = np.where(live, (v * v + one_minus_a * c) / (v + root), 0.0)
    p = t.sf(x1 - v) - t.sf(x2 - v)
    q = t.sf(x1) - t.sf(x2)
    out[live] = np.maximum(0.0, (p - np.exp(eps) * q)[live])
    return out


def student_t_max_loss(shift: float, df: float) -> float:
    """sup_x of the privacy loss: attained at x = (v + sqrt(v^2 + 4 nu)) / 2 (scale 1)."""
    v, c = abs(float(shift)), float(df)
    x = (v + math.sqrt(v * v + 4.0 * c)) / 2.0
    return -(c + 1.0) / 2.0 * math.log1p(v * (v - 2.0 * x) / (c + x * x))


def gaussian_delta(eps: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Hockey-stick divergence of the mu-GDP Gaussian pair N(mu, 1) vs N(0, 1)."""
    from scipy.special import log_ndtr, ndtr

    eps, mu = np.asarray(eps, dtype=np.float64), np.asarray(mu, dtype=np.float64)
    return ndtr(-eps / mu + mu / 2.0) - np.exp(eps + log_ndtr(-eps / mu - mu / 2.0))


def student_t_gdp_mu(shift: float, df: float, grid: int = 400) -> float:
    """The smallest mu (up to bisection tolerance, rounded up) with the t pair mu-GDP.

    For eps in [e_i, e_{i+1}]: delta_t(eps) <= delta_t(e_i) and delta_G(eps) >= delta_G(e_{i+1})
    (both decrease in eps), so requiring delta_G(e_{i+1}; mu) >= delta_t(e_i) for every i covers
    every eps in [0, eps_max]; above eps_max = sup loss, delta_t is 0.
    """
    if shift == 0:
        return 0.0
    top = student_t_max_loss(shift, df)
    edges = np.linspace(0.0, top, grid + 1)
    need = student_t_delta(edges[:-1], shift, df)
    at = edges[1:]
    lo = np.full(grid, 1e-12)
    hi = np.full(grid, 2.0 * top + 10.0)
    if not (gaussian_delta(at, hi) >= need).all():  # pragma: no cover - the bracket must hold
        raise ArithmeticError(f"no Gaussian-DP bound found for the Student-t shift {shift}")
    for _ in range(80):  # vectorised bisection; delta_G increases with mu
        mid = np.sqrt(lo * hi)
        ok = gaussian_delta(at, mid) >= need
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    hi = np.where(need > 0, hi, 0.0)
    return float(hi.max()) * (1.0 + 1e-9)


@functools.lru_cache(maxsize=65536)
def _gdp_mu_at_level(level: int, ratio: float, df: float) -> float:
    return student_t_gdp_mu(ratio**level, df)


def student_t_noise_multiplier(
    bounds: np.ndarray, scale: float, df: float, *, level_ratio: float = 1.01, floor_ratio: float = 1e-4
) -> float:
    """Gaussian noise multiplier dominating one step of Student-t noise (scale ``scale``) on a
    vector whose coordinates are bounded by ``bounds`` in absolute value.

    The standardised shifts ``bounds / scale`` are rounded *up* onto the fixed geometric grid
    ``level_ratio ** k`` (values below ``floor_ratio * max`` raised to that floor), so equal
    levels share one computation, cached across calls (calibration revisits them); the t pair's
    divergence grows with the shift (tested), so rounding up is conservative.
    Returns ``1 / sqrt(sum_i mu_i^2)``.
    """
    if not (scale > 0):
        raise ValueError(f"noise scale must be > 0, got {scale}")
    u = np.abs(np.asarray(bounds, dtype=np.float64)) / scale
    u = u[u > 0]
    if len(u) == 0:
        return math.inf
    u = np.maximum(u, u.max() * floor_ratio)
    k = np.ceil(np.log(u) / math.log(level_ratio)).astype(np.int64)
    k += (level_ratio ** k.astype(np.float64) < u).astype(np.int64)  # never round down (float error)
    levels, counts = np.unique(k, return_counts=True)
    total = sum(
        int(c) * _gdp_mu_at_level(int(level), level_ratio, float(df)) ** 2
        for level, c in zip(levels, counts, strict=True)
    )
    return 1.0 / math.sqrt(total)
