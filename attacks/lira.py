"""Likelihood-ratio attack, LiRA (Carlini et al. 2022): online and offline.

Per example, Gaussians are fitted to LiRA's logit-scaled confidence phi over the reference
models that trained on it (IN) and those that did not (OUT), separately per query.

* online: score = mean over queries of log N(phi; mu_in, sd_in) - log N(phi; mu_out, sd_out)
* offline (OUT only): score = mean over queries of -log P[phi_out >= phi] (one-sided), or the
  reference code's two-sided ``-log N(phi; mu_out, sd_out)`` with ``variant="logpdf"``.

``fixed_variance`` replaces per-example standard deviations with one global IN and one global
OUT standard deviation, pooled over examples around each example's own centre. Its default,
``None``, turns it on with fewer than ``FIXED_VARIANCE_BELOW`` = 64 references, as ATTACKS.md
recommends (per-example variances from a handful of models make the tails, and so the TPR at
low FPR, unreliable); the notes record which was used. Examples with fewer than 2 IN (or OUT) references use the
global value anyway, and the result's notes say how many did.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from .registry import AttackResult, register_attack
from .signals import AttackInputs, logit_scaled_confidence

__all__ = ["lira_offline", "lira_online"]

# Added to standard deviations so a constant signal never divides by zero (reference code: 1e-30).
SD_FLOOR = 1e-30
# Below this many references, fixed (global) variances are the default (Carlini et al. 2022).
FIXED_VARIANCE_BELOW = 64


def _auto_fixed(fixed_variance: bool | None, references: int) -> bool:
    return references < FIXED_VARIANCE_BELOW if fixed_variance is None else bool(fixed_variance)


def _fit(phi: np.ndarray, mask: np.ndarray, center: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-example centre and sd [N, Q] of phi [M, N, Q] over references where mask [M, N].

    Returns (centre, sd, count [N], pooled global sd). The centre is NaN without references.
    """
    m3 = np.broadcast_to(mask[:, :, None], phi.shape)
    count = mask.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if center == "median":
            centre = np.nanmedian(np.where(m3, phi, np.nan), axis=0)
        else:
            centre = np.where(count[:, None] > 0, (phi * m3).sum(0) / np.maximum(count, 1)[:, None], np.nan)
        resid = np.where(m3, phi - centre[None], 0.0)
        sd = np.sqrt((resid**2).sum(0) / np.maximum(count, 1)[:, None])  # ddof=0, as the reference code
    total = int(m3.sum())
    pooled = float(np.sqrt((resid**2).sum() / total)) if total else 1.0
    return centre, sd, count, pooled


def _prepare(inputs: AttackInputs, attack: str, center: str):
    refs, keep = inputs.require_references(attack)
    if center not in ("mean", "median"):
        raise ValueError(f"center must be 'mean' or 'median', got {center!r}")
    phi_ref = logit_scaled_confidence(refs, inputs.labels)  # [M, N, Q]
    phi_t = logit_scaled_confidence(inputs.target_logits, inputs.labels)  # [N, Q]
    return phi_ref, phi_t, keep


def _sd(sd: np.ndarray, count: np.ndarray, pooled: float, fixed: bool) -> tuple[np.ndarray, int]:
    few = count < 2
    if fixed:
        return np.full_like(sd, pooled + SD_FLOOR), int(few.sum())
    return np.where(few[:, None], pooled, sd) + SD_FLOOR, int(few.sum())


def lira_online(
    inputs: AttackInputs, *, fixed_variance: bool | None = None, center: str = "mean"
) -> AttackResult:
    """Online LiRA: likelihood ratio of phi under the IN and OUT Gaussians."""
    phi_ref, phi_t, keep = _prepare(inputs, "lira-online", center)
    fixed_variance = _auto_fixed(fixed_variance, inputs.references)
    mu_in, sd_in, n_in, pooled_in = _fit(phi_ref, keep, center)
    mu_out, sd_out, n_out, pooled_out = _fit(phi_ref, ~keep, center)
    both = (n_in > 0) & (n_out > 0)
    gap = np.nanmean((mu_in - mu_out)[both], axis=0) if both.any() else np.zeros(phi_t.shape[1])
    no_in, no_out = n_in == 0, n_out == 0
    mu_in = np.where(no_in[:, None], mu_out + gap, mu_in)
    mu_out = np.where(no_out[:, None], mu_in - gap, mu_out)
    sd_in, few_in = _sd(sd_in, n_in, pooled_in, fixed_variance)
    sd_out, few_out = _sd(sd_out, n_out, pooled_out, fixed_variance)
    score = stats.norm.logpdf(phi_t, mu_in, sd_in) - stats.norm.logpdf(phi_t, mu_out, sd_out)
    notes = {
        "fixed_variance": fixed_variance,
        "fallback_global_variance": int(np.count_nonzero((n_in < 2) | (n_out < 2))),
        "fewer_than_2_in": few_in,
        "fewer_than_2_out": few_out,
        "no_in_reference": int(no_in.sum()),
        "no_out_reference": int(no_out.sum()),
    }
    return AttackResult(score.mean(-1), notes)


def lira_offline(
    inputs: AttackInputs,
    *,
    fixed_variance: bool | None = None,
    center: str = "mean",
    variant: str = "one-sided",
) -> AttackResult:
    """Offline LiRA: how unlikely phi is under the OUT Gaussian (higher phi = more member-like)."""
    if variant not in ("one-sided", "logpdf"):
        raise ValueError(f"variant must be 'one-sided' or 'logpdf', got {variant!r}")
    phi_ref, phi_t, keep = _prepare(inputs, "lira-offline", center)
    fixed_variance = _auto_fixed(fixed_variance, inputs.references)
    mu_out, sd_out, n_out, pooled = _fit(phi_ref, ~keep, center)
    no_out = n_out == 0
    if no_out.any():
        mu_out = np.where(no_out[:, None], np.nanmean(mu_out, axis=0), mu_out)
    sd_out, few = _sd(sd_out, n_out, pooled, fixed_variance)
    if variant == "one-sided":
        score = -stats.norm.logsf(phi_t, mu_out, sd_out)
    else:
        score = -stats.norm.logpdf(phi_t, mu_out, sd_out)
    notes = {
        "fixed_variance": fixed_variance,
        "variant": variant,
        "fallback_global_variance": few,
        "no_out_reference": int(no_out.sum()),
    }
    return AttackResult(score.mean(-1), notes)


register_attack(
    "lira-online",
    lira_online,
    needs_references=True,
    description="LiRA online: IN vs OUT Gaussian likelihood ratio (Carlini et al. 2022)",
)
register_attack(
    "lira-offline",
    lira_offline,
    needs_references=True,
    description="LiRA offline: one-sided OUT Gaussian tail (Carlini et al. 2022)",
)
