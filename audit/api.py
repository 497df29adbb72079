"""A Python API for notebooks: audit an in-memory model in a few lines.

>>> import torch
>>> from torch import nn
>>> from audit import audit_model
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> x, y = torch.randn(200, 5), torch.randint(0, 2, (200,))
>>> members = torch.arange(200) < 100
>>> def train(model, x, y, *, seed):  # your own training code
...     opt = torch.optim.SGD(model.parameters(), lr=0.5)
...     for _ in range(50):
...         opt.zero_grad()
...         nn.functional.cross_entropy(model(x), y).backward()
...         opt.step()
>>> model = nn.Linear(5, 2)
>>> train(model, x[members], y[members], seed=0)
>>> results = audit_model(model, x, y, members, trainer=train, make_model=lambda: nn.Linear(5, 2),
...                       references=4, attacks=("loss", "lira-online"), resamples=100)
>>> sorted(results["targets"][0]["attacks"])
['lira-online', 'loss']
>>> 0.0 <= results["targets"][0]["attacks"]["loss"]["auc"] <= 1.0
True

``results`` is the document ``results.json`` holds (schema ``mia-audit/results/v1``). The
references are trained by ``trainer(model, x, y, *, seed)`` on fresh models from
``make_model()``, each on a balanced random half (every example IN for half of them); or
pass precomputed ``reference_logits`` ``[M, N, Q, C]`` with ``reference_keep`` ``[M, N]``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attack import AttackRequest, attack_logits, results_document
from .dataset import make_dataset
from .references import balanced_keep
from .signals import model_logits

__all__ = ["audit_model"]


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def audit_model(
    model: nn.Module,
    x: Any,
    y: Any,
    members: Any,
    *,
    trainer: Callable[..., Any] | None = None,
    make_model: Callable[[], nn.Module] | None = None,
    references: int = 8,
    reference_logits: Any = None,
    reference_keep: Any = None,
    attacks: Sequence[str] = ("loss", "lira-online", "lira-offline", "rmia"),
    queries: int = 1,
    fpr_levels: tuple[float, ...] = (0.001, 0.01, 0.1),
    delta: float = 1e-5,
    alpha: float = 0.05,
    resamples: int = 1000,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Membership-inference attacks on ``model`` over the population ``x``, ``y`` with the
    membership mask ``members`` (bool [N]); returns the results document.

    Reference-free attacks (``loss``) need nothing more; the others need references: a
    ``trainer`` and ``make_model``, or ``reference_logits`` and ``reference_keep``. ``queries``
    above 1 add augmented views of image inputs. ``out`` keeps the signal files (logits,
    scores); by default they go to a temporary folder.
    """
    xs, ys = _numpy(x), _numpy(y)
    kind = "image" if xs.ndim == 4 else "tabular"
    data = make_dataset("in-memory", xs, ys, kind=kind)
    keep = _numpy(members)
    if keep.dtype != bool or keep.shape != (data.population,):
        raise ValueError(f"members must be bool [{data.population}], got {keep.dtype} {list(keep.shape)}")
    request = AttackRequest(
        target="",
        attacks=tuple(attacks),
        references=references,
        queries=queries,
        fpr_levels=fpr_levels,
        delta=delta,
        alpha=alpha,
        resamples=resamples,
        seed=seed,
        progress=False,
    )
    device = next(model.parameters()).device
    model.eval()
    target = model_logits(model, data.x.to(device), queries=queries, stochastic=False)
    refs = None
    if reference_logits is not None or reference_keep is not None:
        if trainer is not None:
            raise ValueError("give a trainer or reference_logits with reference_keep, not both")
        refs = _given_references(reference_keep, reference_logits, target.shape)
    elif trainer is not None:
        if make_model is None:
            raise ValueError(
                "a trainer needs make_model, a function returning a fresh model of the architecture"
            )
        refs = _train_references(trainer, make_model, data, references, queries, seed, device)
    meta = {"model": type(model).__name__, "mechanism": "unknown", "privacy": {"formal": False}}
    with tempfile.TemporaryDirectory() as tmp:
        entry = attack_logits(
            meta,
            target,
            keep,
            data,
            refs,
            target_dir=Path(out or tmp) / "targets" / "model",
            request=request,
            tid="model",
        )
    return results_document(data, {}, seed, [entry])


def _given_references(keep: Any, logits: Any, target_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    k, z = _numpy(keep), _numpy(logits)
    m = len(k)
    if k.dtype != bool or k.ndim != 2 or k.shape[1] != target_shape[0]:
        raise ValueError(f"reference_keep must be bool [M, {target_shape[0]}], got {k.dtype} {list(k.shape)}")
    if z.dtype.kind != "f" or z.shape != (m, *target_shape):
        raise ValueError(
            f"reference_logits must be float [{m}, {', '.join(map(str, target_shape))}], got {list(z.shape)}"
        )
    if not np.isfinite(z).all():
        raise ValueError("reference_logits hold NaN or infinite values")
    return k, z.astype(np.float32)


def _train_references(
    trainer, make_model, data, m: int, queries: int, seed: int, device
) -> tuple[np.ndarray, np.ndarray]:
    """m references on balanced halves, seeded as ``mia-audit`` seeds its own."""
    keep = balanced_keep(m, data.population, np.random.default_rng(np.random.SeedSequence([seed, 2])))
    children = np.random.SeedSequence([seed, 1]).spawn(m)
    logits = []
    for i in range(m):
        init_seed, train_seed = (int(v) for v in children[i].generate_state(2))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = make_model().to(device)
        mask = torch.from_numpy(keep[i])
        net.train()
        trained = trainer(net, data.x[mask].to(device), data.y[mask].to(device), seed=train_seed)
        net = trained if isinstance(trained, nn.Module) else net
        net.eval()
        logits.append(model_logits(net, data.x.to(device), queries=queries, stochastic=False))
    return keep, np.stack(logits).astype(np.float32)
