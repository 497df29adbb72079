"""CI leakage gate: compare a run's results.json with a baseline and fail on regressions.

A check fails only when leakage rose beyond chance: for AUC and TPR at each FPR level, when
the current 95% interval lies entirely above the baseline's (the intervals are disjoint; a
point estimate merely above the baseline's interval happens by chance about 8% of the time per
metric, too often for a gate with dozens of checks). The epsilon lower bound, which has no
interval, fails when it exceeds the baseline's by more than ``epsilon_margin``. Absolute
limits from the ``[gate]`` table fail whenever exceeded.

Independently of any baseline, every *valid* empirical epsilon lower bound of a target with a
formal epsilon (canary audits, and the attacks' Clopper-Pearson bounds) is recomputed from its
counts at confidence ``1 - 0.01 / K`` (K: the number of such bounds in the results, a
Bonferroni split) and fails when it exceeds the accountant's epsilon: a correct implementation
trips this at most 1% of the time per run, so a failure means a DP bug or a wrong accounting.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from .config import GateLimits
from .schema import validate_results

__all__ = [
    "FALSE_ALARM_RATE",
    "Check",
    "GateError",
    "accountant_checks",
    "compare",
    "junit_xml",
    "load_gate_limits",
]

# The probability with which a correct run may fail the accountant checks.
FALSE_ALARM_RATE = 0.01


class GateError(ValueError):
    """Unreadable or mismatched results/baseline files (exit code 2)."""


@dataclass(frozen=True)
class Check:
    target: str
    attack: str
    metric: str
    passed: bool
    message: str


def load_gate_limits(path: str | None) -> GateLimits:
    """The ``[gate]`` table of a configuration file (other tables are ignored here)."""
    if path is None:
        return GateLimits()
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("gate", {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise GateError(f"cannot read gate limits from {path}: {err}") from err
    allowed = {f.name for f in fields(GateLimits)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise GateError(f"unknown key {unknown[0]!r} in [gate]; accepted: {', '.join(sorted(allowed))}")
    for key in ("max_auc", "max_epsilon_lb", "epsilon_margin"):
        if key in raw and (
            isinstance(raw[key], bool) or not isinstance(raw[key], int | float) or not math.isfinite(raw[key])
        ):
            raise GateError(f"[gate] {key} must be a finite number, got {raw[key]!r}")
    tpr = raw.get("max_tpr_at_fpr", {})
    if not isinstance(tpr, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in tpr.values()
    ):
        raise GateError(f"[gate] max_tpr_at_fpr must map FPR levels to finite numbers, got {tpr!r}")
    return GateLimits(**raw)


def _index(results: dict[str, Any], what: str) -> dict[tuple[str, str], dict[str, Any]]:
    validate_results(results, what)
    return {(t["id"], a): m for t in results["targets"] for a, m in t["attacks"].items()}


def _level_key(key: str, levels: dict[str, Any]) -> str:
    """The results' FPR level that a limit's key names, compared as numbers ("0.10" is "0.1")."""
    try:
        wanted = float(key)
    except ValueError:
        raise GateError(f"[gate] max_tpr_at_fpr key {key!r} is not an FPR level") from None
    for level in levels:
        if math.isclose(float(level), wanted, rel_tol=1e-9):
            return level
    raise GateError(
        f"[gate] max_tpr_at_fpr level {key!r} is not among the results' FPR levels ({', '.join(sorted(levels))})"
    )


def _valid_bounds(target: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, method, bound json with counts) of every valid bound of one target."""
    out = []
    for name, m in target.get("attacks", {}).items():
        d = m.get("epsilon_lb_details") or {}
        if {"fp", "negatives", "fn", "positives", "delta"} <= set(d):
            counts = {k: int(d[k]) for k in ("fp", "negatives", "fn", "positives")}
            out.append(
                (
                    f"attack {name}",
                    "clopper-pearson",
                    {"method": "clopper-pearson", "counts": counts, "delta": d["delta"], "tests": 1},
                )
            )
    for audit in target.get("canary_audits", []):
        for b in audit.get("bounds", []):
            if b.get("valid"):
                out.append((f"{audit['threat_model']} canaries (m={audit['m']})", b["method"], b))
    return out


def accountant_checks(results: dict[str, Any]) -> list[Check]:
    """Every valid bound of every formal target against its accountant's epsilon.

    Each bound is recomputed from its counts at confidence ``1 - FALSE_ALARM_RATE / K`` (K
    bounds in all), so a correct run fails with probability at most ``FALSE_ALARM_RATE``.
    """
    from attacks.bounds import recompute_epsilon

    validate_results(results, "results")
    pending = []
    for t in results.get("targets", []):
        privacy = t.get("privacy") or {}
        eps = privacy.get("epsilon")
        if not privacy.get("formal") or eps is None:
            continue
        pending += [(t["id"], float(eps), *b) for b in _valid_bounds(t)]
    if not pending:
        return []
    confidence = 1.0 - FALSE_ALARM_RATE / len(pending)
    checks = []
    for tid, eps, where, method, bound in pending:
        value = recompute_epsilon(bound, confidence)
        above = value > eps
        msg = (
            f"{method} bound from {where} is {value:.3f} at {confidence:.4%} confidence "
            f"(delta {float(bound['delta']):g}; {len(pending)} bounds share a {FALSE_ALARM_RATE:.0%} false-alarm "
            f"rate), accountant's epsilon {eps:.4g}"
        )
        if above:
            msg += (
                f": ABOVE it by {value - eps:.3f}. A valid lower bound cannot exceed a correct accountant's "
                "epsilon except with that small probability: the mechanism's implementation leaks more than it "
                "accounts for (a DP bug), or its epsilon is computed for a different mechanism"
            )
        checks.append(Check(tid, where, f"accountant:{method}", not above, msg))
    return checks


