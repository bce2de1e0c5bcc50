"""The README and docs/ stay a usable manual: short front door, working links and commands.

* the README is at most 250 lines;
* every relative link in README.md and docs/*.md names an existing file, and an anchor
  names a heading of that file (GitHub's slug rule);
* every shell command in the README's ```bash blocks (and those of docs/) whose program
  is a sepals entry point (``[project.scripts]`` of pyproject.toml) parses with that
  entry point's own argparse parser, exactly as written, so an unknown or malformed
  flag fails;
* no page refers to work items by number.

The entry points are found through pyproject.toml, not hard-coded module names: a
module that exposes ``build_parser()`` is parsed with it; otherwise its ``main(argv)``
runs until its first ``parse_args``/``parse_known_args`` call, which parses the argv
and then stops the command before it does anything.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_FILES: list[Path] = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

WORK_ITEM = re.compile(r"\b(?:[Ii]ssues?|PR|[Tt]ickets?|[Ww]ork items?)[ -]?#?\d+")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL_OPERATORS = {"&&", "||", ";", "&", "|", ";;", "(", ")"}
SHELL_KEYWORDS = {"do", "done", "then", "fi", "else", "elif", "if", "while", "until", "!"}


# ------------------------------------------------------------------------ markdown helpers
def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _outside_code(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(2)[0] * 3
                continue
            if match.group(2).startswith(fence) and not match.group(3):
                fence = None
                continue
        if fence is None:
            yield number, line


def code_blocks(text: str, languages: set[str]) -> Iterator[tuple[int, str]]:
    """(first line number, body) of every fenced block whose info string is in languages."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        marker, language = match.group(2), match.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(marker[0] * len(marker)):
            body.append(lines[j])
            j += 1
        if language in languages:
            yield i + 2, "\n".join(body)
        i = j + 1


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, drop punctuation, spaces become hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, _, - and spaces
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in _outside_code(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        result.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return result


def relative_links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every relative link outside code (no scheme, no mailto)."""
    for number, line in _outside_code(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for match in LINK.finditer(line):
            target = match.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            yield number, target


# ---------------------------------------------------------------------- the entry points
def entry_points() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: command name -> "module:function"."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        scripts: dict[str, str] = tomllib.load(f)["project"]["scripts"]
    return scripts


class _Parsed(Exception):
    """Raised by the patched parser once the argv parsed: stops main() before it acts."""


def _parse_with_main(main: Callable[..., Any], argv: list[str]) -> None:
    """Run ``main(argv)`` until its first top-level parse, which must succeed."""
    originals: dict[str, Callable[..., Any]] = {
        "parse_args": argparse.ArgumentParser.parse_args,
        "parse_known_args": argparse.ArgumentParser.parse_known_args,
    }
    depth = {"n": 0}

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def patched(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
            if depth["n"]:  # a subparser's own parse inside the top-level one
                return original(self, *args, **kwargs)
            depth["n"] += 1
            try:
                original(self, *args, **kwargs)
            finally:
                depth["n"] -= 1
            raise _Parsed

        return patched

    mp = pytest.MonkeyPatch()
    try:
        for name in originals:
            mp.setattr(argparse.ArgumentParser, name, wrap(name))
        try:
            main(argv)
        except _Parsed:
            return
    finally:
        mp.undo()
    raise AssertionError("main() returned without parsing its arguments")


def _parse_with_subprocess(target: str, argv: list[str]) -> None:
    """Last resort: the entry point run as ``ARGV --help`` must exit 0 (flag names unchecked)."""
    module, _, function = target.partition(":")
    code = f"import sys; from {module} import {function or 'main'} as m; sys.exit(m(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.returncode or 1)


def parse_command(program: str, argv: list[str]) -> None:
    """Parse argv with the parser of entry point ``program``; SystemExit(!=0) on failure."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    target = entry_points()[program]
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        _parse_with_subprocess(target, argv)
        return
    build_parser = getattr(module, "build_parser", None)
    if callable(build_parser):
        parser = build_parser()
        assert isinstance(parser, argparse.ArgumentParser)
        parser.parse_args(argv)
        return
    main = getattr(module, function or "main", None)
    if callable(main):
        _parse_with_main(main, argv)
        return
    _parse_with_subprocess(target, argv)


# ------------------------------------------------------------------ shell command parsing
_SUBSTITUTION = re.compile(r"\$\((?:[^()]|\([^()]*\))*\)|`[^`]*`")


def logical_lines(script: str) -> Iterator[str]:
    """Lines of a shell script with backslash continuations joined."""
    pending = ""
    for raw in script.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield pending + raw
        pending = ""
    if pending:
        yield pending


def simple_commands(script: str) -> Iterator[tuple[str, list[str]]]:
    """(source text, words) of every simple command, split at && || ; & | and keywords."""
    for line in logical_lines(script):
        # A command substitution stands for a value the parser sees as one word.
        text = _SUBSTITUTION.sub("1", line)
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in lexer:
            if token in SHELL_OPERATORS:
                if words:
                    yield line.strip(), words
                words = []
            elif not words and token in SHELL_KEYWORDS:
                continue
            else:
                words.append(token)
        if words:
            yield line.strip(), words


def entry_point_commands(text: str) -> list[tuple[int, str, str, list[str]]]:
    """(line, source, program, argv) of every sepals entry point run in ```bash blocks."""
    programs = set(entry_points())
    found: list[tuple[int, str, str, list[str]]] = []
    for line, body in code_blocks(text, {"bash", "sh", "shell", "console"}):
        for source, words in simple_commands(body):
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words = words[1:]  # VAR=value prefixes
            if not words:
                continue
            program = words[0]
            for prefix in (".venv/bin/", "./.venv/bin/"):
                program = program.removeprefix(prefix)
            if program in programs:
                found.append((line, source, program, words[1:]))
    return found


README_COMMANDS = entry_point_commands(README.read_text(encoding="utf-8"))
DOCS_COMMANDS = [
    (page, program, argv)
    for page in DOC_FILES[1:]
    for _, _, program, argv in entry_point_commands(page.read_text(encoding="utf-8"))
]


# ---------------------------------------------------------------------------------- tests
def test_readme_is_at_most_250_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", DOC_FILES, ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    broken: list[str] = []
    for number, target in relative_links(page):
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{_rel(page)}:{number}: {target} (no such file)")
            continue
        if anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{_rel(page)}:{number}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_shows_entry_point_commands() -> None:
    programs = {program for _, _, program, _ in README_COMMANDS}
    assert {"sepals", "sepals-sim", "sepals-server"} <= programs, programs


@pytest.mark.parametrize(
    ("program", "argv"),
    [pytest.param(p, a, id=shlex.join([p, *a])[:80]) for _, _, p, a in README_COMMANDS],
)
def test_readme_command_parses(program: str, argv: list[str]) -> None:
    _check_parses("README", program, argv)


@pytest.mark.parametrize(
    ("page", "program", "argv"),
    [
        pytest.param(page, p, a, id=f"{page.name}:" + shlex.join([p, *a])[:70])
        for page, p, a in DOCS_COMMANDS
    ],
)
def test_docs_command_parses(page: Path, program: str, argv: list[str]) -> None:
    """The manual's commands are held to the same rule as the README's."""
    _check_parses(_rel(page), program, argv)


def _check_parses(where: str, program: str, argv: list[str]) -> None:
    """Fail, naming ``where`` and the command, unless ``program argv`` parses."""
    command = shlex.join([program, *argv])
    try:
        parse_command(program, argv)
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"{where}: command does not parse (exit {exc.code}): {command}")
    except AssertionError as exc:
        pytest.fail(f"{where}: command does not parse: {command}: {exc}")


