"""Gradient canaries: white-box audits of a mechanism's privatisation step (AUDITING.md).

A block of m canary coordinates rides along with the model's parameters during training.
The loss does not depend on it, so every real example's gradient on it is exactly 0; canary
j is an "example" whose gradient is ``K e_j`` on the block only (K = ``norm`` x the clipping
norm, so clipping binds). Canaries go through the mechanism's own code: its Poisson sampler
(called with the canaries' own random stream), its clip rule or encoding, its noise function,
its optimizer (the block is one more parameter of it) and, for the comparison, its accountant.
Every random draw for the canaries comes from their own generator, so the real parameters of
an audited run are bit-for-bit those of the same run without canaries.

Each canary is included with probability 1/2. A ``calibration`` share is never audited:
attacks.bounds chooses scores, thresholds and guess counts on it, so the audited canaries'
labels are looked at once.

What is recorded, per canary: at every released step the privatised block (before momentum
or Adam) updates the white-box-steps statistics (the log-likelihood ratio under the
mechanism's claimed per-step law, and the sum and sum of squares for a variance score); the
block's final value is the white-box-final observation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["NOISE_LAWS", "CanaryLot", "GradientCanaries", "StepLaw"]

NOISE_LAWS = ("gaussian", "laplace", "studentt", "none")


@dataclass(frozen=True)
class StepLaw:
    """One privatised canary coordinate per step, as the mechanism claims it behaves.

    ``observation = b * shift + noise`` in the units of the released gradient: ``b`` is 1 when
    the canary is included *and* sampled into the step's lot (probability ``sample_rate``),
    else 0; ``noise`` is i.i.d. ``gaussian`` (std ``scale``), ``laplace`` (scale), ``studentt``
    (``scale`` x t with ``df`` degrees of freedom) or ``none`` (no noise: the non-private
    baseline).
    """

    noise: str
    scale: float
    shift: float
    sample_rate: float
    df: float = 0.0

    def __post_init__(self) -> None:
        if self.noise not in NOISE_LAWS:
            raise ValueError(f"noise law must be one of {', '.join(NOISE_LAWS)}, got {self.noise!r}")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.noise != "none" and not (self.scale > 0):
            raise ValueError(f"noise scale must be > 0, got {self.scale}")
        if not (self.shift > 0) or not math.isfinite(self.shift):
            raise ValueError(f"canary shift must be a finite number > 0, got {self.shift}")
        if self.noise == "studentt" and not (self.df > 0):
            raise ValueError(f"Student-t degrees of freedom must be > 0, got {self.df}")

    def _step_log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x - shift) / p(x) of the noise density, elementwise (a new tensor)."""
        a, s = self.shift, self.scale
        if self.noise == "gaussian":
            return x * (a / (s * s)) - (a * a) / (2.0 * s * s)
        if self.noise == "laplace":
            return (x.abs() - (x - a).abs()) / s
        nu = self.df
        return 0.5 * (nu + 1.0) * (torch.log(nu * s * s + x * x) - torch.log(nu * s * s + (x - a) ** 2))

    def log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step log-likelihood ratio ``log(1 - q + q p(x - shift) / p(x))``: included vs
        excluded, for observations ``x`` (in x's dtype; float32 suffices for one step, the
        sums over steps are kept in float64). For ``none`` the observation in units of the shift
        (the number of times the canary was seen) stands in: the ratio is infinite."""
        if self.noise == "none":
            return x / self.shift
        q = self.sample_rate
        step = self._step_log_ratio(x)
        if q >= 1.0:
            return step
        # log(1 - q + q e^L) = log(1 - q) + softplus(L + log q - log(1 - q)), stable for any L
        keep = math.log1p(-q)
        return torch.nn.functional.softplus(step.add_(math.log(q) - keep)).add_(keep)

    def to_json(self) -> dict[str, float | str]:
        return {
            "noise": self.noise,
            "scale": self.scale,
            "shift": self.shift,
            "sample_rate": self.sample_rate,
            **({"df": self.df} if self.noise == "studentt" else {}),
        }


@dataclass
class CanaryLot:
    """The canaries of one step's lot, handed to the mechanism's privatisation code.

    The mechanism sets ``released`` (the privatised block as it is released: what a
    white-box-steps auditor sees) and ``update`` (what the optimizer receives; the same tensor
    unless post-processing such as encoding's denoiser rescales it).
    """

    index: torch.Tensor
    count: int
    norm: float
    generator: torch.Generator
    dtype: torch.dtype = torch.float32
    released: torch.Tensor | None = None
    update: torch.Tensor | None = None

    def gradient_norms(self, clip_norm: float, multiplier: float = 1.0) -> torch.Tensor:
        """Per-canary gradient norms ``multiplier * norm * C`` for the canaries in this lot."""
        return torch.full(
            (len(self.index),), multiplier * self.norm * clip_norm, dtype=self.dtype, device=self.index.device
        )

    def scatter(self, values: torch.Tensor | float) -> torch.Tensor:
        """A fresh block [count] holding ``values`` at this lot's canaries and 0 elsewhere."""
        out = torch.zeros(self.count, dtype=self.dtype, device=self.index.device)
        if isinstance(values, torch.Tensor):
            out.index_put_((self.index,), values.to(self.dtype), accumulate=True)
        elif len(self.index):
            out[self.index] = values
        return out


@dataclass
class _Stats:
    llr: torch.Tensor
    total: torch.Tensor
    squares: torch.Tensor
    steps: int = 0


class GradientCanaries:
    """m gradient canaries on a dedicated block of coordinates, and what they recorded.

    ``norm`` is the canary gradient's norm in units of the clipping norm (>= 1 so clipping
    binds; a mechanism that skips clipping lets ``norm`` times too much through). The mechanism
    sets ``law`` (its claimed per-step law) before training and calls :meth:`draw`,
    :meth:`record`, then :meth:`commit` (the step is released) or :meth:`discard` (it is not,
    e.g. a rejected screening candidate) at every step.
    """

    def __init__(
        self,
        count: int,
        *,
        seed: int,
        norm: float = 10.0,
        calibration: float = 0.25,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if count < 2:
            raise ValueError(f"need at least 2 canaries, got {count}")
        if not (norm >= 1) or not math.isfinite(norm):
            raise ValueError(f"canary norm must be >= 1 (in units of the clipping norm), got {norm}")
        if not (0 <= calibration < 1):
            raise ValueError(f"calibration share must be in [0, 1), got {calibration}")
        device = torch.device(device)
        self.count, self.norm = count, float(norm)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.included = torch.rand(count, generator=self.generator, device=device) < 0.5
        self.calibration = torch.rand(count, generator=self.generator, device=device) < calibration
        self.block = torch.zeros(count, dtype=dtype, device=device, requires_grad=True)
        self.law: StepLaw | None = None
        z = torch.zeros(count, dtype=torch.float64, device=device)
        self.stats = _Stats(z.clone(), z.clone(), z.clone())
        self.candidates = 0
        self._pending: torch.Tensor | None = None
        self._included_index = self.included.nonzero().flatten()

    def parameters(self) -> list[torch.Tensor]:
        """The block, to be added to the mechanism's optimizer."""
        return [self.block]

    def draw(self, sample_rate: float, sampler) -> CanaryLot:
        """This step's canary lot: the mechanism's own Poisson sampler ``sampler(n, q,
        generator)``, with the canaries' generator, over the included canaries (excluded ones
        never take part): each joins with probability q."""
        lot = self._included_index[sampler(len(self._included_index), sample_rate, self.generator)]
        return CanaryLot(lot, self.count, self.norm, self.generator, self.block.dtype)

    def draw_epoch(self, steps: int) -> torch.Tensor:
        """For shuffled (non-Poisson) training: the step of the epoch at which each included
        canary is seen, uniformly at random; -1 for excluded canaries."""
        at = torch.randint(0, steps, (self.count,), generator=self.generator, device=self.included.device)
        return torch.where(self.included, at, torch.full_like(at, -1))

    def lot_at(self, schedule: torch.Tensor, step: int) -> CanaryLot:
        """The canaries that ``draw_epoch``'s schedule puts at ``step``."""
        return CanaryLot(
            (schedule == step).nonzero().flatten(), self.count, self.norm, self.generator, self.block.dtype
        )

    def record(self, lot: CanaryLot) -> None:
        """Take a privatised lot: its update becomes the block's gradient; its release is
        pending until :meth:`commit` or :meth:`discard`."""
        if lot.released is None or lot.update is None:
            raise RuntimeError("the mechanism did not privatise the canary lot")
        self.block.grad = lot.update.detach().to(self.block.dtype)
        self._pending = lot.released.detach()
        self.candidates += 1

    def commit(self) -> None:
        """The pending step is released: add it to the white-box-steps statistics."""
        if self._pending is None:
            raise RuntimeError("no pending canary step to commit")
        if self.law is None:
            raise RuntimeError("the mechanism did not set the canaries' law")
        x = self._pending
        self.stats.llr.add_(self.law.log_ratio(x))
        self.stats.total.add_(x)
        self.stats.squares.addcmul_(x, x)
        self.stats.steps += 1
        self._pending = None

    def discard(self) -> None:
        """The pending step is not released (e.g. a rejected screening candidate)."""
        self._pending = None

    def result(self) -> CanaryRecord:
        """Everything an audit needs, as plain tensors on the CPU."""
        steps = max(1, self.stats.steps)
        mean = self.stats.total / steps
        variance = (self.stats.squares / steps - mean * mean).clamp_min(0.0)
        return CanaryRecord(
            included=self.included.cpu(),
            calibration=self.calibration.cpu(),
            final=self.block.detach().cpu().to(torch.float64),
            llr=self.stats.llr.cpu(),
            variance=variance.cpu(),
            steps=self.stats.steps,
            candidates=self.candidates,
            norm=self.norm,
            law=self.law,
        )


@dataclass(frozen=True)
class CanaryRecord:
    """What gradient canaries recorded in one run (attacks.bounds turns it into bounds).

    ``final`` is the block's value at the end (canaries' gradients are positive, so an included
    canary's coordinate moves down: its white-box-final score is ``-final``); ``llr`` and
    ``variance`` are the white-box-steps scores over the ``steps`` released steps.
    """

    included: torch.Tensor
    calibration: torch.Tensor
    final: torch.Tensor
    llr: torch.Tensor
    variance: torch.Tensor
    steps: int
    candidates: int
    norm: float
    law: StepLaw | None
    extras: dict[str, float] = field(default_factory=dict)
