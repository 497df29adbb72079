"""Canary-audit bounds: empirical epsilon lower bounds from canary scores (AUDITING.md).

A canary audit plants m canaries, each included in training with probability 1/2
independently, and scores each one (higher = more likely included). This module turns
``(scores, included)`` into bounds on epsilon, each carrying its method, confidence, delta,
the counts it was computed from, and what it assumes. Pure numpy/scipy; epsilon <-> Gaussian-DP
conversions go through dp-accounting.

Methods:

* ``one-run`` (Steinke, Nasr, Jagielski 2023): guess the top k+ scores IN (and the bottom k-
  OUT); v of the r guesses are right. Valid for any (eps, delta)-DP mechanism, with no
  independence between canaries.
* ``f-dp-one-run`` (Mahloujifar, Melis, Chaudhuri 2024): the same guesses, tested against the
  Gaussian trade-off curve that is exactly (eps, delta)-DP. Valid when the mechanism is
  Gaussian-DP; an (eps, delta) claim alone does not imply that (DP-SGD's curve has heavier tails
  than the Gaussian through its (eps, delta)), so it is reported but never gated on.
* ``clopper-pearson``: one threshold, one-sided Clopper-Pearson bounds on FPR and FNR
  (ATTACKS.md). Valid only when the canaries are independent trials, as gradient canaries on
  dedicated coordinates are by construction.
* ``gdp-estimate`` (Nasr et al. 2023): a lower confidence bound on mu from one threshold's
  FPR and FNR, converted to epsilon(delta). An estimate that assumes the mechanism is
  Gaussian-DP: labelled so, never gated on.

Guess counts and thresholds are never chosen with the audited canaries' labels: either on a
separate set of *calibration* canaries (planted in the same run through the same code, never
audited), or over a fixed grid of guess counts with a Bonferroni correction; that selection
is :func:`attacks.canary_audit.audit_canaries`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy import special, stats

from .metrics import epsilon_lower_bound, one_run_epsilon_lower_bound

__all__ = [
    "METHODS",
    "CanaryBound",
    "fdp_mu_lower_bound",
    "fdp_one_run_epsilon",
    "fdp_rejects",
    "gaussian_tradeoff",
    "gdp_epsilon",
    "gdp_mu_lower_bound",
    "recompute_epsilon",
]

METHODS = ("one-run", "f-dp-one-run", "clopper-pearson", "gdp-estimate")


ASSUMPTIONS = {
    "one-run": "canaries included independently with probability 1/2; no independence between "
    "canaries needed; guess counts fixed without the audited labels",
    "f-dp-one-run": "as one-run, and the mechanism is Gaussian-DP (mu-GDP with the mu that is exactly "
    "(epsilon, delta)-DP); an (epsilon, delta) guarantee alone does not imply this, so not a "
    "refutation of the accountant",
    "clopper-pearson": "canaries are independent trials (gradient canaries on dedicated coordinates); "
    "threshold fixed without the audited labels",
    "gdp-estimate": "an ESTIMATE, not a bound: assumes the mechanism is Gaussian-DP; a lower confidence "
    "bound on mu from one threshold, converted to epsilon(delta)",
}

_N = NormalDist()


@dataclass(frozen=True)
class CanaryBound:
    """One empirical epsilon from a canary audit, with everything needed to read it.

    ``valid`` is True for a proven lower bound under ``assumptions`` that does not rest on the
    mechanism's privacy curve having a particular shape (one-run; Clopper-Pearson when the
    canaries are independent): these are the bounds the CI gate compares with an accountant.
    ``counts`` are the numbers the bound was computed from and ``tests`` the number of
    hypotheses its confidence was split over, so it can be recomputed at another confidence
    (:func:`recompute_epsilon`). ``ceiling`` is what perfect guessing would give at these counts.
    """

    method: str
    epsilon_lb: float
    confidence: float
    delta: float
    valid: bool
    assumptions: str
    selection: str
    score: str
    counts: dict[str, int]
    tests: int = 1
    ceiling: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def saturated(self) -> bool:
        return self.ceiling is not None and self.epsilon_lb >= self.ceiling - 1e-9

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "epsilon_lb": self.epsilon_lb,
            "confidence": self.confidence,
            "delta": self.delta,
            "valid": self.valid,
            "assumptions": self.assumptions,
            "selection": self.selection,
            "score": self.score,
            "counts": dict(self.counts),
            "tests": self.tests,
            "ceiling": self.ceiling,
            "saturated": self.saturated,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }


# --- the bounds, from counts --------------------------------------------------------------


def gaussian_tradeoff(mu: float) -> Callable[[float], float]:
    """``g(x) = f_mu(1 - x) = Phi(Phi^-1(x) - mu)`` for the mu-GDP trade-off curve f_mu."""
    if mu <= 0:
        return lambda x: x
    return lambda x: _N.cdf(_N.inv_cdf(x) - mu) if 0 < x < 1 else float(x >= 1)


def fdp_rejects(m: int, guesses: int, correct: int, g: Callable[[float], float], beta: float) -> bool:
    """Whether v = ``correct`` of r = ``guesses`` rejects f-DP at level ``beta``, where
    ``g(x) = f(1 - x)`` for the hypothesised trade-off curve f.

    The recursion of Mahloujifar et al. (2024, ``audit_rh_with_cap``): ``r`` and ``h`` track
    the least probability mass that correct and incorrect guesses must carry for an f-DP
    mechanism to produce v correct guesses with probability ``beta``; ``g(x)`` is the least
    mass an incorrect guess can carry when a correct one carries x. If the mass needed exceeds
    the r/m the auditor actually spent, no f-DP mechanism explains the outcome. With the pure
    epsilon-DP curve this reproduces Steinke et al.'s binomial test (tested).
    """
    if correct == 0:
        return False
    r = beta * correct / m
    h = beta * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        g_r = 1.0 if r >= 1.0 else g(r)
        if g_r <= h:
            break  # h (and so r) can no longer change
        r = min(r + (i / (guesses - i)) * (g_r - h), 1.0)
        h = g_r
    return r + h > guesses / m


def _fdp_falsified(m: int, guesses: int, correct: int, mu: float, beta: float) -> bool:
    return fdp_rejects(m, guesses, correct, gaussian_tradeoff(mu), beta)


def fdp_one_run_epsilon(m: int, guesses: int, correct: int, *, delta: float, beta: float = 0.05) -> float:
    """f-DP one-run bound: the largest epsilon whose (epsilon, delta)-Gaussian curve is rejected.

    The largest rejected mu (:func:`fdp_mu_lower_bound`) converted to epsilon(delta) with
    dp-accounting. 0 when even mu = 0 is not rejected. Assumes the mechanism is Gaussian-DP.

    >>> fdp_one_run_epsilon(1000, 100, 50, delta=1e-5)
    0.0
    >>> fdp_one_run_epsilon(1000, 100, 100, delta=1e-5) > one_run_epsilon_lower_bound(1000, 100, 100, delta=1e-5)
    True
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return gdp_epsilon(fdp_mu_lower_bound(m, guesses, correct, beta=beta), delta)


