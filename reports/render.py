"""Renderers: a self-contained ``report.html`` (inline SVG, no scripts, no network) and a
``summary.md`` for pull-request comments, from results.json and the per-target arrays."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from attacks.metrics import auc

from .figures import epsilon_figure, exposed_figure, roc_figure, tradeoff_figure

__all__ = [
    "TargetArrays",
    "render_html",
    "render_markdown",
    "strongest_attack",
    "strongest_valid_bound",
    "valid_bounds",
]

EXPOSED = 16


@dataclass(frozen=True)
class TargetArrays:
    """Per-target arrays a report needs: every attack's scores [N] and the membership [N]."""

    scores: dict[str, np.ndarray]
    keep: np.ndarray


def strongest_attack(target: dict[str, Any]) -> str:
    """The attack with the highest TPR at 0.1% FPR (ties: higher AUC)."""
    return max(
        target["attacks"],
        key=lambda a: (target["attacks"][a]["tpr_at_fpr"].get("0.001", 0.0), target["attacks"][a]["auc"]),
    )


def valid_bounds(target: dict[str, Any]) -> list[tuple[str, float]]:
    """Every valid empirical epsilon lower bound of a target: (label, value).

    The attacks' Clopper-Pearson bounds (threshold from a held-out half) and the canary
    audits' bounds marked valid; Gaussian-DP estimates and f-DP bounds (which assume a curve
    shape) are left out.
    """
    out = [(f"attack {name}", float(m["epsilon_lb"])) for name, m in target.get("attacks", {}).items()]
    for audit in target.get("canary_audits", []):
        out += [
            (f"{audit['threat_model']} {b['method']}", float(b["epsilon_lb"]))
            for b in audit["bounds"]
            if b["valid"]
        ]
    return out


def strongest_valid_bound(target: dict[str, Any]) -> tuple[str, float] | None:
    """The largest valid bound of a target and what gave it (None without any)."""
    bounds = valid_bounds(target)
    return max(bounds, key=lambda b: b[1]) if bounds else None


def _canary_rows(target: dict[str, Any]) -> list[list[str]]:
    rows = []
    for audit in target.get("canary_audits", []):
        for b in audit["bounds"]:
            counts = ", ".join(f"{k} {v}" for k, v in b["counts"].items())
            value = f"{b['epsilon_lb']:.3f}" + (" (ceiling)" if b.get("saturated") else "")
            rows.append(
                [
                    audit["threat_model"],
                    f"{audit['m']:,} ({audit['calibration_canaries']:,} calibrating)",
                    b["method"],
                    value,
                    "valid bound"
                    if b["valid"]
                    else ("estimate" if b["method"] == "gdp-estimate" else "assumes GDP"),
                    f"{b['confidence']:.0%}, δ = {b['delta']:g}",
                    counts,
                ]
            )
    return rows


_CANARY_HEAD = ["threat model", "canaries audited", "method", "ε lower bound", "kind", "confidence", "counts"]


def _privacy_text(p: dict[str, Any]) -> str:
    if p.get("formal") and p.get("epsilon") is not None:
        return f"ε = {p['epsilon']:.4g}, δ = {p['delta']:g} ({p.get('accountant')})"
    return "no formal guarantee" + (f": {p['note']}" if p.get("note") else "")


def _privacy_short(p: dict[str, Any]) -> str:
    """For table cells: the formal epsilon, or "no formal guarantee" (with a stated epsilon
    when the mechanism states one, e.g. SA-DPSGD as published); the reasons go in notes."""
    if p.get("formal") and p.get("epsilon") is not None:
        return _privacy_text(p)
    if p.get("epsilon") is not None:
        return f"no formal guarantee (stated ε = {p['epsilon']:.4g}, not a bound)"
    return "no formal guarantee"


def _ci(v: list[float] | None) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]" if v else ""


