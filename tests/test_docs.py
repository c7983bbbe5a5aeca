"""The README and docs/ hold up: links resolve, commands name files that exist, named tests exist.

Why: the README is a newcomer's first five minutes and docs/ the rest; a link to a moved page, a command
naming a renamed config, or a property whose test was deleted turns them back into a stale notebook.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
REPO_PATH = re.compile(r"(?<![\w./$-])((?:jobs|configs|cluster|scripts|bench|docs|tests|cwm_ray)/[\w./*-]*[\w*])")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_readme_opens_with_the_two_commands_and_stays_short() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first = FENCE.search(text)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert text.index("```") < text.index("\n## ")  # before any section


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{page.name}: link to {target}: no such heading in {dest.name}"


def _readme_commands() -> list[str]:
    blocks = FENCE.findall(README.read_text())
    return [line for block in blocks for line in block.splitlines() if line.strip() and "──" not in line
            and "│" not in line and "▼" not in line]


def test_every_file_a_readme_command_names_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    named = 0
    for line in _readme_commands():
        for path in REPO_PATH.findall(line.split(" #")[0]):
            matches = list(REPO.glob(path)) if "*" in path else [REPO / path] if (REPO / path).exists() else []
            assert matches, f"README command names {path}, which does not exist: {line}"
            named += 1
        for target in re.findall(r"\bmake ([\w-]+)", line):
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}: {line}"
        for module, attr in re.findall(r"\b(cwm_ray(?:\.\w+)+):(\w+)", line):
            spec = importlib.util.find_spec(module)
            assert spec is not None and spec.origin, module
            tree = ast.parse(Path(spec.origin).read_text())
            assert any(getattr(n, "name", None) == attr for n in tree.body), f"{module}:{attr}"
    assert named >= 8  # the check looked at the commands, not at nothing


def test_every_test_named_in_the_docs_exists() -> None:
    """A property's test named in docs/ (as `tests/test_x.py::test_y`, or `test_y` after it in the same row)."""
    defined = {n.name for f in (REPO / "tests").glob("test_*.py") for n in ast.walk(ast.parse(f.read_text()))
               if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    files = {f.name for f in (REPO / "tests").glob("test_*.py")}
    for page in PAGES:
        text = page.read_text()
        for name in re.findall(r"`(?:tests/)?(test_\w+\.py)(?:::\w+)?`", text):
            assert name in files, f"{page.name} names {name}"
        for name in re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", text):
            assert name in defined, f"{page.name} names the test {name}, which does not exist"
