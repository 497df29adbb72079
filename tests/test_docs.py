"""The docs stay honest: every ``mia-audit`` command line in README.md and docs/*.md uses
only flags the real argument parser knows (and parses, when it is a complete command), and
every relative link resolves."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from audit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def commands(text: str) -> list[str]:
    """Every ``mia-audit ...`` command in code blocks (continuations joined, comments and
    shell operators cut) and in inline code spans."""
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines = joined.split("\n")
        i = 0
        while i < len(lines):
            line = lines[i].split(" #")[0].strip()
            if line.startswith("#"):
                i += 1
                continue
            # a synopsis spans indented lines that start with "["
            while (
                i + 1 < len(lines) and lines[i + 1].startswith(" ") and lines[i + 1].strip().startswith("[")
            ):
                i += 1
                line += " " + lines[i].strip()
            for part in re.split(r"&&|\|\||;", line):
                part = part.strip()
                if part.startswith("mia-audit "):
                    found.append(part)
            i += 1
    text_outside = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [m for m in re.findall(r"`(mia-audit [^`]+)`", text_outside)]
    return found


def check_command(command: str, parser: argparse.ArgumentParser) -> None:
    subs = _subparsers(parser)
    tokens = command.split()
    assert len(tokens) >= 2, command
    names = tokens[1].split("|")
    for name in names:
        assert name in subs or name.startswith("--"), f"unknown command in the docs: {command!r}"
    name = names[0]
    if len(tokens) == 2 or name.startswith("--"):  # a mention of the command, not a use
        return
    known = _flags(subs[name]) | _flags(parser)
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command):
        assert flag in known, f"{command!r}: {flag} is not an option of 'mia-audit {name}'"
    # a synopsis (brackets, alternatives, placeholders such as DIR or CONFIG.toml) is checked
    # for its flags only; a complete command must also parse
    placeholder = any(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[a-z]+)?", t) for t in tokens[2:])
    if not (placeholder or any(c in command for c in "[]|") or "..." in command):
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit as err:  # argparse exits on an error (and with 0 after --help)
            if err.code == 0:
                return
            raise AssertionError(f"{command!r} does not parse: exit {err.code}") from None


def test_the_pages_mention_commands():
    assert sum(len(commands(p.read_text(encoding="utf-8"))) for p in PAGES if p.is_file()) >= 20


@pytest.mark.parametrize("page", [p for p in PAGES if p.is_file()], ids=lambda p: p.name)
def test_every_documented_command_parses(page):
    parser = build_parser()
    for command in commands(page.read_text(encoding="utf-8")):
        check_command(command, parser)


def test_a_misspelt_flag_is_caught():
    parser = build_parser()
    with pytest.raises(AssertionError, match="--referencs"):
        check_command("mia-audit attack --target runs/t --referencs 16 --out runs/a", parser)
    with pytest.raises(AssertionError, match="--workerz"):
        check_command("mia-audit attack --target DIR [--workerz W] --out DIR", parser)
    with pytest.raises(AssertionError, match="does not parse"):
        check_command("mia-audit train --dataset digits --model mlp --epochs x --out runs/d", parser)


@pytest.mark.parametrize("page", [p for p in PAGES if p.is_file()], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link {target!r} does not resolve"


def test_the_readmes_python_example_runs(capsys):
    """The notebook example in README.md runs as printed (the Python API)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    auc = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= auc <= 1.0
