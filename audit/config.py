"""Run configuration: TOML parsed once into frozen dataclasses; unknown keys are errors.

A configuration names the data, the model, the attacks and, under ``[[mechanisms]]``, every
mechanism to train with its options and privacy budgets (epsilons). Presets ship with the
package (``audit/presets/*.toml``): ``quick`` (the default job), ``smoke`` (about a minute, for
CI) and ``paper`` (larger). See the README for every key.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .canary import CanarySettings
from .executors import ExecutorSettings
from .files import check_id

__all__ = ["GateLimits", "MechanismSpec", "RunConfig", "load_config", "preset_names"]


def _typed(table: dict[str, Any], where: str, **kinds: Any) -> None:
    """Check the types of ``table``'s keys that are present: ``int``, ``float`` (ints too),
    ``str``, ``bool``, ``"strs"`` / ``"floats"`` (lists of), or ``dict``. Booleans are not
    numbers here."""
    for key, kind in kinds.items():
        if key not in table:
            continue
        v = table[key]
        number = isinstance(v, int | float) and not isinstance(v, bool)
        ok = {
            int: isinstance(v, int) and not isinstance(v, bool),
            float: number and math.isfinite(v),
            str: isinstance(v, str),
            bool: isinstance(v, bool),
            dict: isinstance(v, dict),
            "strs": isinstance(v, list) and all(isinstance(x, str) for x in v),
            "floats": isinstance(v, list)
            and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v),
        }[kind]
        if not ok:
            expected = {
                int: "an integer",
                float: "a finite number",
                str: "a string",
                bool: "true or false",
                dict: "a table",
                "strs": "a list of strings",
                "floats": "a list of numbers",
            }[kind]
            raise ValueError(f"{where}: {key} must be {expected}, got {v!r}")


def _take(table: dict[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where}; accepted: {', '.join(sorted(allowed))}")
    return table


@dataclass(frozen=True)
class MechanismSpec:
    """One mechanism: its options, the epsilons to train it at (empty: once, as configured),
    and optionally its own model (e.g. residual perturbation needs a ResNet) and target id."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    budgets: tuple[float, ...] = ()
    model: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class GateLimits:
    """Absolute leakage limits for ``mia-audit gate`` (None: no limit) and the epsilon margin."""

    max_auc: float | None = None
    max_tpr_at_fpr: dict[str, float] = field(default_factory=dict)
    max_epsilon_lb: float | None = None
    epsilon_margin: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    dataset: str = "mnist5k"
    data_options: dict[str, Any] = field(default_factory=dict)
    model: str = "cnn"
    seed: int = 0
    queries: int | None = None
    attacks: tuple[str, ...] = ()
    references: int = 8
    workers: int | None = None
    fpr_levels: tuple[float, ...] = (0.001, 0.01, 0.1)
    delta: float = 1e-5
    alpha: float = 0.05
    resamples: int = 1000
    device: str = "auto"
    mechanisms: tuple[MechanismSpec, ...] = ()
    gate: GateLimits = field(default_factory=GateLimits)
    canaries: CanarySettings = field(default_factory=lambda: CanarySettings(count=0, inputs=0))
    # how jobs run, not what they compute: left out of config.toml (switching executors
    # resumes a run instead of refusing it as another configuration)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    source: str = ""

    def to_toml(self) -> str:
        """The resolved configuration as TOML (written to RUN/config.toml)."""
        lines = [f"# resolved from {self.source}" if self.source else "# resolved configuration"]
        lines += [f"seed = {self.seed}", "", "[data]", f'dataset = "{self.dataset}"']
        lines += [f"{k} = {_toml(v)}" for k, v in self.data_options.items()]
        lines += ["", "[target]", f'model = "{self.model}"']
        if self.queries is not None:
            lines.append(f"queries = {self.queries}")
        lines += ["", "[attack]", f"attacks = {_toml(list(self.attacks))}", f"references = {self.references}"]
        if self.workers is not None:
            lines.append(f"workers = {self.workers}")
        lines += [
            f"fpr_levels = {_toml(list(self.fpr_levels))}",
            f"delta = {self.delta}",
            f"alpha = {self.alpha}",
            f"resamples = {self.resamples}",
            f'device = "{self.device}"',
        ]
        for m in self.mechanisms:
            lines += ["", "[[mechanisms]]", f'name = "{m.name}"']
            if m.budgets:
                lines.append(f"budgets = {_toml(list(m.budgets))}")
            if m.model:
                lines.append(f'model = "{m.model}"')
            if m.id:
                lines.append(f'id = "{m.id}"')
            if m.options:
                lines.append(
                    "options = { " + ", ".join(f"{k} = {_toml(v)}" for k, v in m.options.items()) + " }"
                )
        c = self.canaries
        lines += [
            "",
            "[canaries]",
            f"count = {c.count}",
            f"norm = {c.norm}",
            f"calibration = {c.calibration}",
            f"threat_models = {_toml(list(c.threat_models))}",
            f"confidence = {c.confidence}",
            f"inputs = {c.inputs}",
            f'input_kind = "{c.input_kind}"',
        ]
        g = self.gate
        lines += ["", "[gate]", f"epsilon_margin = {g.epsilon_margin}"]
        if g.max_auc is not None:
            lines.append(f"max_auc = {g.max_auc}")
        if g.max_epsilon_lb is not None:
            lines.append(f"max_epsilon_lb = {g.max_epsilon_lb}")
        if g.max_tpr_at_fpr:
            lines.append(
                "max_tpr_at_fpr = { " + ", ".join(f'"{k}" = {v}' for k, v in g.max_tpr_at_fpr.items()) + " }"
            )
        return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("audit.presets").iterdir() if p.name.endswith(".toml"))


