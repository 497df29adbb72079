"""A canary audit: bounds from canary scores, with every choice made without the audited labels.

:func:`audit_canaries` turns ``(scores, included)`` into the bounds of :mod:`attacks.bounds`:
guess counts and thresholds are chosen either on *calibration* canaries (planted in the same
run through the same code, never audited) or over a fixed grid with a Bonferroni correction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special, stats

from .bounds import (
    ASSUMPTIONS,
    METHODS,
    CanaryBound,
    fdp_one_run_epsilon,
    gdp_epsilon,
    gdp_mu_lower_bound,
)
from .metrics import epsilon_lower_bound, one_run_epsilon_lower_bound, stratified_half

__all__ = ["GUESS_FRACTIONS", "audit_canaries"]

# Fractions of the canaries guessed IN (top scores) tried by the guess-count selection. Without
# calibration canaries each is a separate test and the confidence is split over all of them.
GUESS_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
# Guess plans (IN fraction, OUT fraction) tried without calibration canaries, each a test of
# its own (Bonferroni): few and spread out, from a confident top to guessing every canary.
BONFERRONI_PLANS = ((0.05, 0.0), (0.2, 0.0), (0.5, 0.0), (0.1, 0.1), (0.2, 0.2), (0.35, 0.35), (0.5, 0.5))
# f-DP's recursion is sequential in the number of correct guesses; larger guess counts add
# little to it (its strength is high precision at few guesses) and cost seconds each.
FDP_MAX_GUESSES = 20_000
# Candidate thresholds tried on calibration scores (quantiles; denser in the tails).
THRESHOLD_CANDIDATES = 4000
# Thresholds are chosen on calibration canaries by the bound they would give at this many
# times the target confidence's error rate: the stricter criterion favours thresholds with
# larger counts, whose rates carry over to the audited canaries (with the plain criterion the
# largest value over thousands of thresholds is often a few lucky errors in a tail).
SELECTION_STRICTNESS = 0.01


def _validate(scores: Any, included: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included)
    if s.ndim != 1 or inc.shape != s.shape:
        raise ValueError(
            f"{what}: scores and included must be 1-D of equal length, got {s.shape}, {inc.shape}"
        )
    if inc.dtype != bool:
        if not np.isin(inc, (0, 1)).all():
            raise ValueError(f"{what}: included must be boolean (or 0/1)")
        inc = inc.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: {int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    if inc.all() or not inc.any():
        raise ValueError(f"{what}: need included and excluded canaries, got {int(inc.sum())} of {len(inc)}")
    return s, inc


def _ranking(s: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties broken by position (an order blind to the labels)."""
    return np.argsort(-s, kind="stable")


def _guess_counts(order: np.ndarray, inc: np.ndarray, k_in: int, k_out: int) -> tuple[int, int]:
    """(guesses, correct) when the top ``k_in`` of ``order`` are guessed IN, the bottom ``k_out`` OUT."""
    top, bottom = order[:k_in], order[len(order) - k_out :] if k_out else order[:0]
    return k_in + k_out, int(inc[top].sum()) + int((~inc[bottom]).sum())


def _k(fraction: float, m: int) -> int:
    return max(1, min(m, round(fraction * m)))


def _plan_counts(f_in: float, f_out: float, m: int) -> tuple[int, int]:
    """(k_in, k_out) for a plan: never more guesses than canaries, never one canary twice."""
    k_in = _k(f_in, m)
    return k_in, (min(_k(f_out, m), m - k_in) if f_out else 0)


def _threshold_candidates(s: np.ndarray) -> np.ndarray:
    """Distinct score values, thinned to at most THRESHOLD_CANDIDATES (all of both tails kept)."""
    u = np.unique(s)
    if len(u) <= THRESHOLD_CANDIDATES:
        return u
    tail = THRESHOLD_CANDIDATES // 4
    middle = np.quantile(u[tail:-tail], np.linspace(0, 1, THRESHOLD_CANDIDATES - 2 * tail))
    return np.unique(np.concatenate([u[:tail], middle, u[-tail:]]))


