"""The command line's argument groups, and turning parsed arguments into requests and
options (the commands are in :mod:`audit.commands`, the parser and exit codes in
:mod:`audit.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from .dataset import DataOptions

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(ValueError):
    """Bad command-line input: printed and answered with exit code 2."""


def field_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    return tp


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def mechanism_fields() -> dict[str, tuple[type, set[str]]]:
    """Option fields that mechanisms add to TrainConfig: name -> (type, mechanisms using it)."""
    from mechanisms import TrainConfig, get_mechanism, mechanism_names

    base = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, tuple[type, set[str]]] = {}
    for name in mechanism_names():
        cls = get_mechanism(name).config_type
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in base:
                continue
            tp = field_type(hints[f.name])
            out.setdefault(f.name, (tp, set()))[1].add(name)
    return out


def add_data_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    g = p.add_argument_group("data")
    if default is None:
        g.add_argument("--dataset", required=True, help="dataset id (see 'mia-audit datasets')")
    else:
        g.add_argument(
            "--dataset", default=default, help=f"dataset id (see 'mia-audit datasets'; default {default})"
        )
    g.add_argument("--data-root", help="folder holding torchvision datasets")
    g.add_argument("--download", action="store_true", help="download torchvision datasets to --data-root")
    g.add_argument("--label-column", help="label column of a csv:PATH dataset")
    for f in dataclasses.fields(DataOptions):
        if f.name.startswith("synthetic_"):
            g.add_argument(
                flag(f.name),
                type=int,
                default=f.default,
                help=f"synthetic dataset: {f.name[10:]} (default {f.default})",
            )


def data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(
        data_root=args.data_root,
        download=args.download,
        label_column=args.label_column,
        synthetic_samples=args.synthetic_samples,
        synthetic_features=args.synthetic_features,
        synthetic_classes=args.synthetic_classes,
        synthetic_seed=args.synthetic_seed,
    )


def add_train_args(p: argparse.ArgumentParser, *, canary: bool = False) -> None:
    from mechanisms import TrainConfig

    add_data_args(p, "mnist5k" if canary else None)
    g = p.add_argument_group("model and training")
    model_help = "model name (see 'mia-audit models') or package.module:factory"
    if canary:
        g.add_argument("--model", default="cnn", help=model_help + " (default cnn)")
        g.add_argument(
            "--mechanism", required=True, help="gradient mechanism to audit (see 'mia-audit mechanisms')"
        )
    else:
        g.add_argument("--model", required=True, help=model_help)
        g.add_argument(
            "--mechanism", default="sgd", help="training mechanism (see 'mia-audit mechanisms'; default sgd)"
        )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "progress":
            continue
        g.add_argument(
            flag(f.name), type=field_type(hints[f.name]), default=None, help=f"(default {f.default})"
        )
    g.add_argument("--seed", type=int, default=0, help="root seed (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g = p.add_argument_group("mechanism options (each applies to the mechanisms named)")
    for name, (tp, users) in sorted(mechanism_fields().items()):
        helptext = "mechanisms: " + ", ".join(sorted(users))
        if tp is bool:
            g.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            g.add_argument(flag(name), type=tp, default=None, help=helptext)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory for the checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_executor_args(g: Any) -> None:
    g.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="where reference models train: local worker processes (default) or Ray",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="join the Ray cluster at ADDRESS (e.g. 10.0.0.1:6379); default: start Ray on this machine",
    )


def executor_settings(args: argparse.Namespace, base: Any = None):
    """The [executor] settings of a configuration (or the defaults) with the flags on top."""
    from .executors import ExecutorSettings

    base = base or ExecutorSettings()
    kind = args.executor or ("ray" if args.ray_address else base.kind)
    address = args.ray_address if args.ray_address is not None else base.address
    return dataclasses.replace(base, kind=kind, address=address)


def add_attack_args(p: argparse.ArgumentParser, *, references: int = 16) -> None:
    g = p.add_argument_group("attacks")
    g.add_argument(
        "--attacks",
        help="comma-separated attacks, each NAME or NAME:key=value[:key=value] "
        "(e.g. lira-online:fixed_variance=false); default: all",
    )
    g.add_argument(
        "--references", type=int, default=references, help=f"reference models (even; default {references})"
    )
    g.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    add_executor_args(g)
    g.add_argument("--queries", type=int, default=None, help="queries per example (default 2 for images)")
    g.add_argument("--fpr-levels", default="0.001,0.01,0.1", help="FPR levels (default 0.001,0.01,0.1)")
    g.add_argument("--delta", type=float, default=1e-5, help="delta of the epsilon lower bound")
    g.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of intervals and bounds")
    g.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="seed of references and bootstrap (default 0)")
    g.add_argument("--device", default="cpu", help="device (default cpu)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--overwrite", action="store_true", help="recompute an existing results.json")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    from mechanisms import TrainConfig, get_mechanism

    mechanism = get_mechanism(args.mechanism)
    accepted = {f.name for f in dataclasses.fields(mechanism.config_type)}
    values: dict[str, Any] = {}
    candidates = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "progress"]
    candidates += list(mechanism_fields())
    for name in candidates:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in accepted:
            raise UsageError(f"{flag(name)} does not apply to mechanism {args.mechanism!r}")
        values[name] = value
    return values


def attack_request(args: argparse.Namespace, target: str = ""):
    import attacks

    from .attack import AttackRequest, parse_attack_spec

    if args.attacks:
        specs = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    else:
        specs = tuple(attacks.attack_names())
    for spec in specs:
        parse_attack_spec(spec)  # fail fast on unknown names or options
    try:
        levels = tuple(float(v) for v in args.fpr_levels.split(","))
    except ValueError as err:
        raise UsageError(f"--fpr-levels must be comma-separated numbers, got {args.fpr_levels!r}") from err
    if (Path(args.out) / "results.json").exists() and not args.overwrite:
        raise UsageError(
            f"{Path(args.out) / 'results.json'} exists; pass --overwrite to recompute it "
            "(finished reference models are reused either way)"
        )
    return AttackRequest(
        target=target,
        attacks=specs,
        references=args.references,
        workers=args.workers,
        queries=args.queries,
        fpr_levels=levels,
        delta=args.delta,
        alpha=args.alpha,
        resamples=args.resamples,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        model=getattr(args, "model", None),
        executor=executor_settings(args),
    )


def train_request(args: argparse.Namespace, canaries: Any = None):
    """The training request of ``train`` and ``canary`` (after the output folder is checked)."""
    from .train import TrainRequest, check_output_dir

    check_output_dir(args.out, args.overwrite)
    return TrainRequest(
        dataset=args.dataset,
        model=args.model,
        mechanism=args.mechanism,
        options=train_options(args),
        data_options=data_options(args),
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        canaries=canaries,
    )


def add_canary_args(p: argparse.ArgumentParser) -> None:
    from .canary import DEFAULT_COUNT, THREAT_MODELS

    g = p.add_argument_group("canary audit")
    g.add_argument(
        "--canaries",
        type=int,
        default=DEFAULT_COUNT,
        help=f"gradient canaries planted, calibration ones included (default {DEFAULT_COUNT:,})",
    )
    g.add_argument(
        "--threat-model",
        default=None,
        choices=[*THREAT_MODELS, "white-box", "black-box", "all"],
        help="what the auditor sees: every privatised step, the final weights (white-box: both; "
        "gradient canaries), or only the outputs (black-box: input canaries in a canary twin); "
        "default white-box for gradient mechanisms, else black-box",
    )
    g.add_argument(
        "--input-canaries",
        type=int,
        default=1000,
        help="black box: input canaries planted in the twin (default 1000)",
    )
    g.add_argument(
        "--input-kind",
        default="mislabelled",
        choices=["mislabelled", "ood"],
        help="black box: held-out images with a wrong label, or generated inputs (default mislabelled)",
    )
    g.add_argument(
        "--canary-norm", type=float, default=10.0, help="canary gradient norm in clipping norms (default 10)"
    )
    g.add_argument(
        "--calibration",
        type=float,
        default=0.25,
        help="share of canaries that only choose thresholds and guess counts (default 0.25)",
    )
    g.add_argument("--confidence", type=float, default=0.95, help="confidence of every bound (default 0.95)")


def canary_settings(args: argparse.Namespace, gradient: bool):
    from .canary import THREAT_MODELS, CanarySettings

    choice = args.threat_model or ("white-box" if gradient else "black-box")
    white = {"all": THREAT_MODELS, "white-box": THREAT_MODELS, "black-box": ()}.get(choice, (choice,))
    black = choice in ("all", "black-box")
    if white and not gradient:
        raise UsageError(
            f"mechanism {args.mechanism!r} has no gradient to plant canaries in: audit it with "
            "--threat-model black-box (input canaries in a canary twin)"
        )
    if white and args.canaries < 100:
        raise UsageError(f"--canaries must be at least 100, got {args.canaries}")
    if black and args.input_canaries < 10:
        raise UsageError(f"--input-canaries must be at least 10, got {args.input_canaries}")
    try:
        return CanarySettings(
            count=args.canaries if white else 0,
            norm=args.canary_norm,
            calibration=args.calibration,
            threat_models=white or THREAT_MODELS,
            confidence=args.confidence,
            inputs=args.input_canaries if black else 0,
            input_kind=args.input_kind,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
