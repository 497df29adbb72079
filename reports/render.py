"""Renderers: a self-contained ``report.html`` (inline SVG, no scripts, no network) and a
``summary.md`` for pull-request comments, from results.json and the per-target arrays."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from attacks.metrics import auc

from .figures import epsilon_figure, exposed_figure, roc_figure, tradeoff_figure

__all__ = ["TargetArrays", "render_html", "render_markdown", "strongest_attack"]

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
        "bootstrap 95%; ε lower bounds are Clopper-Pearson (threshold chosen on a held-out half).</p>",
    ]
    for note in notes or []:
        parts.append(f"<p class='warn'>{html.escape(note)}</p>")
    if targets and strongest:
        parts.append("<h2>Utility vs empirical privacy</h2>")
        parts.append(f"<figure>{tradeoff_figure(targets, strongest)}</figure>")
        eps_svg = epsilon_figure(targets)
        if eps_svg:
            parts.append("<h3>Empirical ε against the accountant's ε</h3>")
            parts.append(
                "<p class='note'>Every point must lie on or below y = x: the accountant's ε is a "
                "proof, the empirical one a statistical lower bound.</p>"
            )
            parts.append(f"<figure>{eps_svg}</figure>")
        summary = [
            [
                t["id"],
                str(t.get("mechanism")),
                _privacy_short(t["privacy"]),
                f"{t['test_accuracy']:.4f}" if t.get("test_accuracy") is not None else "n/a",
                strongest[t["id"]],
                f"{t['attacks'][strongest[t['id']]]['tpr_at_fpr'].get('0.001', float('nan')):.4f}",
                f"{max(a['epsilon_lb'] for a in t['attacks'].values()):.3f}",
            ]
            for t in targets
            if t["attacks"]
        ]
        parts.append(
            _table(
                [
                    "target",
                    "mechanism",
                    "privacy (accountant)",
                    "held-out accuracy",
                    "strongest attack",
                    "TPR@0.1%",
                    "max ε lower bound",
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


def render_markdown(results: dict[str, Any]) -> str:
    """A compact summary for pull-request comments."""
    lines = [f"## mia-audit: {results['dataset']['id']} ({results['dataset']['population']} examples)", ""]
    lines += [
        "| target | privacy | held-out acc. | attack | AUC [95% CI] | TPR@0.1% | TPR@1% | ε lower bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        for name, m in t["attacks"].items():
            tp = m["tpr_at_fpr"]
            lines.append(
                f"| {t['id']} | {_privacy_short(t['privacy'])} | {t.get('test_accuracy') or float('nan'):.4f} | {name} | "
                f"{m['auc']:.3f} {_ci(m['auc_ci'])} | {tp.get('0.001', float('nan')):.4f} | "
                f"{tp.get('0.01', float('nan')):.4f} | {m['epsilon_lb']:.3f} |"
            )
    lines += ["", "Scores: higher = member. TPR@0.1% with fewer than 10,000 non-members is unstable."]
    notes = [
        f"- {t['id']}: {t['privacy']['note']}"
        for t in results["targets"]
        if not t["privacy"].get("formal") and t["privacy"].get("note")
    ]
    if notes:
        lines += ["", "Privacy notes:", *notes]
    return "\n".join(lines) + "\n"
