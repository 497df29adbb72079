"""Gradient encoding and denoising (Nasr, Shokri, Houmansadr 2020; MECHANISMS.md section 3).

From the authors' released code (``srxzr/DPtorch``, ``dpoptimizer.py``), microbatch 1. Per
example: keep the ``top_k`` largest-magnitude coordinates of the gradient, L2-clip them to C,
scale by m, pick the codeword nearest in cosine to their magnitudes (in rank order) and clamp
the coordinate of rank i to +-Q[r, i]; sum the encoded vectors; add i.i.d. noise of the chosen
law to **every** coordinate; divide by the expected lot size M. The optional denoiser (the
code's ``--errcrt``) compares the noisy mean with a fresh pure-noise sample by the two-sample
Kolmogorov-Smirnov statistic D: skip the step if ``lambda * D < tau``, else scale the update by
``min(lambda * D, 5)``. It reads only privatised quantities and fresh noise (post-processing).

The codebook is data-independent, generated from ``codebook_seed``: by default as the code's
commented-out recipe does (``codebook = "release"``: each of ``codebook_size`` rows holds the
largest ``top_k`` of the sorted absolute values of ``codebook_draws`` = 200,000 N(0, 1) draws,
L2-normalised to ``quant_clip``: a flat profile in which every kept coordinate carries signal),
or (``codebook = "k-draws"``) from exactly ``top_k`` sorted |N(0, 1)| draws per row, whose
lowest ranks are near 0 (this project's first recipe, kept for comparison). The released
codebook is a download that is not available.

Every encoded vector e satisfies ``|e_(i)| <= Q[r, i]`` for its codeword, so
``||e||_2 <= quant_clip`` and ``||e||_1 <= max_r ||Q_r||_1``. Accounting (all Poisson sampling,
add/remove-one adjacency, dp-accounting for subsampling and composition):

* ``gaussian`` (std ``noise_multiplier * quant_clip``): a Poisson-sampled Gaussian event with
  that noise multiplier, as DP-SGD;
* ``laplace`` (scale ``noise_multiplier * L1 bound``): a Poisson-sampled Laplace event;
* ``studentt`` (df, scale ``noise_multiplier * quant_clip``; the released law): each coordinate
  of rank i is bounded by the envelope ``max_r Q[r, i]``; the exact per-coordinate privacy
  curve (closed form) is bounded by mu_i-Gaussian DP, mu-GDP composes across coordinates, and
  the step is accounted as a Poisson-sampled Gaussian with noise multiplier
  ``1 / sqrt(sum_i mu_i^2)`` (see ``accounting.student_t_noise_multiplier``).

Microbatches (``microbatch_size`` m > 1, the release's CIFAR setting is 2): each member of a
lot joins one of G = round(M / m) microbatches, drawn independently and uniformly per example
and step, and the gradient of each microbatch's mean loss is encoded instead of each
example's. Adding an example x changes one term of the sum, e(S) -> e(S + x), where both
vectors obey the bound, so the difference is bounded by twice it (2 quant_clip in L2, 2 L1
bound, 2 Q envelope per coordinate) and the accounting uses that sensitivity: the event's
multiplier is half the noise's. Because the groups are drawn independently of the other
examples, conditioning on everything else leaves a Poisson-sampled shift of at most twice the
bound, which the subsampled event dominates (joint convexity of the hockey-stick
divergence). MECHANISMS.md says microbatches keep sensitivity C under add/remove; that holds
only when the added example forms a microbatch of its own: in a shared microbatch it can flip
the encoded vector (tests/test_encoding.py shows a difference of 2B). White-box gradient
canaries are per example, so they are refused with microbatches (audit those black-box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch
from dp_accounting import DpEvent
from torch import nn
from torch.nn import functional as F

from .accounting import dpsgd_event, student_t_noise_multiplier
from .base import Mechanism, TrainResult
from .canaries import CanaryLot, GradientCanaries, StepLaw
from .dpsgd import DpSgdConfig, DpSgdPlan, GradientFn, refuse_batchnorm, train_private
from .per_example import Workspace, ghost_per_example_grads, ghost_supported, per_example_grads
from .registry import register_mechanism

__all__ = [
    "LAWS",
    "Encoder",
    "EncodingConfig",
    "denoise",
    "encode",
    "ks_statistic",
    "make_codebook",
    "microbatch_count",
    "sample_noise",
    "train_encoding",
]

CODEBOOKS = ("release", "k-draws")
LAWS = ("gaussian", "laplace", "studentt")


@dataclass(frozen=True, kw_only=True)
class EncodingConfig(DpSgdConfig):
    """DP-SGD options plus the encoding; defaults are the released MNIST ones.

    ``noise_multiplier`` is the noise scale relative to the encoded vector's bound: the std
    (Gaussian) or scale (Student-t) over ``quant_clip``, the Laplace scale over the L1 bound.
    The released MNIST run is Student-t(9) with scale 1.0: ``noise_multiplier = 1``.
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.2
    momentum: float = 0.0
    top_k: int = 14000
    quant_multiplier: float = 4.0
    quant_clip: float = 1.0
    codebook_size: int = 64
    codebook_seed: int = 0
    codebook: str = "release"
    codebook_draws: int = 200_000
    noise: str = "studentt"
    noise_df: float = 9.0
    denoise: bool = True
    distance_multiplier: float = 500.0
    distance_threshold: float = 0.7
    max_scale: float = 5.0
    # expected examples per microbatch; 1 encodes every example (the released MNIST setting)
    microbatch_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        for name in ("quant_multiplier", "quant_clip", "distance_multiplier", "max_scale"):
            if not (getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {', '.join(CODEBOOKS)}, got {self.codebook!r}")
        if self.codebook == "release" and self.codebook_draws < self.top_k:
            raise ValueError(f"codebook_draws ({self.codebook_draws}) must be >= top_k ({self.top_k})")
        if self.noise not in LAWS:
            raise ValueError(f"noise must be one of {', '.join(LAWS)}, got {self.noise!r}")
        if not (self.noise_df > 2):
            raise ValueError(f"noise_df must be > 2 (finite variance), got {self.noise_df}")
        if self.distance_threshold < 0:
            raise ValueError(f"distance_threshold must be >= 0, got {self.distance_threshold}")
        if self.microbatch_size < 1:
            raise ValueError(f"microbatch_size must be >= 1, got {self.microbatch_size}")
        if self.microbatch_size > self.batch_size:
            raise ValueError(
                f"microbatch_size ({self.microbatch_size}) must be <= batch_size ({self.batch_size})"
            )


def make_codebook(k: int, rows: int, norm: float, seed: int, draws: int | None = None) -> torch.Tensor:
    """``rows`` x ``k`` descending magnitude profiles of |N(0, 1)| draws, each of L2 norm ``norm``.

    With ``draws`` (the release's recipe, 200,000): each row keeps the ``k`` largest of
    ``draws`` absolute draws; without, each row is ``k`` sorted absolute draws. Depends only on
    its arguments (a private generator seeded by ``seed``), never on data.
    """
    g = torch.Generator().manual_seed(seed)
    if draws is None:
        z = torch.randn(rows, k, generator=g, dtype=torch.float64).abs()
        z = z.sort(dim=1, descending=True).values
    else:
        if draws < k:
            raise ValueError(f"draws ({draws}) must be >= k ({k})")
        z = torch.stack(
            [
                torch.randn(draws, generator=g, dtype=torch.float64).abs().topk(k, sorted=True).values
                for _ in range(rows)
            ]
        )
    return (z * (norm / z.norm(dim=1, keepdim=True))).to(torch.float32)


def encode(
    grads: torch.Tensor, codebook: torch.Tensor, *, clip_norm: float, multiplier: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode flat per-example gradients [B, d]: returns (indices [B, k], values [B, k]).

    Top-k by magnitude; the selected part L2-clipped to ``clip_norm`` and scaled by
    ``multiplier``; the nearest codeword r by cosine with the magnitudes in rank order; the
    coordinate of rank i clamped to +-Q[r, i]. Non-selected coordinates are 0.
    """
    k = codebook.shape[1]
    magnitude, index = torch.topk(grads.abs(), k, dim=1, sorted=True)
    sign = torch.gather(grads, 1, index).sign()
    norm = magnitude.norm(dim=1, keepdim=True)
    magnitude = magnitude * (clip_norm / norm.clamp_min(clip_norm)) * multiplier
    nearest = (magnitude @ codebook.T).argmax(dim=1)  # codewords share one norm: dot = cosine
    values = torch.minimum(magnitude, codebook[nearest]) * sign
    return index, values


def microbatch_count(expected_batch_size: float, microbatch_size: int) -> int:
    """How many microbatches a lot is split into: the expected lot size over the expected
    microbatch size, at least 1."""
    return max(1, round(expected_batch_size / microbatch_size))


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (ties handled as scipy does)."""
    a, b = a.flatten().sort().values, b.flatten().sort().values
    points = torch.cat([a, b])
    fa = torch.searchsorted(a, points, right=True).double() / len(a)
    fb = torch.searchsorted(b, points, right=True).double() / len(b)
    return float((fa - fb).abs().max())


def sample_noise(law: str, scale: float, df: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` i.i.d. draws of the law: N(0, scale^2), Laplace(0, scale) or scale * t_df."""
    if law == "gaussian":
        return rng.normal(0.0, scale, n)
    if law == "laplace":
        return rng.laplace(0.0, scale, n)
    if law == "studentt":
        return scale * rng.standard_t(df, n)
    raise ValueError(f"unknown noise law {law!r}")


def denoise(
    noisy_mean: torch.Tensor,
    reference: torch.Tensor,
    *,
    multiplier: float,
    threshold: float,
    max_scale: float,
) -> float:
    """The update's scale: 0 (skip) if ``lambda * D < tau``, else ``min(lambda * D, max_scale)``."""
    s = multiplier * ks_statistic(noisy_mean, reference)
    return 0.0 if s < threshold else min(s, max_scale)


class Encoder:
    """Builds the codebook for a model and the law's noise scale; counts skipped steps."""

    def __init__(self, config: EncodingConfig, dim: int) -> None:
        self.config = config
        self.dim = dim
        self.k = min(config.top_k, dim)
        draws = config.codebook_draws if config.codebook == "release" else None
        self.codebook = make_codebook(
            self.k, config.codebook_size, config.quant_clip, config.codebook_seed, draws
        )
        self.l1_bound = float(self.codebook.double().sum(dim=1).max())
        self.envelope = self.codebook.double().max(dim=0).values.numpy()
        # an example's effect on the sum: its own encoded vector (bound B) alone; in a
        # microbatch, e(S + x) - e(S) of two vectors of bound B each, so 2B (module docstring)
        self.sensitivity = 1 if config.microbatch_size == 1 else 2
        self.skipped = 0
        self.steps = 0
        self.scales: list[float] = []

    def noise_scale(self, noise_multiplier: float) -> float:
        bound = self.l1_bound if self.config.noise == "laplace" else self.config.quant_clip
        return noise_multiplier * bound

    def event(self, noise_multiplier: float, sample_rate: float, steps: int) -> DpEvent:
        """The run's DpEvent for this law (see the module docstring); with microbatches the
        sensitivity is twice the bound, so the event's multiplier is half the noise's."""
        if self.config.noise == "gaussian":
            return dpsgd_event(
                noise_multiplier=noise_multiplier / self.sensitivity, sample_rate=sample_rate, steps=steps
            )
        if self.config.noise == "laplace":
            step = dp_accounting.PoissonSampledDpEvent(
                sample_rate, dp_accounting.LaplaceDpEvent(noise_multiplier / self.sensitivity)
            )
            return dp_accounting.SelfComposedDpEvent(step, steps)
        return dpsgd_event(
            noise_multiplier=self.gaussian_equivalent(noise_multiplier), sample_rate=sample_rate, steps=steps
        )

    def canary_value(self, clip_norm: float, norm: float) -> float:
        """What ``encode`` makes of a canary: its gradient is ``norm * C`` on one coordinate of
        its own support, so the encoding keeps that coordinate (rank 1), clips and scales it and
        clamps it to the nearest codeword's first entry."""
        one = torch.zeros(1, self.k, dtype=self.codebook.dtype)
        one[0, 0] = norm * clip_norm
        _, values = encode(one, self.codebook, clip_norm=clip_norm, multiplier=self.config.quant_multiplier)
        return float(values[0, 0])

    def law(self, plan: DpSgdPlan, norm: float) -> StepLaw:
        """The per-step law the encoding claims for a canary coordinate (units of the update)."""
        b = plan.expected_batch_size
        return StepLaw(
            self.config.noise,
            scale=self.noise_scale(plan.noise_multiplier) / b,
            shift=self.canary_value(self.config.clip_norm, norm) / b,
            sample_rate=plan.sample_rate,
            df=self.config.noise_df,
        )

    def gaussian_equivalent(self, noise_multiplier: float) -> float:
        """Student-t: the noise multiplier of the dominating Gaussian (sensitivity 1): each
        coordinate's shift is bounded by the envelope (twice it with microbatches)."""
        scale = self.noise_scale(noise_multiplier)
        return student_t_noise_multiplier(self.sensitivity * self.envelope, scale, self.config.noise_df)

    def gradient(
        self, model: nn.Module, plan: DpSgdPlan, generator: torch.Generator, workspace: Workspace
    ) -> GradientFn:
        config = self.config
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fast = config.engine != "vmap" and ghost_supported(model)
        scale = self.noise_scale(plan.noise_multiplier)
        first = next(iter(params.values()))
        codebook = self.codebook.to(first.device, first.dtype)  # the model's dtype (float64 models too)
        groups = microbatch_count(plan.expected_batch_size, config.microbatch_size)

        def step(
            m: nn.Module, x: torch.Tensor, y: torch.Tensor, canaries: CanaryLot | None = None
        ) -> tuple[dict[str, torch.Tensor], float]:
            first = next(iter(params.values()))
            total = torch.zeros(self.dim, device=first.device, dtype=first.dtype)
            loss_sum = 0.0
            if config.microbatch_size > 1:
                # each lot member joins one of `groups` microbatches, independently and uniformly
                member = torch.randint(0, groups, (len(y),), generator=generator, device=generator.device)
                member = member.to(first.device)
                sums = torch.zeros(groups, self.dim, device=first.device, dtype=first.dtype)
                sizes = torch.bincount(member, minlength=groups)
            for start in range(0, len(y), config.physical_batch_size):
                xb, yb = (
                    x[start : start + config.physical_batch_size],
                    y[start : start + config.physical_batch_size],
                )
                if fast:
                    per = ghost_per_example_grads(m, xb, yb, workspace=workspace)
                else:
                    per = per_example_grads(m, xb, yb)
                flat = torch.cat([per[n].reshape(len(yb), -1) for n in params], dim=1)
                if config.microbatch_size > 1:
                    sums.index_add_(0, member[start : start + len(yb)], flat)
                else:
                    index, values = encode(
                        flat, codebook, clip_norm=config.clip_norm, multiplier=config.quant_multiplier
                    )
                    total.index_add_(0, index.flatten(), values.flatten().to(total.dtype))
                with torch.no_grad():
                    loss_sum += float(F.cross_entropy(m(xb), yb, reduction="sum"))
            if config.microbatch_size > 1:
                # a microbatch's gradient is that of its mean loss; empty microbatches add nothing
                used = sizes > 0
                means = sums[used] / sizes[used].unsqueeze(1).to(sums.dtype)
                index, values = encode(
                    means, codebook, clip_norm=config.clip_norm, multiplier=config.quant_multiplier
                )
                total.index_add_(0, index.flatten(), values.flatten().to(total.dtype))
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            rng = np.random.default_rng(seed)
            noise = torch.from_numpy(sample_noise(config.noise, scale, config.noise_df, self.dim, rng))
            noisy = (total + noise.to(total)) / plan.expected_batch_size
            factor = 1.0
            if config.denoise:
                ref = torch.from_numpy(sample_noise(config.noise, scale, config.noise_df, self.dim, rng))
                factor = denoise(
                    noisy,
                    ref.to(noisy) / plan.expected_batch_size,
                    multiplier=config.distance_multiplier,
                    threshold=config.distance_threshold,
                    max_scale=config.max_scale,
                )
            if canaries is not None:
                self._privatise_canaries(canaries, scale, plan.expected_batch_size, factor)
            self.steps += 1
            self.skipped += int(factor == 0.0)
            self.scales.append(factor)
            out, offset = {}, 0
            for n, p in params.items():
                out[n] = (noisy[offset : offset + p.numel()] * factor).view_as(p)
                offset += p.numel()
            return out, loss_sum

        return step

    def _privatise_canaries(self, lot: CanaryLot, scale: float, expected: float, factor: float) -> None:
        """A canary lot through the same encoding and noise law (the canaries' own stream); the
        denoiser's factor, computed from the real coordinates only, rescales the update and not
        the release (it is post-processing of the release)."""
        config = self.config
        block = lot.scatter(self.canary_value(config.clip_norm, lot.norm))
        seed = int(torch.randint(0, 2**62, (1,), generator=lot.generator, device=lot.generator.device))
        noise = sample_noise(config.noise, scale, config.noise_df, lot.count, np.random.default_rng(seed))
        lot.released = (block + torch.from_numpy(noise).to(block)) / expected
        lot.update = lot.released * factor


def train_encoding(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    config: EncodingConfig,
    generator: torch.Generator,
    canaries: GradientCanaries | None = None,
) -> TrainResult:
    """Train with gradient encoding and denoising; epsilon from dp-accounting per noise law.

    A gradient canary is one coordinate of the encoded vector: it exercises one coordinate's
    bound, while the Student-t accounting composes the bounds of all top-k coordinates.
    """
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = Encoder(config, dim)
    workspace = Workspace()
    law = {
        "gaussian": "Gaussian noise on the L2 bound",
        "laplace": f"Laplace noise on the L1 bound {encoder.l1_bound:.4g}",
        "studentt": f"Student-t({config.noise_df:g}) noise bounded coordinate-wise by mu-GDP",
    }[config.noise]
    result = train_private(
        model,
        x,
        y,
        config=config,
        generator=generator,
        name="encoding",
        make_gradient=lambda plan, optimizer: encoder.gradient(model, plan, generator, workspace),
        make_event=encoder.event,
        note=f"gradient encoding (top-{encoder.k} of {dim}, codebook of {config.codebook_size} seeded rows"
        + (
            f", microbatches of {config.microbatch_size} expected examples, sensitivity twice the bound"
            if config.microbatch_size > 1
            else ""
        )
        + f"): {law}; Poisson-sampled event composed in dp-accounting, add/remove-one adjacency",
        canaries=canaries,
        make_law=(lambda plan: encoder.law(plan, canaries.norm)) if canaries is not None else None,
    )
    extras = {
        "noise_law": config.noise,
        "noise_scale": encoder.noise_scale(result.privacy.noise_multiplier or math.nan),
        "top_k": encoder.k,
        "l2_bound": config.quant_clip,
        "l1_bound": encoder.l1_bound,
        "skipped_steps": encoder.skipped,
        "mean_update_scale": float(np.mean(encoder.scales)) if encoder.scales else math.nan,
    }
    if config.noise == "studentt":
        extras["gaussian_equivalent_noise_multiplier"] = encoder.gaussian_equivalent(
            result.privacy.noise_multiplier or math.nan
        )
    return TrainResult(result.state_dict, result.history, result.event, result.privacy, extras)


ENCODING = register_mechanism(
    Mechanism(
        "encoding",
        EncodingConfig,
        train_encoding,
        "Gradient encoding and denoising (Nasr et al.): top-k, codebook clamp, Gaussian/Laplace/"
        "Student-t noise on every coordinate (formal epsilon per law)",
        validate_model=refuse_batchnorm,
        gradient_canaries=True,
        canaries_refused=lambda config: (
            f"encoding with microbatch_size {config.microbatch_size} encodes microbatches, not the "
            "examples a gradient canary stands for; audit it black-box (input canaries)"
            if config.microbatch_size > 1
            else None
        ),
    )
)