def test_a_bad_flag_fails_to_parse() -> None:
    """The check has teeth: an unknown flag is refused by every entry point, also after
    a subcommand, and so is every README command with one appended."""
    cases = [(program, ["--no-such-flag-anywhere"]) for program in entry_points()]
    cases += [(p, [*a, "--no-such-flag-anywhere"]) for _, _, p, a in README_COMMANDS]
    for program, argv in cases:
        with pytest.raises(SystemExit) as info:
            parse_command(program, argv)
        assert info.value.code not in (0, None), shlex.join([program, *argv])


def test_command_extraction_handles_shell_syntax() -> None:
    script = (
        "# a comment\n"
        "./scripts/bootstrap.sh && .venv/bin/sepals-sim --pretrained\n"
        "X=1 .venv/bin/sepals provision --out /tmp/fl --clients 3 \\\n"
        '    --model-parameters "$(.venv/bin/python examples/edge_app.py --parameters)"\n'
        ".venv/bin/sepals-server --config s.toml &   # trailing comment\n"
        "for i in 1 2 3; do sepals ledger show l-$i.json; done\n"
    )
    commands = [(p, a) for _, _, p, a in entry_point_commands(f"```bash\n{script}```\n")]
    assert commands == [
        ("sepals-sim", ["--pretrained"]),
        ("sepals", ["provision", "--out", "/tmp/fl", "--clients", "3", "--model-parameters", "1"]),
        ("sepals-server", ["--config", "s.toml"]),
        ("sepals", ["ledger", "show", "l-$i.json"]),
    ]


def test_github_slug_rule() -> None:
    assert github_slug("The compact codec") == "the-compact-codec"
    assert github_slug("HE codecs: `python -m benchmarks.he`") == "he-codecs-python--m-benchmarkshe"
    assert github_slug("1,000 clients") == "1000-clients"


@pytest.mark.parametrize("page", DOC_FILES, ids=_rel)
def test_no_work_item_numbers(page: Path) -> None:
    hits = [
        f"{_rel(page)}:{number}: {line.strip()}"
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if WORK_ITEM.search(line)
    ]
    assert not hits, "name the feature, not the work item:\n" + "\n".join(hits)
