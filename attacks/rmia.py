"""RMIA (Zarifzadeh, Liu, Shokri, ICML 2024): pairwise likelihood ratios against a population.

``Pr(x|theta)`` is the target's true-label probability (mean over queries), ``Pr(x)`` its mean
over references (online: all; offline: OUT only, corrected as ``((1 + a) Pr_out + (1 - a)) / 2``
with ``a`` tuned on a reference playing the target). With ``r(x) = Pr(x|theta) / Pr(x)``,
``score(x)`` is the fraction of population points z with ``r(x) / r(z) >= gamma``.

The score is computed exactly by sorting r(z) once and binary-searching ``r(x) / gamma``:
O((n + z) log z) time and O(n + z) memory, never an n x z matrix.
"""

from __future__ import annotations

import numpy as np

from .metrics import auc
from .registry import AttackResult, register_attack
from .signals import AttackInputs, true_label_log_prob

__all__ = ["rmia", "rmia_scores", "rmia_scores_naive"]

A_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)


def rmia_scores(ratio_x: np.ndarray, ratio_z: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """Fraction of z with ratio_x / ratio_z >= gamma, for each x; exact, by sorting.

    >>> rmia_scores(np.array([1.0, 4.0]), np.array([1.0, 2.0, 3.0, 4.0]), gamma=2.0).tolist()
    [0.0, 0.5]
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    rz = np.sort(np.asarray(ratio_z, dtype=np.float64))
    # ratio_x / ratio_z >= gamma  <=>  ratio_z <= ratio_x / gamma   (all ratios > 0)
    return np.searchsorted(rz, np.asarray(ratio_x, dtype=np.float64) / gamma, side="right") / len(rz)


def rmia_scores_naive(ratio_x: np.ndarray, ratio_z: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """The n x z definition, for tests on small inputs."""
    return ((ratio_x[:, None] / ratio_z[None, :]) >= gamma).mean(1)


def _probs(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.exp(true_label_log_prob(logits, labels)).mean(-1)


def _offline_prior(p_ref: np.ndarray, out: np.ndarray, a: float) -> np.ndarray:
    count = out.sum(0)
    fallback = (p_ref * out).sum() / max(1, out.sum())
    p_out = np.where(count > 0, (p_ref * out).sum(0) / np.maximum(count, 1), fallback)
    return ((1 + a) * p_out + (1 - a)) / 2


def _tune_a(p_ref: np.ndarray, keep: np.ndarray, gamma: float) -> float:
    """The ``a`` that maximises offline-RMIA AUC with reference 0 playing the target."""
    if keep[0].all() or not keep[0].any():
        return 1.0
    best, best_auc = 1.0, -1.0
    for a in A_GRID:
        prior = _offline_prior(p_ref[1:], ~keep[1:], float(a))
        ratio = p_ref[0] / prior
        area = auc(rmia_scores(ratio, ratio, gamma), keep[0])
        if area > best_auc:
            best, best_auc = float(a), area
    return best


def rmia(
    inputs: AttackInputs, *, online: bool = True, gamma: float = 1.0, a: float | None = None
) -> AttackResult:
    """RMIA scores over the whole population as the z set (online, or offline with ``a``)."""
    refs, keep = inputs.require_references("rmia", minimum=2)
    p_t = _probs(inputs.target_logits, inputs.labels)  # [N]
    p_ref = _probs(refs, inputs.labels)  # [M, N]
    notes: dict[str, object] = {"online": online, "gamma": gamma}
    if online:
        prior = p_ref.mean(0)
    else:
        if a is None:
            a = _tune_a(p_ref, keep, gamma)
        prior = _offline_prior(p_ref, ~keep, a)
        notes["a"] = a
    tiny = np.finfo(np.float64).tiny
    ratio = np.maximum(p_t, tiny) / np.maximum(prior, tiny)
    return AttackResult(rmia_scores(ratio, ratio, gamma), notes)


register_attack(
    "rmia",
    rmia,
    needs_references=True,
    description="RMIA: pairwise likelihood ratio vs the population (Zarifzadeh et al. 2024)",
)
