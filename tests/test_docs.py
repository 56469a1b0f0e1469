"""The README and docs/ stay true: the README is short and leads with the two commands, every relative link
resolves, and every `planner` command line they show parses against the real CLI (options that exist, files
in this repository that exist). Running each documented plan would take hours; parsing catches the rot that
matters most (renamed options, moved files)."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from planner.cli.commands import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_FILE = re.compile(r"^(examples|recipes|bench|scripts|tests)/[\w./-]+\.(py|toml|sh)$")


def _bash_lines(text: str) -> list[str]:
    """Command lines of ```bash blocks, continuations joined, comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_is_short_and_leads_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = _bash_lines(text.split("```bash", 1)[1].split("```", 1)[0].join(["```bash", "```"]))
    assert first_block == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci  # CI runs the README's test command


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def _documented_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for line in _bash_lines(page.read_text()):
            words = shlex.split(line)
            if words and Path(words[0]).name == "planner":
                found.append((page.name, line))
    return found


COMMANDS = _documented_commands()


def test_the_docs_show_planner_commands() -> None:
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_documented_command_parses(page: str, line: str) -> None:
    words = shlex.split(line)[1:]
    group = typer.main.get_command(app)
    context = group.make_context("planner", list(words))
    name, command, rest = group.resolve_command(context, list(words))  # the group itself takes no options
    assert command is not None, f"{page}: unknown command in {line!r}"
    command.make_context(name, rest, parent=context)  # raises on an unknown option or a bad value
    for word in words:
        candidate = word.split(":", 1)[0]
        if REPO_FILE.match(candidate):
            assert (ROOT / candidate).exists(), f"{page}: {line!r} names {candidate}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_planner_modules_exist(page: Path) -> None:
    """`planner/x/y.py` and `planner.x.y` as the docs name them: a module moved without its docs fails here."""
    text = page.read_text()
    missing = [path for path in re.findall(r"\bplanner/[\w/]+\.py\b", text) if not (ROOT / path).exists()]
    for dotted in re.findall(r"`(planner(?:\.\w+)+)", text):
        parts = dotted.split(".")
        # the longest prefix that is a module or package; what follows it is an attribute
        if not any((ROOT / Path(*parts[:i])).with_suffix(".py").exists() or (ROOT / Path(*parts[:i])).is_dir()
                   for i in range(2, len(parts) + 1)):
            missing.append(dotted)
    assert not missing, f"{page.name} names modules that do not exist: {missing}"