def compare(current: dict[str, Any], baseline: dict[str, Any], limits: GateLimits) -> list[Check]:
    """Every check of every target x attack present in the baseline."""
    cur, base = _index(current, "results"), _index(baseline, "baseline")
    if not base:
        raise GateError("the baseline has no attack results to compare with")
    if current["dataset"].get("sha256") != baseline["dataset"].get("sha256"):
        raise GateError("results and baseline are for different datasets (content hashes differ)")
    missing = sorted(set(base) - set(cur))
    if missing:
        t, a = missing[0]
        raise GateError(
            f"results lack target {t!r} x attack {a!r} that the baseline has ({len(missing)} missing)"
        )
    checks: list[Check] = []
    for (tid, attack), b in sorted(base.items()):
        c = cur[(tid, attack)]

        def interval(
            metric: str,
            now: float,
            now_ci: list[float],
            was: float,
            was_ci: list[float],
            tid: str = tid,
            attack: str = attack,
        ) -> None:
            rose = now_ci[0] > was_ci[1]
            msg = (
                f"{metric} {now:.4f} [{now_ci[0]:.4f}, {now_ci[1]:.4f}] vs baseline {was:.4f} "
                f"[{was_ci[0]:.4f}, {was_ci[1]:.4f}]" + (": leakage rose beyond chance" if rose else "")
            )
            checks.append(Check(tid, attack, metric, not rose, msg))

        interval("auc", c["auc"], c["auc_ci"], b["auc"], b["auc_ci"])
        missing_levels = sorted(set(b["tpr_at_fpr"]) - set(c["tpr_at_fpr"]))
        if missing_levels:
            raise GateError(
                f"results lack TPR at FPR {', '.join(missing_levels)} for target {tid!r} x attack {attack!r}, "
                "which the baseline has: the same FPR levels are needed to compare"
            )
        for level in b["tpr_at_fpr"]:
            interval(
                f"tpr@{level}",
                c["tpr_at_fpr"][level],
                c["tpr_at_fpr_ci"][level],
                b["tpr_at_fpr"][level],
                b["tpr_at_fpr_ci"][level],
            )
        rose = c["epsilon_lb"] > b["epsilon_lb"] + limits.epsilon_margin
        checks.append(
            Check(
                tid,
                attack,
                "epsilon_lb",
                not rose,
                f"epsilon_lb {c['epsilon_lb']:.3f} vs baseline {b['epsilon_lb']:.3f} "
                f"(margin {limits.epsilon_margin})" + (": leakage rose" if rose else ""),
            )
        )
        if limits.max_auc is not None:
            ok = c["auc"] <= limits.max_auc
            checks.append(Check(tid, attack, "max_auc", ok, f"auc {c['auc']:.4f} (limit {limits.max_auc})"))
        for key, cap in limits.max_tpr_at_fpr.items():
            level = _level_key(key, c["tpr_at_fpr"])
            ok = c["tpr_at_fpr"][level] <= cap
            checks.append(
                Check(
                    tid,
                    attack,
                    f"max_tpr@{level}",
                    ok,
                    f"tpr@{level} {c['tpr_at_fpr'][level]:.4f} (limit {cap})",
                )
            )
        if limits.max_epsilon_lb is not None:
            ok = c["epsilon_lb"] <= limits.max_epsilon_lb
            checks.append(
                Check(
                    tid,
                    attack,
                    "max_epsilon_lb",
                    ok,
                    f"epsilon_lb {c['epsilon_lb']:.3f} (limit {limits.max_epsilon_lb})",
                )
            )
    return checks


def junit_xml(checks: list[Check]) -> str:
    """One JUnit test case per check; failed checks carry a <failure> with the comparison."""
    failures = sum(not c.passed for c in checks)
    cases = []
    for c in checks:
        head = f"<testcase classname={quoteattr('mia-audit.' + c.target)} name={quoteattr(c.attack + ' ' + c.metric)}"
        if c.passed:
            cases.append(f"{head}><system-out>{quoteattr(c.message)[1:-1]}</system-out></testcase>")
        else:
            cases.append(f"{head}><failure message={quoteattr(c.message)}/></testcase>")
    return (
        f'<?xml version="1.0" encoding="utf-8"?>\n<testsuite name="mia-audit gate" tests="{len(checks)}" '
        f'failures="{failures}">\n' + "\n".join(cases) + "\n</testsuite>\n"
    )
