"""Train one target model: data -> random half -> mechanism -> checkpoint files."""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mechanisms
from mechanisms import build_model, config_from_mapping, get_mechanism
from mechanisms.accounting import accounting_seconds
from mechanisms.models import import_callable
from mechanisms.training import accuracy

from .canary import CanarySettings, make_canaries, save_record
from .checkpoint import save_checkpoint
from .data import DataOptions, Dataset, load_dataset, load_verified
from .files import holds_files

__all__ = [
    "Fitted",
    "TrainRequest",
    "TrainedTarget",
    "check_output_dir",
    "compute_target",
    "fit",
    "fit_with_trainer",
    "half_mask",
    "heldout_accuracy",
    "released",
    "resolve_device",
    "seeds",
    "target_job",
    "train_target",
    "write_target",
]

MODEL_SCHEMA = "mia-audit/model/v1"


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    dataset: str
    model: str
    mechanism: str = "sgd"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_options: DataOptions = dataclasses.field(default_factory=DataOptions)
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    canaries: CanarySettings | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def half_mask(n: int, rng: np.random.Generator) -> np.ndarray:
    """A bool[n] mask with exactly n // 2 members chosen uniformly at random."""
    keep = np.zeros(n, dtype=bool)
    keep[rng.permutation(n)[: n // 2]] = True
    return keep


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an output folder that already holds files unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {str(out)!r} exists and is not a directory")
    if holds_files(out) and not overwrite:
        raise ValueError(
            f"output directory {str(out)!r} already holds files; pass --overwrite to replace them"
        )
    return out


@dataclass(frozen=True)
class Fitted:
    """A trained model with its mechanism's result; ``seconds`` is the wall time of
    ``mechanism.train`` less ``accounting_seconds`` (calibration and epsilons) spent in it."""

    model: torch.nn.Module
    result: Any  # mechanisms.TrainResult
    seconds: float
    config: Any  # the mechanism's TrainConfig built from the options
    canaries: Any = None  # mechanisms.canaries.CanaryRecord when canaries rode along
    accounting_seconds: float = 0.0


def warm_up() -> None:
    """Import what the first optimizer of a process imports (``torch._dynamo``, about 1.6 s
    here), so that it is not counted as training time (worker processes preload it)."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:  # pragma: no cover - a torch without dynamo
        pass


def fit(
    data: Dataset,
    *,
    model_name: str,
    mechanism_name: str,
    options: dict[str, Any],
    members: np.ndarray,
    init_seed: int,
    train_seed: int,
    device: torch.device,
    progress: bool = False,
    canaries: Any = None,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fitted:
    """Build ``model_name``, train it with ``mechanism_name`` on ``data[members]``.

    The one code path for targets and reference models: same recipe, same maths. With
    ``canaries`` (a ``GradientCanaries``; the mechanism must support them) a white-box canary
    audit rides along; the model's weights are the same as without. ``extra`` examples (x, y)
    are appended to the members (a canary twin's input canaries).
    """
    mechanism = get_mechanism(mechanism_name)
    config = config_from_mapping(mechanism.config_type, {**options, "progress": progress})
    model = build_model(model_name, data.input_shape, data.num_classes, seed=init_seed).to(device)
    if mechanism.validate_model is not None:
        mechanism.validate_model(model)
    # the released predictor is what gets trained (e.g. noisy slots, an ensemble of copies)
    model = mechanism.released(model, config, init_seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(train_seed)
    mask = torch.from_numpy(np.asarray(members, dtype=bool))
    x, y = data.x[mask].to(device), data.y[mask].to(device)
    if extra is not None:
        x, y = torch.cat([x, extra[0].to(device, x.dtype)]), torch.cat([y, extra[1].to(device, y.dtype)])
    if canaries is not None and not mechanism.gradient_canaries:
        raise ValueError(
            f"mechanism {mechanism_name!r} has no gradient to plant canaries in (white-box canaries need a "
            "gradient mechanism); audit it black-box instead"
        )
    if canaries is not None and (reason := mechanism.canaries_refused(config)) is not None:
        raise ValueError(f"white-box canaries: {reason}")
    extra = {"canaries": canaries} if canaries is not None else {}
    warm_up()
    accounted = accounting_seconds()
    start = time.perf_counter()
    result = mechanism.train(model, x, y, config=config, generator=generator, **extra)
    seconds = time.perf_counter() - start
    accounting = accounting_seconds() - accounted
    model.load_state_dict(result.state_dict)
    record = canaries.result() if canaries is not None else None
    return Fitted(model, result, seconds - accounting, config, record, accounting)


def fit_with_trainer(
    data: Dataset,
    *,
    model_name: str,
    trainer: Any,
    options: dict[str, Any],
    members: np.ndarray,
    init_seed: int,
    train_seed: int,
    device: torch.device,
) -> torch.nn.Module:
    """Train ``model_name`` on ``data[members]`` with the user's own training function.

    ``trainer`` (a callable, or ``package.module:function``) is called as
    ``trainer(model, x, y, *, seed, **options)`` with a freshly initialised model (seeded by
    ``init_seed``), the members' inputs and labels on ``device`` and ``seed = train_seed``; it
    trains the model in place (or returns the trained model).
    """
    fn = import_callable(trainer, "trainer") if isinstance(trainer, str) else trainer
    model = build_model(model_name, data.input_shape, data.num_classes, seed=init_seed).to(device)
    mask = torch.from_numpy(np.asarray(members, dtype=bool))
    x, y = data.x[mask].to(device), data.y[mask].to(device)
    model.train()
    result = fn(model, x, y, seed=train_seed, **options)
    if result is not None:
        if not isinstance(result, torch.nn.Module):
            raise ValueError(f"trainer {trainer!r} returned {type(result).__name__}, not a model (or None)")
        model = result
    return model.eval()


def heldout_accuracy(
    model: torch.nn.Module, data: Dataset, members: np.ndarray, device: torch.device, passes: int = 1
) -> tuple[float, str]:
    """Accuracy on the test split when the dataset has one, else on the non-member half."""
    if data.x_test is not None and data.y_test is not None:
        return accuracy(model, data.x_test.to(device), data.y_test.to(device), passes=passes), "test"
    out = torch.from_numpy(~np.asarray(members, dtype=bool))
    return accuracy(model, data.x[out].to(device), data.y[out].to(device), passes=passes), "population-out"


@dataclass(frozen=True)
class Inference:
    """How a mechanism's released model predicts: the prepared model, passes, randomness."""

    model: torch.nn.Module
    passes: int
    stochastic: bool


def released(
    model: torch.nn.Module, mechanism_name: str, hyperparameters: dict[str, Any], seed: int
) -> Inference:
    """Turn a built architecture into the mechanism's released predictor (e.g. noisy slots).

    An unregistered mechanism (a checkpoint audited without a recipe) predicts as built.
    """
    from mechanisms import mechanism_names

    if mechanism_name not in mechanism_names():
        return Inference(model, 1, False)
    mechanism = get_mechanism(mechanism_name)
    config = config_from_mapping(mechanism.config_type, hyperparameters)
    return Inference(
        mechanism.released(model, config, seed), mechanism.eval_passes(config), mechanism.stochastic(config)
    )


def seeds(root: int) -> tuple[np.ndarray, int, int]:
    """Independent streams from the root seed: the member mask, weight init, training."""
    keep_seq, init_seq, train_seq = np.random.SeedSequence(root).spawn(3)
    return keep_seq, int(init_seq.generate_state(1)[0]), int(train_seq.generate_state(1)[0])


@dataclass(frozen=True)
class TrainedTarget:
    """A trained target before it is written: what a worker (perhaps on another machine)
    returns to the driver, which writes it with :func:`write_target`."""

    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]  # model.json without the canary file's fields
    keep: np.ndarray
    canaries: Any = None  # mechanisms.canaries.CanaryRecord when canaries rode along


def train_target(request: TrainRequest, out: str | Path) -> dict[str, Any]:
    """Train a target on a random half of the population and write its checkpoint to ``out``.

    Seeds: ``SeedSequence(seed)`` spawns independent streams for the membership half, the
    weight initialisation and the training randomness (sampling, noise).
    """
    return write_target(out, request, compute_target(request))


def write_target(out: str | Path, request: TrainRequest, trained: TrainedTarget) -> dict[str, Any]:
    """Write a trained target's checkpoint (and canary record) to ``out``; returns its meta."""
    meta = dict(trained.meta)
    if trained.canaries is not None:
        assert request.canaries is not None
        meta["canaries"] = {
            **request.canaries.gradient_json(),
            "confidence": request.canaries.confidence,
            **save_record(out, trained.canaries),
        }
    extra = ("canaries.npz",) if trained.canaries is not None else ()
    save_checkpoint(out, trained.state_dict, meta, trained.keep, extra)
    return meta


def target_job(job: dict[str, Any]) -> TrainedTarget:
    """A target's training as an executor job: ``job['request']`` (a TrainRequest) and the
    data's identity (``dataset``, ``options``, ``sha256``), checked where the job runs."""
    request: TrainRequest = job["request"]
    data = load_verified(request.dataset, request.data_options.to_json(), job["sha256"])
    return compute_target(request, data)


def compute_target(request: TrainRequest, data: Dataset | None = None) -> TrainedTarget:
    """Train the target of ``request`` (on ``data`` when given, else loaded) without writing."""
    started = time.perf_counter()
    mechanism = get_mechanism(request.mechanism)
    if data is None:
        data = load_dataset(request.dataset, request.data_options)
    device = resolve_device(request.device)
    keep_seq, init_seed, train_seed = seeds(request.seed)
    keep = half_mask(data.population, np.random.default_rng(keep_seq))
    planted = None
    if request.canaries is not None and request.canaries.enabled:
        planted = make_canaries(request.canaries, request.seed, device)
    fitted = fit(
        data,
        model_name=request.model,
        mechanism_name=request.mechanism,
        options=request.options,
        members=keep,
        init_seed=init_seed,
        train_seed=train_seed,
        device=device,
        progress=request.progress,
        canaries=planted,
    )
    model, result, config = fitted.model, fitted.result, fitted.config
    members = torch.from_numpy(keep)
    passes = mechanism.eval_passes(config)
    evaluation = time.perf_counter()
    train_acc = accuracy(model, data.x[members].to(device), data.y[members].to(device), passes=passes)
    test_acc, split = heldout_accuracy(model, data, keep, device, passes)
    evaluation = time.perf_counter() - evaluation
    hyper = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    meta: dict[str, Any] = {
        "schema": MODEL_SCHEMA,
        "model": request.model,
        "mechanism": request.mechanism,
        "dataset": {
            "id": data.id,
            "population": data.population,
            "num_classes": data.num_classes,
            "input_shape": list(data.input_shape),
            "sha256": data.sha256,
            "options": request.data_options.to_json(),
        },
        "hyperparameters": hyper,
        "privacy": result.privacy.to_json(),
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "test_split": split,
        "train_seconds": round(fitted.seconds, 3),
        "seconds": {
            "training": round(fitted.seconds, 3),
            "accounting": round(fitted.accounting_seconds, 3),
            "evaluation": round(evaluation, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "seed": request.seed,
        "members": int(keep.sum()),
        "history": result.history,
        "diagnostics_note": "history (train loss) and train_accuracy are computed on the private training data "
        "without noise: they are outside any privacy guarantee and for diagnosis only",
        "extras": result.extras,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "mia_audit": getattr(mechanisms, "__version__", "0.1.0"),
        },
    }
    state = {k: v.detach().cpu() for k, v in result.state_dict.items()}
    return TrainedTarget(state, meta, keep, fitted.canaries)
