"""Membership-inference attacks and metrics: pure functions over arrays of signals.

Every attack takes an :class:`AttackInputs` (target logits [N, Q, C], labels, optional
reference logits [M, N, Q, C] and keep masks [M, N]) and returns an :class:`AttackResult`
whose scores [N] are higher for "more likely a member". This package imports nothing else of
the project. Importing it registers the built-in attacks.
"""

from . import lira as _lira  # noqa: F401
from . import loss as _loss  # noqa: F401
from . import rmia as _rmia  # noqa: F401
from . import shadow as _shadow  # noqa: F401
from .metrics import (
    AttackMetrics,
    auc,
    epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    roc_curve,
    summarize,
)
from .registry import Attack, AttackResult, attack_names, get_attack, register_attack
from .signals import AttackInputs, cross_entropy, logit_scaled_confidence

__all__ = [
    "Attack",
    "AttackInputs",
    "AttackMetrics",
    "AttackResult",
    "attack_names",
    "auc",
    "cross_entropy",
    "epsilon_lower_bound",
    "get_attack",
    "logit_scaled_confidence",
    "one_run_epsilon_lower_bound",
    "register_attack",
    "roc_curve",
    "summarize",
]
