"""Loss-threshold attacks: global (Yeom et al. 2018) and difficulty-calibrated (Watson et al. 2022)."""

from __future__ import annotations

import numpy as np

from .registry import AttackResult, register_attack
from .signals import AttackInputs, cross_entropy

__all__ = ["loss_attack", "loss_calibrated_attack"]


def loss_attack(inputs: AttackInputs) -> AttackResult:
    """score = -(mean over queries of the target's loss): low loss -> member. No references."""
    loss = cross_entropy(inputs.target_logits, inputs.labels).mean(-1)
    return AttackResult(-loss)


def loss_calibrated_attack(inputs: AttackInputs) -> AttackResult:
    """score = -(loss_target - mean loss of the example over OUT references).

    Examples no reference left OUT fall back to the mean OUT loss over all examples; the result
    says how many did.
    """
    refs, keep = inputs.require_references("loss-calibrated", minimum=1)
    target = cross_entropy(inputs.target_logits, inputs.labels).mean(-1)
    ref_loss = cross_entropy(refs, inputs.labels).mean(-1)  # [M, N]
    out = ~keep
    counts = out.sum(0)
    global_mean = ref_loss[out].mean() if out.any() else ref_loss.mean()
    mean_out = np.where(counts > 0, (ref_loss * out).sum(0) / np.maximum(counts, 1), global_mean)
    fallback = int((counts == 0).sum())
    notes = {"fallback_no_out_references": fallback}
    return AttackResult(-(target - mean_out), notes)


register_attack(
    "loss", loss_attack, needs_references=False, description="global loss threshold (Yeom et al. 2018)"
)
register_attack(
    "loss-calibrated",
    loss_calibrated_attack,
    needs_references=True,
    description="loss minus the example's mean OUT-reference loss (Watson et al. 2022)",
)
