"""Membership-inference attacks and metrics: pure functions over arrays of signals.

Every attack returns float scores of shape [N]; higher means "more likely a member". This
package imports nothing else of the project.
"""

from .registry import attack_names, get_attack, register_attack

__all__ = ["attack_names", "get_attack", "register_attack"]
