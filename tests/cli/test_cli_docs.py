"""The docs say what the code does: one page per CLI command naming exactly its options,
every page in the site's nav, and the README's commands quoted verbatim in Getting started."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from qseg.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def options(parser: argparse.ArgumentParser) -> set[str]:
    """Every --option of a command and of its actions (``recipes show``)."""
    found = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    for sub in subparsers(parser).values():
        found |= options(sub)
    return found


COMMANDS = subparsers(build_parser())


def test_every_command_has_a_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for name in COMMANDS:
        assert (DOCS / "cli" / f"{name}.md").is_file(), name
        assert f"cli/{name}.md" in nav, name
    pages = {p.stem for p in (DOCS / "cli").glob("*.md")} - {"index"}
    assert pages == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_page_names_exactly_its_options(name):
    page = (DOCS / "cli" / f"{name}.md").read_text()
    documented = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", page)) - {"--help"}
    assert documented == options(COMMANDS[name]), name


def test_recipes_page_shows_every_action():
    page = (DOCS / "cli" / "recipes.md").read_text()
    for action in subparsers(COMMANDS["recipes"]):
        assert f"qseg recipes {action}" in page


def bash_blocks(markdown: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL)]


def test_getting_started_quotes_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = bash_blocks(quickstart)
    assert len(commands) == 2
    page = (DOCS / "getting-started.md").read_text()
    for command in commands:
        assert command in bash_blocks(page)


def nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [f for value in node.values() for f in nav_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in nav_files(item)]
    return []


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set(nav_files(config["nav"]))
    pages = {
        str(p.relative_to(DOCS))
        for p in DOCS.rglob("*.md")
        if not p.relative_to(DOCS).parts[0].startswith("_")
    }
    assert pages <= listed, pages - listed


def test_api_reference_covers_the_public_modules():
    import pkgutil

    import qseg

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set(nav_files(config["nav"]))
    internal = ("graph", "policy", "swap", "passes", "ops")
    modules = {
        info.name
        for info in pkgutil.iter_modules(qseg.__path__)
        if not info.name.startswith("_") and info.name not in internal
    }
    for module in modules:
        assert f"api/{module}.md" in listed, f"qseg.{module} has no API reference page"
        assert f"::: qseg.{module}" in (DOCS / "api" / f"{module}.md").read_text()
