"""Attack metrics, with the conventions of ATTACKS.md.

Scores: higher = more likely a member; members are the positives. A threshold t predicts
"member" iff ``score >= t``; thresholds run over the distinct scores, descending.

* ROC equals ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``; ties move diagonally.
* AUC is the trapezoid area: P(s_member > s_non) + 0.5 P(equal). An AUC below 0.5 is reported
  as it is, never flipped.
* TPR at FPR = a is ``max{TPR(t) : FPR(t) <= a}`` (``strict=True``: ``<``), no interpolation.
* Confidence intervals: stratified bootstrap (members and non-members resampled separately),
  95% percentile intervals.
* Empirical epsilon lower bound: Clopper-Pearson upper bounds on FPR and FNR (alpha/2 each),
  the threshold chosen on one half of the examples and the bound evaluated on the other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "AttackMetrics",
    "EpsilonBound",
    "auc",
    "epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "roc_curve",
    "summarize",
    "tpr_at_fpr",
]

DEFAULT_FPR_LEVELS = (0.001, 0.01, 0.1)


def _validate(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1 or m.shape != s.shape:
        raise ValueError(f"scores and is_member must be 1-D of equal length, got {s.shape} and {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("is_member must be boolean (or 0/1)")
        m = m.astype(bool)
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN or infinite values")
    if m.all() or not m.any():
        raise ValueError(
            f"need members and non-members, got {int(m.sum())} members and {int((~m).sum())} non-members"
        )
    return s, m


def roc_curve(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0, 0) to (1, 1); thresholds[0] = +inf, then distinct scores.

    >>> fpr, tpr, _ = roc_curve([0.9, 0.8, 0.8, 0.1], [True, False, True, False])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    s, m = _validate(scores, is_member)
    order = np.argsort(-s, kind="mergesort")
    s, m = s[order], m[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(m)[last]
    fp = (last + 1) - tp
    p, n0 = int(m.sum()), int((~m).sum())
    return np.r_[0.0, fp / n0], np.r_[0.0, tp / p], np.r_[np.inf, s[last]]


def auc(scores: Any, is_member: Any) -> float:
    """Area under the ROC: P(s_member > s_non) + 0.5 P(s_member == s_non).

    >>> auc([3, 2, 1], [True, False, False]), auc([1, 2, 3], [True, False, False])
    (1.0, 0.0)
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.trapezoid(tpr, fpr))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float, strict: bool) -> tuple[float, float]:
    ok = fpr < level if strict else fpr <= level
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])  # fpr[0] = 0 is always admissible for level > 0
    return float(tpr[i]), float(fpr[i])


def tpr_at_fpr(scores: Any, is_member: Any, level: float, *, strict: bool = False) -> tuple[float, float]:
    """(TPR, achieved FPR) at the best threshold with FPR <= ``level`` (``<`` if ``strict``)."""
    if not (0 < level <= 1):
        raise ValueError(f"FPR level must be in (0, 1], got {level}")
    fpr, tpr, _ = roc_curve(scores, is_member)
    return _tpr_at(fpr, tpr, level, strict)


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical epsilon lower bound with everything needed to read it."""

    epsilon: float
    delta: float
    alpha: float
    method: str
    fp: int
    negatives: int
    fn: int
    positives: int
    threshold: float | None = None
    saturated: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _cp_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound at level 1 - alpha."""
    if errors >= trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, errors + 1, trials - errors))