def _read(path: str | None, preset: str | None) -> tuple[dict[str, Any], str]:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"configuration file {path!r} does not exist")
        text, source = p.read_text(encoding="utf-8"), str(p)
    else:
        name = preset or "quick"
        if name not in preset_names():
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
        text, source = (
            (resources.files("audit.presets") / f"{name}.toml").read_text(encoding="utf-8"),
            f"preset {name}",
        )
    try:
        return tomllib.loads(text), source
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source}: not valid TOML: {err}") from err


def load_config(path: str | None = None, *, preset: str | None = None) -> RunConfig:
    """Parse a TOML file (or a shipped preset; default ``quick``) into a :class:`RunConfig`."""
    raw, source = _read(path, preset)
    _take(raw, {"seed", "data", "target", "attack", "mechanisms", "gate", "canaries", "executor"}, source)
    _typed(
        raw, source, seed=int, data=dict, target=dict, attack=dict, gate=dict, canaries=dict, executor=dict
    )
    executor_raw = _take(
        raw.get("executor", {}),
        {"kind", "address", "cpus_per_job", "gpus_per_job", "retries"},
        f"{source} [executor]",
    )
    _typed(
        executor_raw,
        f"{source} [executor]",
        kind=str,
        address=str,
        cpus_per_job=int,
        gpus_per_job=float,
        retries=int,
    )
    try:
        executor = ExecutorSettings(**executor_raw)
    except ValueError as err:
        raise ValueError(f"{source} [executor]: {err}") from err
    data = dict(
        _take(
            raw.get("data", {}),
            {
                "dataset",
                "data_root",
                "download",
                "label_column",
                "synthetic_samples",
                "synthetic_features",
                "synthetic_classes",
                "synthetic_seed",
            },
            f"{source} [data]",
        )
    )
    _typed(
        data,
        f"{source} [data]",
        dataset=str,
        data_root=str,
        download=bool,
        label_column=str,
        synthetic_samples=int,
        synthetic_features=int,
        synthetic_classes=int,
        synthetic_seed=int,
    )
    target = _take(raw.get("target", {}), {"model", "queries"}, f"{source} [target]")
    _typed(target, f"{source} [target]", model=str, queries=int)
    attack = _take(
        raw.get("attack", {}),
        {"attacks", "references", "workers", "fpr_levels", "delta", "alpha", "resamples", "device"},
        f"{source} [attack]",
    )
    _typed(
        attack,
        f"{source} [attack]",
        attacks="strs",
        references=int,
        workers=int,
        fpr_levels="floats",
        delta=float,
        alpha=float,
        resamples=int,
        device=str,
    )
    if not isinstance(raw.get("mechanisms", []), list):
        raise ValueError(f"{source}: [[mechanisms]] must be an array of tables")
    mechs = []
    for i, m in enumerate(raw.get("mechanisms", [])):
        if not isinstance(m, dict):
            raise ValueError(f"{source} [[mechanisms]] #{i + 1} must be a table")
        _take(m, {"name", "options", "budgets", "model", "id"}, f"{source} [[mechanisms]] #{i + 1}")
        _typed(
            m,
            f"{source} [[mechanisms]] #{i + 1}",
            name=str,
            options=dict,
            budgets="floats",
            model=str,
            id=str,
        )
        if "name" not in m:
            raise ValueError(f"{source} [[mechanisms]] #{i + 1} needs a name")
        check_id(m["name"], f"{source} [[mechanisms]] #{i + 1} name")
        if m.get("id") is not None:
            check_id(m["id"], f"{source} [[mechanisms]] #{i + 1} id")
        budgets = tuple(float(b) for b in m.get("budgets", []))
        mechs.append(
            MechanismSpec(m["name"], dict(m.get("options", {})), budgets, m.get("model"), m.get("id"))
        )
    if not mechs:
        raise ValueError(f"{source}: no [[mechanisms]] to run")
    canary_raw = _take(
        raw.get("canaries", {}), {f.name for f in fields(CanarySettings)}, f"{source} [canaries]"
    )
    try:
        # a [canaries] table turns the audit on (default count); without one it is off
        canaries = CanarySettings(**canary_raw) if "canaries" in raw else CanarySettings(count=0, inputs=0)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} [canaries]: {err}") from err
    gate_raw = _take(raw.get("gate", {}), {f.name for f in fields(GateLimits)}, f"{source} [gate]")
    gate = GateLimits(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in gate_raw.items()})
    from attacks import attack_names

    return RunConfig(
        dataset=data.pop("dataset", "mnist5k"),
        data_options=data,
        model=target.get("model", "cnn"),
        seed=int(raw.get("seed", 0)),
        queries=target.get("queries"),
        attacks=tuple(attack.get("attacks", attack_names())),
        references=int(attack.get("references", 8)),
        workers=attack.get("workers"),
        fpr_levels=tuple(float(v) for v in attack.get("fpr_levels", (0.001, 0.01, 0.1))),
        delta=float(attack.get("delta", 1e-5)),
        alpha=float(attack.get("alpha", 0.05)),
        resamples=int(attack.get("resamples", 1000)),
        device=attack.get("device", "auto"),
        mechanisms=tuple(mechs),
        gate=gate,
        canaries=canaries,
        executor=executor,
        source=source,
    )