def _metrics_rows(target: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in target["attacks"].items():
        t, c = m["tpr_at_fpr"], m.get("tpr_at_fpr_ci", {})
        unstable = set(m.get("unstable_fpr_levels", []))

        def cell(level: str, t: dict = t, c: dict = c, unstable: set = unstable) -> str:
            flag = " ⚠" if level in unstable else ""
            return f"{t[level]:.4f} {_ci(c.get(level))}{flag}" if level in t else "n/a"

        eps = m["epsilon_lb"]
        details = m.get("epsilon_lb_details", {})
        eps_text = f"{eps:.3f}" + (" (ceiling)" if details.get("saturated") else "")
        rows.append(
            [
                name,
                f"{m['auc']:.3f} {_ci(m['auc_ci'])}",
                cell("0.001"),
                cell("0.01"),
                cell("0.1"),
                f"{m['advantage']:.3f}",
                eps_text,
            ]
        )
    return rows


_HEAD = ["attack", "AUC [95% CI]", "TPR@0.1% FPR", "TPR@1% FPR", "TPR@10% FPR", "advantage", "ε lower bound"]


def _table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _per_class(scores: np.ndarray, keep: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    rows = []
    for c in np.unique(labels):
        sel = labels == c
        k = keep[sel]
        if k.all() or not k.any():
            continue
        rows.append([str(int(c)), str(int(k.sum())), str(int((~k).sum())), f"{auc(scores[sel], k):.3f}"])
    return rows


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f2f2f2}.note{color:#555;font-size:.9em}
.warn{background:#fff6dd;border-left:4px solid #e0a800;padding:.4em .8em;font-size:.88em}
figure{margin:1em 0}svg{max-width:100%;height:auto}.pill{display:inline-block;background:#eef;padding:.1em .5em;
border-radius:.6em;font-size:.85em}
"""


def render_html(
    results: dict[str, Any],
    arrays: dict[str, TargetArrays],
    labels: np.ndarray,
    images: np.ndarray | None = None,
    *,
    title: str = "Privacy audit",
    notes: list[str] | None = None,
) -> str:
    """The whole report as one HTML string."""
    targets = results["targets"]
    ds = results["dataset"]
    strongest = {t["id"]: strongest_attack(t) for t in targets if t["attacks"]}
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Dataset <b>{html.escape(str(ds['id']))}</b> ({ds['population']} examples), seed "
        f"{results['seed']}, {len(targets)} target(s). Scores: higher = more likely a member; AUC is "
        "never flipped; TPR at FPR uses FPR ≤ level without interpolation; intervals are stratified "
        "bootstrap 95%; the attacks' ε lower bounds are Clopper-Pearson (threshold chosen on a held-out "
        "half); canary audits bound ε from canaries planted on purpose (white box: gradient canaries "
        "riding along in training; black box: input canaries in a canary twin), each bound with its "
        "method and confidence.</p>",
    ]
    for note in notes or []:
        parts.append(f"<p class='warn'>{html.escape(note)}</p>")
    if targets:
        parts.append("<h2>Utility vs empirical privacy</h2>")
        if any(strongest_valid_bound(t) for t in targets):
            parts.append(f"<figure>{tradeoff_figure(targets, strongest)}</figure>")
        eps_svg = epsilon_figure(targets)
        if eps_svg:
            parts.append("<h3>Empirical ε against the accountant's ε</h3>")
            parts.append(
                "<p class='note'>Every valid bound must lie on or below y = x: the accountant's ε is a "
                "proof, an empirical bound a statistical lower bound (each at its stated confidence). "
                "Canary audits plant examples or gradients on purpose and are far stronger than "
                "attacks on ordinary members.</p>"
            )
            parts.append(f"<figure>{eps_svg}</figure>")
        summary = []
        for t in targets:
            best = strongest[t["id"]] if t["id"] in strongest else None
            sv = strongest_valid_bound(t)
            summary.append(
                [
                    t["id"],
                    str(t.get("mechanism")),
                    _privacy_short(t["privacy"]),
                    f"{t['test_accuracy']:.4f}" if t.get("test_accuracy") is not None else "n/a",
                    best or "n/a",
                    f"{t['attacks'][best]['tpr_at_fpr'].get('0.001', float('nan')):.4f}" if best else "n/a",
                    f"{sv[1]:.3f} ({sv[0]})" if sv else "n/a",
                ]
            )
        parts.append(
            _table(
                [
                    "target",
                    "mechanism",
                    "privacy (accountant)",
                    "held-out accuracy",
                    "strongest attack",
                    "TPR@0.1%",
                    "strongest valid ε lower bound",
                ],
                summary,
            )
        )
    for t in targets:
        a = arrays.get(t["id"])
        parts.append(f"<h2 id='{html.escape(t['id'])}'>Target {html.escape(t['id'])}</h2>")
        parts.append(
            f"<p><span class='pill'>{html.escape(str(t['model']))}</span> "
            f"<span class='pill'>{html.escape(str(t.get('mechanism')))}</span> "
            f"{html.escape(_privacy_text(t['privacy']))}; held-out accuracy "
            f"{t.get('test_accuracy', float('nan')):.4f}, train accuracy "
            f"{t.get('train_accuracy') or float('nan'):.4f}; {t['references']} reference models, "
            f"{t['queries']} queries per example.</p>"
        )
        for line in t.get("not_run", []):
            parts.append(f"<p class='warn'>{html.escape(line)}</p>")
        if t.get("canary_audits"):
            first = t["canary_audits"][0]
            parts.append("<h3>Canary audits</h3>")
            notes = []
            for audit in t["canary_audits"]:
                if audit["threat_model"] == "black-box":
                    twin = audit.get("twin", {})
                    notes.append(
                        f"Black box: {audit['m']:,} {audit['canary_kind']} input canaries, each included with "
                        "probability 1/2 in a canary twin (the target's recipe and seed plus the included "
                        f"canaries; held-out accuracy {twin.get('test_accuracy', float('nan')):.4f}, target "
                        f"{twin.get('target_test_accuracy', float('nan')):.4f}); scored by their loss on the "
                        "twin's outputs; guess counts from a fixed grid (Bonferroni)."
                    )
                elif audit is first or audit["threat_model"] == "white-box-steps":
                    notes.append(
                        f"White box: {audit['m'] + audit['calibration_canaries']:,} gradient canaries, each "
                        "included with probability 1/2; the calibrating ones only choose thresholds and guess "
                        f"counts. {audit['steps']} released steps."
                    )
            parts.append(
                "<p class='note'>"
                + html.escape(" ".join(dict.fromkeys(notes)))
                + " Valid bounds hold at their confidence whatever the mechanism; estimates and f-DP bounds "
                "assume a Gaussian privacy curve.</p>"
            )
            parts.append(_table(_CANARY_HEAD, _canary_rows(t)))
            eps = first.get("accountant_epsilon")
            sv = max(
                (b for a in t["canary_audits"] for b in a["bounds"] if b["valid"]),
                key=lambda b: b["epsilon_lb"],
                default=None,
            )
            if eps is not None and sv is not None and sv["epsilon_lb"] > eps:
                parts.append(
                    f"<p class='warn'>A valid canary bound ({sv['method']}, {sv['epsilon_lb']:.3f}) exceeds the "
                    f"{'accountant' if first.get('formal') else 'stated'} ε {eps:.4g}: the implementation or its "
                    "accounting is wrong, unless this is the chance its confidence allows.</p>"
                )
        if not t["attacks"]:
            continue
        parts.append(_table(_HEAD, _metrics_rows(t)))
        warns = sorted({w for m in t["attacks"].values() for w in m.get("warnings", [])})
        if warns:
            parts.append(
                "<div class='warn'><b>Resolution and saturation warnings</b> (⚠ marks unstable "
                "values):<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warns) + "</ul></div>"
            )
        if a is None:
            continue
        roc = roc_figure(f"ROC, target {t['id']}", a.scores, a.keep, t["attacks"])
        parts.append(f"<figure>{roc}</figure>")
        best = strongest[t["id"]]
        parts.append(f"<h3>Leakage per class ({html.escape(best)})</h3>")
        parts.append(
            _table(["class", "members", "non-members", "AUC"], _per_class(a.scores[best], a.keep, labels))
        )
        members = np.flatnonzero(a.keep)
        top = members[np.argsort(-a.scores[best][members], kind="stable")[:EXPOSED]]
        parts.append(f"<h3>The {len(top)} most exposed members ({html.escape(best)} score)</h3>")
        if images is not None and images.ndim == 4:
            parts.append(f"<figure>{exposed_figure(images, top, labels, a.scores[best])}</figure>")
        else:
            parts.append(
                _table(
                    ["example", "label", "score"],
                    [[str(i), str(int(labels[i])), f"{a.scores[best][i]:.4g}"] for i in top],
                )
            )
    body = "\n".join(parts)
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _md(value: Any) -> str:
    """Text safe inside a Markdown table cell that may be rendered as HTML (a pull-request
    comment): HTML escaped, pipes escaped, one line."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def render_markdown(results: dict[str, Any]) -> str:
    """A compact summary for pull-request comments."""
    lines = [
        f"## mia-audit: {_md(results['dataset']['id'])} ({results['dataset']['population']} examples)",
        "",
    ]
    lines += [
        "| target | privacy | held-out acc. | attack | AUC [95% CI] | TPR@0.1% | TPR@1% | ε lower bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        for name, m in t["attacks"].items():
            tp = m["tpr_at_fpr"]
            lines.append(
                f"| {_md(t['id'])} | {_md(_privacy_short(t['privacy']))} | "
                f"{t.get('test_accuracy') or float('nan'):.4f} | {_md(name)} | "
                f"{m['auc']:.3f} {_ci(m['auc_ci'])} | {tp.get('0.001', float('nan')):.4f} | "
                f"{tp.get('0.01', float('nan')):.4f} | {m['epsilon_lb']:.3f} |"
            )
    lines += ["", "Scores: higher = member. TPR@0.1% with fewer than 10,000 non-members is unstable."]
    canary = [t for t in results["targets"] if t.get("canary_audits")]
    if canary:
        lines += [
            "",
            "### Canary audits",
            "",
            "| target | accountant ε | threat model | canaries audited | method | ε lower bound | kind |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in canary:
            for audit in t["canary_audits"]:
                eps = audit.get("accountant_epsilon")
                eps_text = (
                    "n/a" if eps is None else f"{eps:.4g}" + ("" if audit.get("formal") else " (stated)")
                )
                for b in audit["bounds"]:
                    kind = (
                        "valid"
                        if b["valid"]
                        else ("estimate" if b["method"] == "gdp-estimate" else "assumes GDP")
                    )
                    lines.append(
                        f"| {_md(t['id'])} | {eps_text} | {_md(audit['threat_model'])} | {audit['m']:,} | "
                        f"{_md(b['method'])} | "
                        f"{b['epsilon_lb']:.3f}{' (ceiling)' if b.get('saturated') else ''} | {kind} |"
                    )
    notes = [
        f"- {_md(t['id'])}: {_md(t['privacy']['note'])}"
        for t in results["targets"]
        if not t["privacy"].get("formal") and t["privacy"].get("note")
    ]
    if notes:
        lines += ["", "Privacy notes:", *notes]
    return "\n".join(lines) + "\n"