def _threshold_counts(s: np.ndarray, inc: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """fp, negatives, fn, positives for "IN iff score >= t" at every threshold t."""
    pos, neg = np.sort(s[inc]), np.sort(s[~inc])
    fn = np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return fp, len(neg), fn, len(pos)


def _cp_uppers(
    fp: np.ndarray, n0: int, fn: np.ndarray, p: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson upper bounds on FPR and FNR at level alpha/2 each (1 when
    every trial is an error), vectorised ``_cp_upper``."""
    fpr_u = np.where(fp >= n0, 1.0, stats.beta.ppf(1 - alpha / 2, fp + 1, np.maximum(n0 - fp, 1)))
    fnr_u = np.where(fn >= p, 1.0, stats.beta.ppf(1 - alpha / 2, fn + 1, np.maximum(p - fn, 1)))
    return fpr_u, fnr_u


def _cp_vector(fp: np.ndarray, n0: int, fn: np.ndarray, p: int, delta: float, alpha: float) -> np.ndarray:
    """Vectorised ``epsilon_lower_bound`` (both directions), for choosing thresholds."""
    fpr_u, fnr_u = _cp_uppers(fp, n0, fn, p, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.clip(1 - delta - fnr_u, 0, None) / fpr_u)
        b = np.log(np.clip(1 - delta - fpr_u, 0, None) / fnr_u)
    return np.nan_to_num(np.maximum(np.maximum(a, b), 0.0), nan=0.0, neginf=0.0, posinf=0.0)


def _gdp_mu_vector(fp: np.ndarray, n0: int, fn: np.ndarray, p: int, alpha: float) -> np.ndarray:
    """Vectorised ``gdp_mu_lower_bound``, for choosing thresholds."""
    fpr_u, fnr_u = _cp_uppers(fp, n0, fn, p, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = -special.ndtri(fpr_u) - special.ndtri(fnr_u)
    return np.nan_to_num(np.maximum(mu, 0.0), nan=0.0, neginf=0.0, posinf=0.0)


def _best_threshold(
    scores: Mapping[str, np.ndarray], inc: np.ndarray, criterion: str, delta: float, alpha: float
) -> tuple[str, float]:
    """(score name, threshold) maximising the criterion on calibration canaries."""
    best = ("", math.inf, -1.0)
    for name, s in scores.items():
        t = _threshold_candidates(s)
        fp, n0, fn, p = _threshold_counts(s, inc, t)
        a = alpha * SELECTION_STRICTNESS
        value = _cp_vector(fp, n0, fn, p, delta, a) if criterion == "cp" else _gdp_mu_vector(fp, n0, fn, p, a)
        i = int(np.argmax(value))
        if value[i] > best[2]:
            best = (name, float(t[i]), float(value[i]))
    return best[0], best[1]


def _guess_bound(
    method: str, m: int, r: int, v: int, delta: float, beta: float, coarse: bool = False
) -> float:
    """One guess plan's bound; ``coarse`` (for ranking plans only) bisects to 1e-3."""
    if method == "one-run":
        return one_run_epsilon_lower_bound(m, r, v, delta=delta, beta=beta, tol=1e-3 if coarse else 1e-6)
    return fdp_one_run_epsilon(m, r, v, delta=delta, beta=beta)


def _guess_plans(
    method: str,
    m: int,
    fractions: Sequence[float] = GUESS_FRACTIONS,
    plans: Sequence[tuple[float, float]] = (),
) -> list[tuple[float, float]]:
    """(IN fraction, OUT fraction) pairs tried: ``plans`` as given, else one-sided ``fractions``
    and, for one-run, the two-sided ones up to a quarter each side. f-DP is one-sided (its
    analysis is for IN guesses) and capped at FDP_MAX_GUESSES guesses."""
    if not plans:
        plans = [(f, 0.0) for f in fractions] + [(f, f) for f in fractions if f <= 0.25]
    if method == "f-dp-one-run":
        plans = [(f, o) for f, o in plans if o == 0 and _k(f, m) <= FDP_MAX_GUESSES]
    return list(plans)


def _calibrated_guesses(
    method: str, scores: Mapping[str, np.ndarray], inc: np.ndarray, delta: float, beta: float
) -> tuple[str, float, float]:
    """(score name, IN fraction, OUT fraction) with the best bound on calibration canaries."""
    m = len(inc)
    best = ("", GUESS_FRACTIONS[0], 0.0, -1.0)
    for name, s in scores.items():
        order = _ranking(s)
        for f_in, f_out in _guess_plans(method, m):
            k_in, k_out = _plan_counts(f_in, f_out, m)
            r, v = _guess_counts(order, inc, k_in, k_out)
            if v / r <= 0.5 and best[3] >= 0:
                continue  # no better than a coin: cannot reject epsilon = 0
            if method == "one-run" and best[3] > 0 and v / r <= math.exp(best[3]) / (1 + math.exp(best[3])):
                continue  # its bound is below logit(v / r), which cannot beat the best so far
            e = _guess_bound(method, m, r, v, delta, beta, coarse=True)
            if e > best[3]:
                best = (name, f_in, f_out, e)
    return best[0], best[1], best[2]


def audit_canaries(
    scores: Mapping[str, Any],
    included: Any,
    *,
    delta: float,
    confidence: float = 0.95,
    calibration: tuple[Mapping[str, Any], Any] | None = None,
    independent: bool = False,
    methods: Sequence[str] = METHODS,
) -> list[CanaryBound]:
    """Every bound of ``methods`` for one canary audit.

    ``scores`` maps a score's name to float[m] for the audited canaries (higher = more likely
    included; several scores may be offered, e.g. the mechanism's likelihood ratio and a
    variance statistic); ``included`` is bool[m]. With ``calibration = (scores_c, included_c)``
    (the same score names, other canaries of the same run) the score, threshold and guess
    counts are chosen on the calibration canaries and applied once to the audited ones, so
    each bound uses all m audited canaries at full confidence. Without calibration, guesses
    come from a fixed grid with the confidence split over it (Bonferroni), thresholds from a
    random half of the canaries, and only the first score is used. ``independent`` says the
    canaries are independent trials (needed by Clopper-Pearson, which is skipped otherwise).
    """
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (0.5 < confidence < 1):
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown bound method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if not scores:
        raise ValueError("no scores given")
    first = next(iter(scores))
    audited = {}
    for name, s in scores.items():
        audited[name], inc = _validate(s, included, f"audited canaries ({name})")
    cal: dict[str, np.ndarray] | None = None
    if calibration is not None:
        cal_scores, cal_inc_raw = calibration
        if set(cal_scores) != set(scores):
            raise ValueError(
                f"calibration scores {sorted(cal_scores)} differ from the audited {sorted(scores)}"
            )
        cal = {}
        for name, s in cal_scores.items():
            cal[name], cal_inc = _validate(s, cal_inc_raw, f"calibration canaries ({name})")
    beta = 1.0 - confidence
    m = len(inc)
    out: list[CanaryBound] = []
    for method in methods:
        if method in ("one-run", "f-dp-one-run"):
            out.append(
                _guess_method(method, audited, inc, cal, cal_inc if cal else None, m, delta, beta, confidence)
            )
        elif method == "clopper-pearson" and not independent:
            continue
        else:
            out.append(
                _threshold_method(
                    method, audited, inc, cal, cal_inc if cal else None, delta, beta, confidence, first
                )
            )
    return out


def _guess_method(method, audited, inc, cal, cal_inc, m, delta, beta, confidence) -> CanaryBound:
    if cal is not None:
        name, f_in, f_out = _calibrated_guesses(method, cal, cal_inc, delta, beta)
        plans, tests, selection = [(f_in, f_out)], 1, "guess counts chosen on calibration canaries"
        names = [name]
    else:
        plans = _guess_plans(method, m, plans=BONFERRONI_PLANS)
        tests = len(plans)
        selection = f"best of {tests} fixed guess counts, confidence split over them (Bonferroni)"
        names = [next(iter(audited))]
    best: tuple[float, str, int, int, int, int] = (-1.0, names[0], 0, 0, 1, 0)
    for name in names:
        order = _ranking(audited[name])
        for f_in, f_out in plans:
            k_in, k_out = _plan_counts(f_in, f_out, m)
            r, v = _guess_counts(order, inc, k_in, k_out)
            e = _guess_bound(method, m, r, v, delta, beta / tests)
            if e > best[0]:
                best = (e, name, k_in, k_out, r, v)
    e, name, k_in, k_out, r, v = best
    return CanaryBound(
        method=method,
        epsilon_lb=e,
        confidence=confidence,
        delta=delta,
        valid=method == "one-run",
        assumptions=ASSUMPTIONS[method],
        selection=selection,
        score=name,
        counts={"canaries": m, "guesses": r, "correct": v, "guessed_in": k_in, "guessed_out": k_out},
        tests=tests,
        ceiling=_guess_bound(method, m, r, r, delta, beta / tests),
    )


def _threshold_method(method, audited, inc, cal, cal_inc, delta, beta, confidence, first) -> CanaryBound:
    criterion = "cp" if method == "clopper-pearson" else "gdp"
    if cal is not None:
        name, t = _best_threshold(cal, cal_inc, criterion, delta, beta)
        s, ev_inc = audited[name], inc
        selection = "threshold chosen on calibration canaries"
    else:
        name = first
        pick = stratified_half(inc, 0)  # seed 0: an audit is reproducible
        s_all = audited[name]
        _, t = _best_threshold({name: s_all[pick]}, inc[pick], criterion, delta, beta)
        s, ev_inc = s_all[~pick], inc[~pick]
        selection = "threshold chosen on a random half of the canaries, evaluated on the other half"
    pred = s >= t
    fp, n0 = int((pred & ~ev_inc).sum()), int((~ev_inc).sum())
    fn, p = int((~pred & ev_inc).sum()), int(ev_inc.sum())
    counts = {"fp": fp, "negatives": n0, "fn": fn, "positives": p}
    if method == "clopper-pearson":
        e = epsilon_lower_bound(fp, n0, fn, p, delta=delta, alpha=beta)
        ceiling, extra = epsilon_lower_bound(0, n0, 0, p, delta=delta, alpha=beta), {}
    else:
        mu = gdp_mu_lower_bound(fp, n0, fn, p, alpha=beta)
        e = gdp_epsilon(mu, delta)
        ceiling, extra = None, {"mu_lb": mu}
    return CanaryBound(
        method=method,
        epsilon_lb=e,
        confidence=confidence,
        delta=delta,
        valid=method == "clopper-pearson",
        assumptions=ASSUMPTIONS[method],
        selection=selection,
        score=name,
        counts=counts,
        ceiling=ceiling,
        extra={**extra, "threshold": float(t)},
    )
