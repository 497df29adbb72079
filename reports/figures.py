"""Figures as inline SVG strings (matplotlib's object API: no pyplot, no global state)."""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from attacks.metrics import roc_curve

__all__ = ["epsilon_figure", "exposed_figure", "roc_figure", "tradeoff_figure"]

_counter = itertools.count()


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    # a distinct hash salt per figure keeps clip-path ids unique when several SVGs share a page
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"mia-audit-{next(_counter)}"}):
        # no metadata block: no date (reports are reproducible) and no RDF namespace URLs
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
        )
    text = buf.getvalue()
    return text[text.index("<svg") :]


def roc_figure(
    title: str, scores: dict[str, np.ndarray], is_member: np.ndarray, metrics: dict[str, Any]
) -> str:
    """Log-log ROC of every attack, axes from 1/non-members to 1, with the diagonal."""
    n0 = int((~is_member).sum())
    lo = 1.0 / n0
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    ax.plot([lo, 1], [lo, 1], color="0.6", ls="--", lw=1, label="chance")
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(s, is_member)
        m = metrics[name]
        t = m["tpr_at_fpr"]
        label = f"{name}: AUC {m['auc']:.3f}, TPR {t.get('0.001', float('nan')):.3f}@0.1%, {t.get('0.01', float('nan')):.3f}@1%"
        ax.plot(np.clip(fpr, lo, 1), np.clip(tpr, lo, 1), lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    return _svg(fig)


def _point_label(target: dict[str, Any]) -> str:
    p = target["privacy"]
    return (
        f"ε={p['epsilon']:.3g}" if p.get("formal") and p.get("epsilon") is not None else "no formal guarantee"
    )


def _valid_bounds(target: dict[str, Any]) -> list[tuple[str, float]]:
    from .render import valid_bounds

    return valid_bounds(target)


def tradeoff_figure(targets: Sequence[dict[str, Any]], strongest: dict[str, str]) -> str:
    """Held-out accuracy against empirical leakage: TPR@0.1% FPR of the strongest attack, and
    the strongest valid epsilon lower bound (attacks or canary audits; the label says which)."""
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    by_mech: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        by_mech.setdefault(str(t["mechanism"]), []).append(t)
    for mech, group in by_mech.items():
        group = sorted(group, key=lambda t: -(t["privacy"].get("epsilon") or float("inf")))
        color = None
        with_attacks = [t for t in group if t["id"] in strongest]
        if with_attacks:
            xs = [
                t["attacks"][strongest[t["id"]]]["tpr_at_fpr"].get("0.001", float("nan"))
                for t in with_attacks
            ]
            line = axes[0].plot(xs, [t["test_accuracy"] for t in with_attacks], marker="o", label=mech)[0]
            color = line.get_color()
            for x, t in zip(xs, with_attacks, strict=True):
                axes[0].annotate(
                    _point_label(t),
                    (x, t["test_accuracy"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
        bounded = [(t, max(b, key=lambda v: v[1])) for t in group if (b := _valid_bounds(t))]
        if bounded:
            xs = [b[1] for _, b in bounded]
            line = axes[1].plot(
                xs, [t["test_accuracy"] for t, _ in bounded], marker="o", label=mech, color=color
            )[0]
            for x, (t, _) in zip(xs, bounded, strict=True):
                axes[1].annotate(
                    _point_label(t),
                    (x, t["test_accuracy"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
    axes[0].set_xlabel("TPR at 0.1% FPR of the strongest attack")
    axes[1].set_xlabel("strongest valid empirical ε lower bound (which: see the table)")
    axes[0].set_ylabel("held-out accuracy")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    axes[1].legend(fontsize=8)
    fig.suptitle("Utility vs empirical privacy (left is more private)")
    return _svg(fig)


_MARKERS = {"attack": "o", "white-box-steps": "s", "white-box-final": "D", "black-box": "^"}


def epsilon_figure(targets: Sequence[dict[str, Any]]) -> str | None:
    """Every valid empirical epsilon lower bound against the accountant's epsilon, with y = x.

    Markers tell the source: an attack on ordinary members, or a canary audit's threat model.
    """
    pts = []
    for t in targets:
        p = t["privacy"]
        if not (p.get("formal") and p.get("epsilon") is not None):
            continue
        for label, value in _valid_bounds(t):
            pts.append((p["epsilon"], value, t["id"], label.split(" ")[0]))
    if not pts:
        return None
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    top = max(max(p[0] for p in pts), max(p[1] for p in pts)) * 1.1 + 0.1
    ax.plot([0, top], [0, top], color="0.6", ls="--", lw=1, label="y = x (a valid bound above it: a DP bug)")
    colors: dict[str, Any] = {}
    seen_kind: set[str] = set()
    for eps, lb, name, kind in pts:
        color = colors.setdefault(name, f"C{len(colors) % 10}")
        ax.scatter([eps], [lb], marker=_MARKERS.get(kind, "o"), color=color, s=22, alpha=0.8)
        seen_kind.add(kind)
    best: dict[str, tuple[float, float]] = {}
    for eps, lb, name, _ in pts:
        if name not in best or lb > best[name][1]:
            best[name] = (eps, lb)
    placed: dict[tuple[float, float], int] = {}
    for name, (eps, lb) in best.items():
        key = (round(eps, 1), round(lb, 1))
        k = placed[key] = placed.get(key, -1) + 1
        ax.annotate(
            name,
            (eps, lb),
            textcoords="offset points",
            xytext=(5, 4 + 11 * k),
            fontsize=7,
            color=colors[name],
        )
    for kind in sorted(seen_kind):
        ax.scatter(
            [],
            [],
            marker=_MARKERS.get(kind, "o"),
            color="0.3",
            label="attack on members" if kind == "attack" else f"canaries, {kind}",
        )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("accountant ε (proven upper bound)")
    ax.set_ylabel("valid empirical ε lower bound")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, alpha=0.3)
    return _svg(fig)


def exposed_figure(images: np.ndarray, indices: Sequence[int], labels: np.ndarray, scores: np.ndarray) -> str:
    """Thumbnails of the most exposed members with their label and attack score."""
    n = len(indices)
    cols = 8
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(cols * 1.1, rows * 1.35))
    for k, i in enumerate(indices):
        ax = fig.add_subplot(rows, cols, k + 1)
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(np.clip(np.transpose(img, (1, 2, 0)), 0, 1))
        ax.set_title(f"#{i} y={labels[i]}\n{scores[i]:.3g}", fontsize=6)
        ax.axis("off")
    return _svg(fig)
