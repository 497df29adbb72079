"""The ``mia-audit`` command line. Exit codes: 0 success, 1 gate failed (and only that), 2 usage,
configuration or input error, 3 an unexpected internal error (a bug: one line, the traceback
with ``--debug``), 130 interrupted."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .cli_args import (
    EXIT_INTERNAL,
    EXIT_USAGE,
    add_attack_args,
    add_canary_args,
    add_data_args,
    add_executor_args,
    add_train_args,
)
from .executors import JobError

__all__ = ["build_parser", "main"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that command's options are added (the others
    keep their names and help), so that ``--help``, listings and argument errors of one
    command answer without importing torch and the mechanisms."""

    def want(name: str) -> bool:
        return only is None or only == name

    parser = argparse.ArgumentParser(
        prog="mia-audit",
        description="Membership-inference auditing for PyTorch: train privately, attack, measure leakage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="train, attack and report every mechanism x budget of a configuration")
    run.add_argument("config", nargs="?", help="CONFIG.toml (default: the quick preset)")
    run.add_argument("--preset", help="a shipped preset: quick (default), smoke, paper")
    run.add_argument("--out", help="run directory (default runs/<config or preset name>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run made with another configuration")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    add_executor_args(run)
    run.add_argument(
        "--check",
        action="store_true",
        help="check the configuration (options, models, attacks, data) and list its targets; train nothing",
    )
    train = sub.add_parser("train", help="train one target model on a random half of a dataset")
    if want("train"):
        add_train_args(train)
    canary = sub.add_parser(
        "canary",
        help="audit a mechanism's privatisation white-box: train with gradient canaries, bound epsilon",
        description="Train a target with gradient canaries riding along (the model's weights are the "
        "same as without them) and turn what the canaries recorded into empirical epsilon lower "
        "bounds (one-run, f-DP one-run, Clopper-Pearson, and a Gaussian-DP estimate), to compare "
        "with the mechanism's accountant.",
    )
    if want("canary"):
        add_train_args(canary, canary=True)
        add_canary_args(canary)
    attack = sub.add_parser("attack", help="attack a trained target with membership inference")
    attack.add_argument("--target", required=True, help="checkpoint directory written by 'mia-audit train'")
    attack.add_argument(
        "--model",
        help="confirm a user model factory (package.module:factory) that the checkpoint's model.json names: "
        "its code is imported only when you type it",
    )
    add_attack_args(attack)
    audit = sub.add_parser("audit", help="audit a checkpoint trained elsewhere")
    audit.add_argument(
        "checkpoint",
        nargs="?",
        help="weights: .safetensors, or a .pt/.pth state dict (Opacus, torch.compile and DataParallel "
        "prefixes are removed); or give --logits",
    )
    audit.add_argument("--model", help="architecture of WEIGHTS: a registry name or package.module:factory")
    audit.add_argument(
        "--logits",
        help="the model's precomputed logits instead of WEIGHTS: .npy float [N, Q, C] or [N, 1, Q, C]",
    )
    audit.add_argument(
        "--reference-logits",
        help="reference models computed elsewhere: a folder in mia-audit's layout (keep.npy, logits/<i>.npy) "
        "or the LiRA code's (experiment-<i>_<M>/keep.npy, experiment-<i>_<M>/logits/*.npy)",
    )
    add_data_args(audit)
    audit.add_argument("--members", help="bool [N] .npy mask of the population's training members")
    audit.add_argument("--member-indices", help="member indices: .npy int array or a text file, one per line")
    audit.add_argument("--recipe", help="TOML with [recipe] mechanism and options, for reference models")
    audit.add_argument(
        "--canaries",
        help="canary file (from 'mia-audit canary-set') whose included canaries were planted in the training "
        "set: audits the checkpoint black-box",
    )
    audit.add_argument(
        "--claimed-epsilon",
        type=float,
        help="the epsilon the checkpoint's training claims, to compare bounds with",
    )
    add_attack_args(audit)
    cset = sub.add_parser(
        "canary-set",
        help="export input canaries to plant in your own training, for 'audit --canaries'",
        description="Draw input canaries (held-out images of the dataset with a random wrong label, or "
        "generated inputs), each marked for inclusion with probability 1/2, and write them to a .npz "
        "file. Plant the included ones in your training set; 'mia-audit audit --canaries' then bounds "
        "epsilon black-box from the trained model.",
    )
    add_data_args(cset)
    cset.add_argument("--count", type=int, default=1000, help="number of canaries (default 1000)")
    cset.add_argument("--kind", default="mislabelled", choices=["mislabelled", "ood"], help="canary kind")
    cset.add_argument("--members", help="bool [N] .npy mask of your training members (canaries avoid them)")
    cset.add_argument("--member-indices", help="member indices (.npy or text, one per line)")
    cset.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    cset.add_argument("--out", required=True, help="output .npz file")
    cset.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export = sub.add_parser(
        "export",
        help="write a target's signals and its references in the LiRA reference code's layout",
        description="Write the references of TARGET in RUN_DIR (a folder written by run, attack or audit) as "
        "LIRA_DIR/experiment-<i>_<M>/{keep.npy, logits/0000000000.npy} and the target as "
        "LIRA_DIR/target/{keep.npy, logits/0000000000.npy}, logits shaped [N, 1, Q, C].",
    )
    export.add_argument("run_dir", help="a folder written by run, attack or audit")
    export.add_argument("--target", help="target id (default: the only target)")
    export.add_argument("--lira", required=True, help="output folder in the LiRA layout")
    export.add_argument("--overwrite", action="store_true", help="write into a folder that holds files")
    report = sub.add_parser("report", help="re-render report.html and summary.md of a run directory")
    report.add_argument("run_dir")
    gate = sub.add_parser(
        "gate",
        help="exit 1 when leakage grew beyond a baseline, or a valid bound exceeds an accountant's epsilon",
    )
    gate.add_argument("results", help="results.json of the new run")
    gate.add_argument(
        "--baseline",
        help="baseline results.json (without one, only the checks against the accountants' epsilons run)",
    )
    gate.add_argument("--config", help="configuration whose [gate] table sets absolute limits and the margin")
    gate.add_argument("--junit", help="write a JUnit XML file, one test case per check")
    gate.add_argument(
        "--update-baseline", action="store_true", help="copy RESULTS.json to the baseline and pass"
    )
    for kind in ("datasets", "models", "mechanisms", "attacks"):
        sub.add_parser(kind, help=f"list the known {kind}")
    return parser


def _output_folder(args: argparse.Namespace) -> Path | None:
    """The folder a command writes (locked for its duration), None for those that write none."""
    if args.command == "run" and args.check:
        return None
    if args.command == "run":
        name = Path(args.config).stem if args.config else (args.preset or "quick")
        return Path(args.out or f"runs/{name}")
    if args.command in ("train", "attack", "audit", "canary"):
        return Path(args.out)
    if args.command == "export":
        return Path(args.lira)
    return None


_COMMANDS = ("run", "train", "canary", "canary-set", "export", "attack", "audit", "report", "gate")
_LISTINGS = ("datasets", "models", "mechanisms", "attacks")


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (after the global options), or None."""
    for arg in argv:
        if arg in _COMMANDS or arg in _LISTINGS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (exit 2). A mechanism's non-finite loss counts only if the
    mechanisms were imported (checking does not import them)."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, JobError)
    mechanisms = sys.modules.get("mechanisms")
    if mechanisms is not None:
        errors += (mechanisms.NonFiniteLossError,)
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only=_command_in(argv) or "")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        from . import commands

        if args.command in _COMMANDS:
            run = getattr(commands, "cmd_" + args.command.replace("-", "_"))
            folder = _output_folder(args)
            if folder is None:
                return run(args)
            from .files import OutputLock

            with OutputLock(folder):
                return run(args)
        return commands.cmd_list(args.command)
    except MemoryError as err:  # the input or options ask for more than this machine has
        print(
            f"mia-audit: error: out of memory ({err}); ask for less, or use a larger machine", file=sys.stderr
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mia-audit: interrupted; finished files are kept, nothing half-written", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _input_errors()):  # UsageError, DataError, CheckpointError, GateError, ...
            print(f"mia-audit: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        # anything else is a bug of ours: never exit 1 (a gate failure)
        if args.debug:
            import traceback

            traceback.print_exc()
        print(
            f"mia-audit: internal error: {type(err).__name__}: {err} (a bug in mia-audit; rerun with "
            "--debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
