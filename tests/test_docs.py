"""The README and docs/ stay usable: links stay inside the repository and resolve, every `archipelago ...`
command they show parses against the real CLI, and the README stays a short page for first-time users."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from archipelago.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`([^`]+)`")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_stay_inside_the_repository_and_resolve(page):
    text = page.read_text()
    assert "shared/DESIGN" not in text
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_relative_to(REPO), f"{page.name}: {target} leaves the repository"
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in _anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def _commands(text: str) -> list[list[str]]:
    """`archipelago ...` invocations in inline code and in bash blocks (continuation lines joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    found = [c for c in CODE.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL)) if c.startswith("archipelago ")]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("archipelago "):
                found.append(line)
    return [shlex.split(c)[1:] for c in found]


def test_shown_commands_parse_against_the_cli():
    root = typer.main.get_command(app)
    seen = 0
    for page in PAGES:
        for argv in _commands(page.read_text()):
            cmd, args, ctx = root, list(argv), None
            while hasattr(cmd, "commands") and args and not args[0].startswith("-"):   # a group
                assert args[0] in cmd.commands, f"{page.name}: unknown command in `archipelago {' '.join(argv)}`"
                cmd, args = cmd.commands[args[0]], args[1:]
            assert not hasattr(cmd, "commands"), f"{page.name}: `archipelago {' '.join(argv)}` names no command"
            try:   # typer vendors its own click: match its exceptions by name
                cmd.make_context(cmd.name, [a for a in args if a != "..."], parent=ctx)
            except Exception as exc:  # noqa: BLE001
                if type(exc).__name__ != "Exit":
                    pytest.fail(f"{page.name}: `archipelago {' '.join(argv)}`: {exc}")
            seen += 1
    assert seen >= 15, seen


def test_readme_is_a_short_page_for_users():
    text = (REPO / "README.md").read_text()
    assert len(text.encode()) <= 10_000
    assert "(benchmarks/results/quickstart_grid.png)" in text and (REPO / "benchmarks/results/quickstart_grid.png").is_file()
    for doc in ("architecture", "benchmarks", "robustness", "deploy", "data"):
        assert f"(docs/{doc}.md)" in text
