"""Shadow-model attack (Shokri et al. 2017) with a scikit-learn attack classifier.

The attack classifier learns IN/OUT from the reference ("shadow") models' outputs, labelled by
their keep masks, then scores the target's outputs. Features per (model, example), averaged
over queries: the top-k sorted softmax probabilities, the true-label probability, the loss, and
the label itself as a categorical feature (one classifier for all classes).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from .registry import AttackResult, register_attack
from .signals import AttackInputs

__all__ = ["shadow_attack", "shadow_features"]


def shadow_features(logits: np.ndarray, labels: np.ndarray, top_k: int = 3) -> np.ndarray:
    """Features [..., N, k + 3] from logits [..., N, Q, C]."""
    logp = log_softmax(logits.astype(np.float64), axis=-1)
    p = np.exp(logp).mean(-2)  # [..., N, C]
    k = min(top_k, p.shape[-1])
    top = -np.sort(-p, axis=-1)[..., :k]
    idx = np.broadcast_to(labels[:, None, None], (*logp.shape[:-1], 1))
    true_logp = np.take_along_axis(logp, idx, axis=-1)[..., 0]  # [..., N, Q]
    true_p = np.exp(true_logp).mean(-1)
    loss = -true_logp.mean(-1)
    label = np.broadcast_to(labels.astype(np.float64), true_p.shape)
    return np.concatenate([top, true_p[..., None], loss[..., None], label[..., None]], axis=-1)


def shadow_attack(inputs: AttackInputs, *, top_k: int = 3, max_iter: int = 200) -> AttackResult:
    """score = the attack classifier's P(member | target's outputs)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    refs, keep = inputs.require_references("shadow", minimum=1)
    if keep.all() or not keep.any():
        raise ValueError("shadow attack needs references with both IN and OUT examples")
    x_train = shadow_features(refs, inputs.labels, top_k).reshape(-1, min(top_k, refs.shape[-1]) + 3)
    y_train = keep.reshape(-1)
    n_features = x_train.shape[1]
    clf = HistGradientBoostingClassifier(
        max_iter=max_iter,
        categorical_features=[n_features - 1],
        random_state=inputs.seed,
        early_stopping=True,
    )
    clf.fit(x_train, y_train)
    x_target = shadow_features(inputs.target_logits, inputs.labels, top_k)
    return AttackResult(clf.predict_proba(x_target)[:, 1], {"train_rows": len(y_train)})


register_attack(
    "shadow",
    shadow_attack,
    needs_references=True,
    description="Shokri et al. 2017: attack classifier trained on reference models",
)
