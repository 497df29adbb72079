"""Oracles the tests share: values computed by the reference library, not by mia-audit."""

import dp_accounting


def dp_epsilon(event, steps, delta, accountant="pld"):
    """Epsilon at ``delta`` of ``event`` composed ``steps`` times, from a fresh dp-accounting
    accountant (``pld`` with its defaults, or ``rdp`` with its default orders)."""
    acc = dp_accounting.pld.PLDAccountant() if accountant == "pld" else dp_accounting.rdp.RdpAccountant()
    acc.compose(event, steps)
    return acc.get_epsilon(delta)