def epsilon_lower_bound(
    fp: int, negatives: int, fn: int, positives: int, *, delta: float = 1e-5, alpha: float = 0.05
) -> float:
    """Epsilon any (eps, delta)-DP training must have, given one test's error counts.

    ``eps_lb = max(ln((1 - delta - FNR_u) / FPR_u), ln((1 - delta - FPR_u) / FNR_u), 0)`` with
    one-sided Clopper-Pearson upper bounds at level alpha/2 each; valid with probability at
    least 1 - alpha (Kairouz et al. 2015; Jagielski et al. 2020).

    >>> round(epsilon_lower_bound(0, 1000, 0, 1000, delta=0.0, alpha=0.05), 3)
    5.601
    """
    if not (0 <= fp <= negatives and 0 <= fn <= positives and negatives > 0 and positives > 0):
        raise ValueError(f"invalid counts fp={fp}/{negatives}, fn={fn}/{positives}")
    fpr_u = _cp_upper(fp, negatives, alpha / 2)
    fnr_u = _cp_upper(fn, positives, alpha / 2)
    best = 0.0
    for num, den in ((1 - delta - fnr_u, fpr_u), (1 - delta - fpr_u, fnr_u)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def _counts_at(scores: np.ndarray, member: np.ndarray, t: float) -> tuple[int, int, int, int]:
    pred = scores >= t
    return int((pred & ~member).sum()), int((~member).sum()), int((~pred & member).sum()), int(member.sum())


def stratified_half(member: np.ndarray, seed: int) -> np.ndarray:
    """A random half (rounded down) of the members and of the non-members, drawn with ``seed``:
    the trials on which a threshold is chosen, the rest being where it is evaluated."""
    rng = np.random.default_rng(seed)
    select = np.zeros(len(member), dtype=bool)
    for group in (np.flatnonzero(member), np.flatnonzero(~member)):
        select[rng.permutation(group)[: len(group) // 2]] = True
    return select


def split_epsilon_lower_bound(
    scores: Any, is_member: Any, *, delta: float = 1e-5, alpha: float = 0.05, seed: int = 0
) -> EpsilonBound:
    """Epsilon lower bound with the threshold chosen on a random half, evaluated on the other.

    Choosing the threshold on the same trials that evaluate it would inflate the bound. The halves
    are stratified (half the members and half the non-members in each), drawn with ``seed``.
    """
    s, m = _validate(scores, is_member)
    select = stratified_half(m, seed)
    sa, ma, sb, mb = s[select], m[select], s[~select], m[~select]
    if ma.all() or not ma.any() or mb.all() or not mb.any():
        raise ValueError("too few members or non-members to split for the epsilon bound")
    fpr, tpr, thr = roc_curve(sa, ma)
    pa, na = int(ma.sum()), int((~ma).sum())
    best_t, best = thr[-1], -1.0
    for f, t, th in zip(fpr, tpr, thr, strict=True):
        fp, fn = round(f * na), round((1 - t) * pa)
        e = epsilon_lower_bound(fp, na, fn, pa, delta=delta, alpha=alpha)
        if e > best:
            best, best_t = e, th
    fp, n0, fn, p = _counts_at(sb, mb, best_t)
    eps = epsilon_lower_bound(fp, n0, fn, p, delta=delta, alpha=alpha)
    saturated = fp == 0 and fn == 0
    return EpsilonBound(
        eps,
        delta,
        alpha,
        "clopper-pearson, threshold from a held-out half",
        fp,
        n0,
        fn,
        p,
        float(best_t) if np.isfinite(best_t) else None,  # +inf: "nobody is a member" (all bounds 0)
        saturated,
    )


def one_run_epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, *, delta: float = 0.0, beta: float = 0.05, tol: float = 1e-6
) -> float:
    """One-run audit bound (Steinke, Nasr, Jagielski 2023, Theorem 3 with the delta term).

    ``canaries`` m were each included with probability 1/2; the auditor made ``guesses`` r and
    ``correct`` v of them were right. Returns ``sup{eps : p(eps, delta) < beta}`` where
    ``p = P[Bin(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i`` and
    ``q = e^eps / (1 + e^eps)``; 0 when even eps = 0 is not rejected. It never exceeds
    ``logit(correct / guesses)``: the binomial test needs a precision above q.

    >>> one_run_epsilon_lower_bound(1000, 100, 50)
    0.0
    """
    m, r, v = canaries, guesses, correct
    if not (0 <= v <= r <= m) or m <= 0:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {v}, {r}, {m}")

    def p_value(eps: float) -> float:
        q = math.exp(eps) / (1 + math.exp(eps)) if eps < 700 else 1.0
        tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin >= v]
        if delta == 0 or v == 0:
            return tail
        cdf = stats.binom.cdf(np.arange(-1, v), r, q)  # cdf[j + 1] = P[Bin <= j]
        i = np.arange(1, v + 1)
        window = cdf[v] - cdf[v - i]  # P[v - i <= Bin < v] = P[Bin <= v-1] - P[Bin <= v-i-1]
        return tail + 2 * m * delta * float(np.max(window / i))

    if p_value(0.0) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) < beta and hi < 100:
        lo, hi = hi, hi * 2
    while hi - lo > tol:  # the bound is returned to ``tol``, rounded down
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(mid) < beta else (lo, mid)
    return lo


