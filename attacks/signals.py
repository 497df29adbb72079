"""Per-example signals computed from logits, and the validated input bundle of every attack.

Logits have shape [..., N, Q, C] (Q queries per example: augmentations or repeated stochastic
passes). Everything here is computed stably from logits with log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

__all__ = ["AttackInputs", "cross_entropy", "logit_scaled_confidence", "true_label_log_prob"]


def _gather(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """logits[..., n, q, labels[n]] -> [..., N, Q]."""
    idx = np.broadcast_to(labels[:, None, None], (*logits.shape[:-1], 1))
    return np.take_along_axis(logits, idx, axis=-1)[..., 0]


def true_label_log_prob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log softmax(logits)[y], shape [..., N, Q]."""
    z = logits.astype(np.float64)
    return _gather(z, labels) - logsumexp(z, axis=-1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy loss of the true label, shape [..., N, Q]."""
    return -true_label_log_prob(logits, labels)


def logit_scaled_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's phi = log p_y - log(sum_{y' != y} p_y'), shape [..., N, Q].

    Computed as ``z_y - logsumexp(z_{y' != y})``: the normaliser cancels, so no probability is
    ever rounded to 0 or 1 (which ``log(p / (1 - p))`` would suffer for confident models).

    >>> float(logit_scaled_confidence(np.array([[[3.0, 1.0, 1.0]]]), np.array([0]))[0, 0])
    1.3068528194400546
    """
    z = logits.astype(np.float64)
    correct = _gather(z, labels)
    masked = z.copy()
    idx = np.broadcast_to(labels[:, None, None], (*z.shape[:-1], 1))
    np.put_along_axis(masked, idx, -np.inf, axis=-1)
    return correct - logsumexp(masked, axis=-1)


@dataclass(frozen=True)
class AttackInputs:
    """What every attack receives: the target's logits, labels and (optionally) references.

    ``target_logits``: float [N, Q, C]; ``labels``: int [N] in [0, C); ``ref_logits``: float
    [M, N, Q, C] or None; ``ref_keep``: bool [M, N] or None (True where example n was in
    reference m's training set). Validated on construction.
    """

    target_logits: np.ndarray
    labels: np.ndarray
    ref_logits: np.ndarray | None = None
    ref_keep: np.ndarray | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t, y = np.asarray(self.target_logits), np.asarray(self.labels)
        if t.ndim != 3:
            raise ValueError(f"target logits must be [N, Q, C], got shape {t.shape}")
        n, _, c = t.shape
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {y.shape}")
        if y.dtype.kind not in "iu" or (n and (y.min() < 0 or y.max() >= c)):
            raise ValueError(f"labels must be integers in [0, {c}), got {y.dtype} in [{y.min()}, {y.max()}]")
        if not np.isfinite(t).all():
            raise ValueError(f"target logits contain {int((~np.isfinite(t)).sum())} NaN or infinite values")
        if (self.ref_logits is None) != (self.ref_keep is None):
            raise ValueError("give both ref_logits and ref_keep, or neither")
        if self.ref_logits is not None:
            r, k = np.asarray(self.ref_logits), np.asarray(self.ref_keep)
            if r.ndim != 4 or r.shape[1:] != t.shape:
                raise ValueError(f"reference logits must be [M, {n}, {t.shape[1]}, {c}], got {r.shape}")
            if k.shape != r.shape[:2] or k.dtype != bool:
                raise ValueError(f"ref_keep must be bool [M, N] = {r.shape[:2]}, got {k.dtype} {k.shape}")
            if not np.isfinite(r).all():
                raise ValueError(
                    f"reference logits contain {int((~np.isfinite(r)).sum())} NaN or infinite values"
                )

    @property
    def references(self) -> int:
        return 0 if self.ref_logits is None else int(self.ref_logits.shape[0])

    def require_references(self, attack: str, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
        if self.ref_logits is None or self.ref_keep is None or self.references < minimum:
            raise ValueError(
                f"attack {attack!r} needs at least {minimum} reference models, got {self.references}"
            )
        return self.ref_logits, self.ref_keep
