"""Validation at the boundary for the files mia-audit reads back: ``results.json`` and
``model.json``. Each check names the file and the field; a number that is NaN or infinite is
refused wherever a measurement is expected.

A small hand-written layer rather than jsonschema or pydantic: the rules that matter here are
numeric (finite, in range, intervals ordered, levels consistent between a metric and its
interval), which a JSON Schema states awkwardly, and the package stays free of a dependency
for two file types.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SchemaError", "validate_model_meta", "validate_results"]

RESULTS_SCHEMA = "mia-audit/results/v1"


class SchemaError(ValueError):
    """A results or model file that does not follow its schema (exit code 2)."""


def _number(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SchemaError(f"{where}: expected a finite number, got {value!r}")
    if not (lo <= value <= hi):
        raise SchemaError(f"{where}: {value!r} is outside [{lo:g}, {hi:g}]")
    return float(value)


def _interval(value: Any, where: str, lo: float, hi: float) -> None:
    if not isinstance(value, list) or len(value) != 2:
        raise SchemaError(f"{where}: expected an interval [low, high], got {value!r}")
    a, b = _number(value[0], where, lo, hi), _number(value[1], where, lo, hi)
    if a > b:
        raise SchemaError(f"{where}: interval {value!r} has its low end above its high end")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _level(key: str, where: str) -> float:
    try:
        level = float(key)
    except ValueError:
        raise SchemaError(f"{where}: FPR level {key!r} is not a number") from None
    if not (0 < level < 1):
        raise SchemaError(f"{where}: FPR level {key!r} is not in (0, 1)")
    return level


def _attack(m: Any, where: str) -> None:
    m = _table(m, where)
    _number(m.get("auc"), f"{where}.auc", 0, 1)
    _interval(m.get("auc_ci"), f"{where}.auc_ci", 0, 1)
    _number(m.get("epsilon_lb"), f"{where}.epsilon_lb", 0)
    tpr = _table(m.get("tpr_at_fpr"), f"{where}.tpr_at_fpr")
    ci = _table(m.get("tpr_at_fpr_ci"), f"{where}.tpr_at_fpr_ci")
    if not tpr:
        raise SchemaError(f"{where}.tpr_at_fpr: no FPR level")
    if set(tpr) != set(ci):
        raise SchemaError(f"{where}: TPR levels {sorted(tpr)} and their intervals {sorted(ci)} differ")
    for key, value in tpr.items():
        _level(key, f"{where}.tpr_at_fpr")
        _number(value, f"{where}.tpr_at_fpr[{key}]", 0, 1)
        _interval(ci[key], f"{where}.tpr_at_fpr_ci[{key}]", 0, 1)


def _canary_audit(a: Any, where: str) -> None:
    from attacks.bounds import METHODS

    a = _table(a, where)
    if not isinstance(a.get("threat_model"), str):
        raise SchemaError(f"{where}.threat_model: expected a name")
    bounds = a.get("bounds")
    if not isinstance(bounds, list) or not bounds:
        raise SchemaError(f"{where}.bounds: expected a non-empty list")
    eps = a.get("accountant_epsilon")
    if eps is not None:
        _number(eps, f"{where}.accountant_epsilon", 0)
    for i, b in enumerate(bounds):
        w = f"{where}.bounds[{i}]"
        b = _table(b, w)
        if b.get("method") not in METHODS:
            raise SchemaError(f"{w}.method: {b.get('method')!r} is not one of {', '.join(METHODS)}")
        _number(b.get("epsilon_lb"), f"{w}.epsilon_lb", 0)
        _number(b.get("delta"), f"{w}.delta", 0, 1)
        _number(b.get("confidence"), f"{w}.confidence", 0.5, 1)
        if not isinstance(b.get("valid"), bool):
            raise SchemaError(f"{w}.valid: expected true or false")
        tests = b.get("tests", 1)
        if isinstance(tests, bool) or not isinstance(tests, int) or tests < 1:
            raise SchemaError(f"{w}.tests: expected an integer >= 1, got {tests!r}")
        counts = _table(b.get("counts"), f"{w}.counts")
        for k, v in counts.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SchemaError(f"{w}.counts.{k}: expected a count, got {v!r}")


def validate_results(doc: Any, what: str) -> dict[str, Any]:
    """``doc`` if it is a well-formed results.json, else SchemaError naming ``what`` and the field."""
    from .files import check_id

    doc = _table(doc, what)
    if doc.get("schema") != RESULTS_SCHEMA:
        raise SchemaError(f"{what} is not a mia-audit results file (schema {doc.get('schema')!r})")
    ds = _table(doc.get("dataset"), f"{what}: dataset")
    if not isinstance(ds.get("sha256"), str) or not ds.get("sha256"):
        raise SchemaError(f"{what}: dataset.sha256 missing")
    targets = doc.get("targets")
    if not isinstance(targets, list) or not targets:
        raise SchemaError(f"{what}: no targets (an empty result cannot pass or fail a gate)")
    seen = set()
    for i, t in enumerate(targets):
        t = _table(t, f"{what}: targets[{i}]")
        try:
            tid = check_id(t.get("id"), "target id")
        except ValueError as err:
            raise SchemaError(f"{what}: targets[{i}]: {err}") from None
        if tid in seen:
            raise SchemaError(f"{what}: target id {tid!r} appears twice")
        seen.add(tid)
        where = f"{what}: target {tid}"
        privacy = _table(t.get("privacy"), f"{where}.privacy")
        if privacy.get("epsilon") is not None:
            _number(privacy["epsilon"], f"{where}.privacy.epsilon", 0)
        attacks = _table(t.get("attacks"), f"{where}.attacks")
        audits = t.get("canary_audits", [])
        if not isinstance(audits, list):
            raise SchemaError(f"{where}.canary_audits: expected a list")
        if not attacks and not audits:
            raise SchemaError(f"{where}: neither attacks nor canary audits")
        for name, m in attacks.items():
            _attack(m, f"{where}.attacks[{name}]")
        for j, a in enumerate(audits):
            _canary_audit(a, f"{where}.canary_audits[{j}]")
    return doc


def validate_model_meta(meta: Any, what: str) -> dict[str, Any]:
    """``meta`` if it has what mia-audit reads from a model.json, else SchemaError."""
    meta = _table(meta, what)
    for key in ("model", "mechanism"):
        if not isinstance(meta.get(key), str) or not meta.get(key):
            raise SchemaError(f"{what}: '{key}' must be a name, got {meta.get(key)!r}")
    ds = _table(meta.get("dataset"), f"{what}: dataset")
    if not isinstance(ds.get("id"), str) or not isinstance(ds.get("sha256"), str):
        raise SchemaError(f"{what}: dataset needs 'id' and 'sha256' strings")
    if not isinstance(ds.get("options", {}), dict):
        raise SchemaError(f"{what}: dataset.options must be an object")
    _table(meta.get("hyperparameters", {}), f"{what}: hyperparameters")
    _table(meta.get("privacy", {}), f"{what}: privacy")
    return meta
