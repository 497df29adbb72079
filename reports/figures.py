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


def tradeoff_figure(targets: Sequence[dict[str, Any]], strongest: dict[str, str]) -> str:
    """Held-out accuracy against empirical leakage: TPR@0.1% FPR and epsilon lower bound."""
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2, sharey=True)
    by_mech: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        by_mech.setdefault(str(t["mechanism"]), []).append(t)
    for mech, group in by_mech.items():
        group = sorted(group, key=lambda t: -(t["privacy"].get("epsilon") or float("inf")))
        ys = [t["test_accuracy"] for t in group]
        x1 = [t["attacks"][strongest[t["id"]]]["tpr_at_fpr"].get("0.001", float("nan")) for t in group]
        x2 = [max(a["epsilon_lb"] for a in t["attacks"].values()) for t in group]
        for ax, xs in zip(axes, (x1, x2), strict=True):
            line = ax.plot(xs, ys, marker="o", label=mech)[0]
            for x, y, t in zip(xs, ys, group, strict=True):
                ax.annotate(
                    _point_label(t),
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
    axes[0].set_xlabel("TPR at 0.1% FPR of the strongest attack")
    axes[1].set_xlabel("empirical ε lower bound (max over attacks)")
    axes[0].set_ylabel("held-out accuracy")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    axes[0].legend(fontsize=8)
    fig.suptitle("Utility vs empirical privacy (left is more private)")
    return _svg(fig)


def epsilon_figure(targets: Sequence[dict[str, Any]]) -> str | None:
    """Empirical epsilon lower bound against the accountant's epsilon, with y = x."""
    pts = [
        (t["privacy"]["epsilon"], max(a["epsilon_lb"] for a in t["attacks"].values()), t["id"])
        for t in targets
        if t["privacy"].get("formal") and t["privacy"].get("epsilon") is not None
    ]
    if not pts:
        return None
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.add_subplot()
    top = max(max(p[0] for p in pts), max(p[1] for p in pts)) * 1.1 + 0.1
    ax.plot([0, top], [0, top], color="0.6", ls="--", lw=1, label="y = x (a bound above it would be a bug)")
    seen: dict[tuple[float, float], int] = {}
    for eps, lb, name in pts:
        ax.scatter([eps], [lb])
        # stagger the labels of points that coincide (e.g. two mechanisms at the same epsilon)
        key = (round(eps, 1), round(lb, 1))
        k = seen[key] = seen.get(key, -1) + 1
        ax.annotate(name, (eps, lb), textcoords="offset points", xytext=(4, 4 + 11 * k), fontsize=7)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("accountant ε (proven upper bound)")
    ax.set_ylabel("empirical ε lower bound")
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
