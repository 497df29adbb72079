"""Per-example gradients and flat clipping, without a Python loop over examples.

Two engines compute the same thing, the sum over a batch of per-example gradients each
clipped to L2 norm ``C`` over *all* parameters ("flat" clipping, MECHANISMS.md section 1):

* ``"vmap"``: ``torch.func.vmap(grad(...))`` over ``functional_call``. Works for any model
  whose per-example losses are independent (no BatchNorm). Materialises B x d gradients.
* ``"ghost"`` (book-keeping, Bu et al. 2022): one forward pass with hooks that keep each
  layer's input, one backward pass for the gradients of the summed loss with respect to the
  layers' *outputs* only, then per-example weight gradients (and their norms) from
  ``input x output-gradient`` products for ``Linear``, ``Conv2d`` and ``GroupNorm``. No
  parameter-gradient pass of autograd at all, so the cost is close to plain SGD's.

``"auto"`` uses ``ghost`` when every parametrised module is supported, else ``vmap``. Both are
tested against a loop over single examples. This module is the engine (clipping, tied
weights, the choice of engine); the ghost engine's per-layer rules are in
:mod:`mechanisms.ghost_rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .ghost_rules import GHOST_TYPES, LayerRule, Workspace, ghost_rules

__all__ = [
    "ClippedSum",
    "Workspace",
    "clip_and_sum",
    "clip_factors",
    "clipped_grad_sum",
    "ghost_per_example_grads",
    "ghost_supported",
    "per_example_grads",
    "shared_parameters",
]

# Added to a norm before dividing, so a clipped gradient's norm is strictly below C (Opacus
# uses the same constant).
NORM_EPS = 1e-6

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


@dataclass(frozen=True)
class ClippedSum:
    """Sum over a batch of clipped per-example gradients.

    ``grads`` maps parameter name -> tensor of the parameter's shape; ``norms`` are the
    per-example gradient norms before clipping, shape [B]; ``loss_sum`` is the summed loss.
    The ``grads`` tensors are freshly allocated (never workspace views): callers may modify them.
    """

    grads: dict[str, torch.Tensor]
    norms: torch.Tensor
    loss_sum: float


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Factors ``min(1, C / (norm + 1e-6))`` that bring each gradient's norm to at most C.

    >>> clip_factors(torch.tensor([0.5, 2.0]), 1.0)
    tensor([1.0000, 0.5000])
    """
    return (clip_norm / (norms + NORM_EPS)).clamp(max=1.0)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_example_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = _sum_ce,
    params: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-example gradients with ``torch.func``: name -> tensor [B, *param.shape].

    ``params`` evaluates the gradients at other parameter values than the model's own (same
    names and shapes as its trainable parameters), e.g. perturbed copies.
    """
    if params is None:
        params = {n: p.detach() for n, p in _trainable(model).items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)


def shared_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters owned by more than one module (tied weights)."""
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{mod_name}.{name}" if mod_name else name)
    return sorted(names[0] for names in owners.values() if len(set(names)) > 1)


def ghost_supported(model: nn.Module) -> bool:
    """True when every module that owns trainable parameters has a book-keeping rule and no
    parameter is shared between modules (tied weights go to the vmap engine, whose
    ``functional_call`` sums a shared parameter's uses)."""
    if shared_parameters(model):
        return False
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, GHOST_TYPES):
            return False
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            return False
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            return False
    return True


def clip_and_sum(
    grads: dict[str, torch.Tensor], clip_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Flat-clip materialised per-example gradients [B, ...] and sum them: (sums, norms [B])."""
    first = next(iter(grads.values()))
    sq = torch.zeros(first.shape[0], dtype=first.dtype, device=first.device)
    for g in grads.values():
        sq += torch.linalg.vector_norm(g.flatten(1), dim=1).square()
    norms = sq.sqrt()
    f = clip_factors(norms, clip_norm)
    return {n: torch.einsum("b,b...->...", f, g) for n, g in grads.items()}, norms


def _vmap_clipped_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip_norm: float, loss_fn: LossFn
) -> ClippedSum:
    summed, norms = clip_and_sum(per_example_grads(model, x, y, loss_fn), clip_norm)
    with torch.no_grad():
        loss_sum = float(loss_fn(model(x), y))
    return ClippedSum(summed, norms, loss_sum)


def _param_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _accumulate(out: dict[str, torch.Tensor], key: str, t: torch.Tensor) -> None:
    # A module applied twice in one forward pass contributes twice.
    out[key] = out[key] + t if key in out else t


def _ghost_clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clip_norm: float,
    loss_fn: LossFn,
    workspace: Workspace,
) -> ClippedSum:
    names = {m: n for n, m in model.named_modules()}
    rules, loss = ghost_rules(model, x, y, loss_fn, workspace)
    uses: dict[nn.Module, list[LayerRule]] = {}
    for rule in rules:
        uses.setdefault(rule.module, []).append(rule)
    # A module applied more than once (weight sharing): example i's gradient is the sum of its
    # uses' contributions, so its norm comes from that sum, materialised, not from the uses'.
    shared: dict[str, torch.Tensor] = {}
    sq = [rs[0].sq for rs in uses.values() if len(rs) == 1]
    for module, rs in uses.items():
        if len(rs) > 1:
            prefix = names[module]
            for rule in rs:
                for k, t in rule.per_example().items():
                    _accumulate(shared, _param_name(prefix, k), t)
    sq.extend(torch.linalg.vector_norm(t.flatten(1), dim=1).square() for t in shared.values())
    norms = torch.stack(sq).sum(0).sqrt()
    f = clip_factors(norms, clip_norm)
    summed = {k: torch.einsum("b,b...->...", f, t) for k, t in shared.items()}
    for module, rs in uses.items():
        if len(rs) == 1:
            prefix = names[module]
            for k, t in rs[0].finish(f).items():
                summed[_param_name(prefix, k)] = t
    return ClippedSum(summed, norms, loss)


def ghost_per_example_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = _sum_ce,
    workspace: Workspace | None = None,
) -> dict[str, torch.Tensor]:
    """Materialised per-example gradients [B, *param.shape] from the book-keeping pass.

    For models :func:`ghost_supported` accepts; several times faster than ``vmap`` on CPU.
    Returned tensors may be views of ``workspace`` buffers: use them before the next call.
    """
    names = {m: n for n, m in model.named_modules()}
    rules, _ = ghost_rules(model, x, y, loss_fn, workspace or Workspace())
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        prefix = names[rule.module]
        for k, t in rule.per_example().items():
            _accumulate(out, _param_name(prefix, k), t)
    return out


def clipped_grad_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    clip_norm: float,
    engine: str = "auto",
    loss_fn: LossFn = _sum_ce,
    workspace: Workspace | None = None,
) -> ClippedSum:
    """Sum of per-example gradients, each clipped to L2 norm ``clip_norm`` over all parameters.

    ``loss_fn(logits, y)`` must return the *summed* loss of the batch, so that its gradient
    with respect to example i's output is example i's own gradient. Pass the same
    ``workspace`` on every step of a training run to reuse the ghost engine's scratch memory.
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    if engine == "auto":
        engine = "ghost" if ghost_supported(model) else "vmap"
    if engine == "ghost":
        if not ghost_supported(model):
            raise ValueError("engine 'ghost' does not support this model's layers; use 'vmap'")
        return _ghost_clipped_sum(model, x, y, clip_norm, loss_fn, workspace or Workspace())
    if engine == "vmap":
        return _vmap_clipped_sum(model, x, y, clip_norm, loss_fn)
    raise ValueError(f"unknown per-example engine {engine!r}; known: auto, ghost, vmap")