@dataclass(frozen=True)
class AttackMetrics:
    """Everything ``summarize`` measures for one attack on one target."""

    auc: float
    auc_ci: tuple[float, float]
    balanced_accuracy: float
    advantage: float
    tpr_at_fpr: dict[float, float]
    tpr_at_fpr_ci: dict[float, tuple[float, float]]
    achieved_fpr: dict[float, float]
    epsilon_lb: EpsilonBound
    members: int
    non_members: int
    unstable_levels: tuple[float, ...] = ()
    warnings: tuple[str, ...] = ()
    roc: tuple[np.ndarray, np.ndarray] = field(default=(np.zeros(0), np.zeros(0)), repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` form (schema mia-audit/results/v1): FPR levels as string keys."""
        key = repr
        return {
            "auc": self.auc,
            "auc_ci": list(self.auc_ci),
            "balanced_accuracy": self.balanced_accuracy,
            "advantage": self.advantage,
            "tpr_at_fpr": {key(k): v for k, v in self.tpr_at_fpr.items()},
            "tpr_at_fpr_ci": {key(k): list(v) for k, v in self.tpr_at_fpr_ci.items()},
            "achieved_fpr": {key(k): v for k, v in self.achieved_fpr.items()},
            "unstable_fpr_levels": [key(k) for k in self.unstable_levels],
            "epsilon_lb": self.epsilon_lb.epsilon,
            "epsilon_lb_details": self.epsilon_lb.to_json(),
            "members": self.members,
            "non_members": self.non_members,
            "warnings": list(self.warnings),
        }


def _allowed_false_positives(level: float, n0: int, strict: bool) -> int:
    """Largest FP count with FP/n0 <= level (< level if strict); guards float round-off."""
    x = level * n0
    k = math.ceil(x * (1 - 1e-12)) - 1 if strict else math.floor(x * (1 + 1e-12))
    return min(max(k, 0), n0)


def _tpr_at_level_sorted(pos_asc: np.ndarray, neg_desc: np.ndarray, level: float, strict: bool) -> float:
    """TPR at FPR ``level`` from sorted scores, in O(log n): the same value as ``tpr_at_fpr``.

    Allowing k false positives, the best rule is "member iff score > v" with v the (k+1)-th
    largest non-member score: every lower threshold admits more than k non-members.
    """
    k = _allowed_false_positives(level, len(neg_desc), strict)
    if k >= len(neg_desc):
        return 1.0
    above = len(pos_asc) - np.searchsorted(pos_asc, neg_desc[k], side="right")
    return float(above / len(pos_asc))


def _bootstrap(
    s: np.ndarray,
    m: np.ndarray,
    levels: Sequence[float],
    strict: bool,
    resamples: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """AUCs [R] and TPR@levels [R, L] over stratified bootstrap resamples, vectorised."""
    pos, neg = s[m], s[~m]
    p, n0 = len(pos), len(neg)
    aucs = np.empty(resamples)
    tprs = np.empty((resamples, len(levels)))
    chunk = max(1, 2_000_000 // (p + n0))
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        sp = pos[rng.integers(0, p, (r, p))]
        sn = neg[rng.integers(0, n0, (r, n0))]
        # AUC via ranks (Mann-Whitney U with midranks for ties)
        both = np.concatenate([sp, sn], axis=1)
        ranks = stats.rankdata(both, axis=1)
        u = ranks[:, :p].sum(1) - p * (p + 1) / 2
        aucs[start : start + r] = u / (p * n0)
        sn_desc = -np.sort(-sn, axis=1)
        sp_asc = np.sort(sp, axis=1)
        for j, level in enumerate(levels):
            tprs[start : start + r, j] = [
                _tpr_at_level_sorted(sp_asc[i], sn_desc[i], level, strict) for i in range(r)
            ]
    return aucs, tprs


def summarize(
    scores: Any,
    is_member: Any,
    *,
    fpr_levels: Sequence[float] = DEFAULT_FPR_LEVELS,
    delta: float = 1e-5,
    alpha: float = 0.05,
    resamples: int = 1000,
    strict: bool = False,
    seed: int = 0,
) -> AttackMetrics:
    """All metrics of ATTACKS.md for one attack: ROC, AUC, TPR@FPR, CIs, epsilon lower bound."""
    s, m = _validate(scores, is_member)
    p, n0 = int(m.sum()), int((~m).sum())
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    fpr, tpr, _ = roc_curve(s, m)
    area = float(np.trapezoid(tpr, fpr))
    notes: list[str] = []
    unstable = []
    tpr_at, achieved = {}, {}
    for level in fpr_levels:
        tpr_at[level], achieved[level] = _tpr_at(fpr, tpr, level, strict)
        if level < 1 / n0:
            notes.append(
                f"FPR level {level:g} is below the resolution 1/{n0} non-members: the value is TPR at "
                "zero false positives"
            )
        if n0 < 10 / level:
            unstable.append(level)
            notes.append(
                f"TPR at FPR {level:g} is unstable with {n0} non-members (fewer than {10 / level:g})"
            )
    for note in notes:
        warnings.warn(note, stacklevel=2)
    rng = np.random.default_rng(seed)
    aucs, tprs = _bootstrap(s, m, list(fpr_levels), strict, resamples, rng)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    auc_ci = tuple(float(v) for v in np.percentile(aucs, q))
    tpr_ci = {lv: tuple(float(v) for v in np.percentile(tprs[:, j], q)) for j, lv in enumerate(fpr_levels)}
    eps = split_epsilon_lower_bound(s, m, delta=delta, alpha=alpha, seed=seed)
    if eps.saturated:
        notes.append(
            "epsilon lower bound saturated: no errors on the evaluation half, so the bound is the "
            f"ceiling {eps.epsilon:.3g} for {eps.positives} + {eps.negatives} trials, not a measurement"
        )
    return AttackMetrics(
        auc=area,
        auc_ci=auc_ci,  # type: ignore[arg-type]
        balanced_accuracy=float(np.max((tpr + 1 - fpr) / 2)),
        advantage=float(np.max(tpr - fpr)),
        tpr_at_fpr=tpr_at,
        tpr_at_fpr_ci=tpr_ci,  # type: ignore[arg-type]
        achieved_fpr=achieved,
        epsilon_lb=eps,
        members=p,
        non_members=n0,
        unstable_levels=tuple(unstable),
        warnings=tuple(notes),
        roc=(fpr, tpr),
    )