def fdp_mu_lower_bound(m: int, guesses: int, correct: int, *, beta: float = 0.05) -> float:
    """The largest mu whose mu-GDP curve the outcome rejects at level ``beta`` (rejection is
    monotone in mu), to a relative 1e-4 and rounded down; 0 when even mu = 0 is not rejected."""
    if not (0 <= correct <= guesses <= m) or m <= 0:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {m}")
    if not _fdp_falsified(m, guesses, correct, 0.0, beta):
        return 0.0
    lo, hi = 0.0, 0.5
    while _fdp_falsified(m, guesses, correct, hi, beta):
        lo, hi = hi, hi * 2
        if hi > 64:  # beyond any mu a finite audit can show (20,000 perfect guesses reject mu = 2)
            return lo
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _fdp_falsified(m, guesses, correct, mid, beta) else (lo, mid)
    return lo


def _cp_upper(errors: int, trials: int, alpha: float) -> float:
    return 1.0 if errors >= trials else float(stats.beta.ppf(1 - alpha, errors + 1, trials - errors))


def gdp_mu_lower_bound(fp: int, negatives: int, fn: int, positives: int, *, alpha: float = 0.05) -> float:
    """Lower confidence bound on mu from one test: ``-Phi^-1(FPR_u) - Phi^-1(FNR_u)`` (>= 0).

    FPR_u and FNR_u are one-sided Clopper-Pearson upper bounds at level alpha/2 each; a mu-GDP
    mechanism forces FNR >= Phi(Phi^-1(1 - FPR) - mu) for every test (Dong, Roth, Su 2019).

    >>> gdp_mu_lower_bound(500, 1000, 500, 1000)
    0.0
    """
    if not (0 <= fp <= negatives and 0 <= fn <= positives and negatives > 0 and positives > 0):
        raise ValueError(f"invalid counts fp={fp}/{negatives}, fn={fn}/{positives}")
    fpr_u, fnr_u = _cp_upper(fp, negatives, alpha / 2), _cp_upper(fn, positives, alpha / 2)
    if fpr_u >= 1 or fnr_u >= 1:
        return 0.0
    return max(0.0, float(-special.ndtri(fpr_u) - special.ndtri(fnr_u)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """epsilon(delta) of mu-Gaussian-DP: a Gaussian mechanism with noise 1/mu (dp-accounting)."""
    import dp_accounting

    if mu <= 0:
        return 0.0
    with np.errstate(divide="ignore"):  # dp-accounting's log1p(-1) at the search's far end
        return max(0.0, float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta)))


def recompute_epsilon(bound: Mapping[str, Any], confidence: float) -> float:
    """A bound of ``results.json`` recomputed from its counts at another confidence level.

    The confidence is split over the bound's ``tests`` as it was originally (Bonferroni).
    """
    counts, delta = bound["counts"], float(bound["delta"])
    beta = (1.0 - confidence) / int(bound.get("tests", 1))
    method = bound["method"]
    if method == "one-run":
        return one_run_epsilon_lower_bound(
            counts["canaries"], counts["guesses"], counts["correct"], delta=delta, beta=beta
        )
    if method == "f-dp-one-run":
        return fdp_one_run_epsilon(
            counts["canaries"], counts["guesses"], counts["correct"], delta=delta, beta=beta
        )
    if method == "clopper-pearson":
        return epsilon_lower_bound(
            counts["fp"], counts["negatives"], counts["fn"], counts["positives"], delta=delta, alpha=beta
        )
    if method == "gdp-estimate":
        mu = gdp_mu_lower_bound(
            counts["fp"], counts["negatives"], counts["fn"], counts["positives"], alpha=beta
        )
        return gdp_epsilon(mu, delta)
    raise ValueError(f"unknown bound method {method!r}; known: {', '.join(METHODS)}")


# --- choosing guesses and thresholds without the audited labels ------------------------------
