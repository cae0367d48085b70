"""The README, the pages under docs/ and research/README.md: every relative link resolves to a file in the
repository (and a `#anchor` to a heading of the linked page), and the README stays a page a user reads
(<= 400 lines)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "research" / "README.md",
         ROOT / "recipes" / "README.md"]
README_MAX_LINES = 400

_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str, code_spans: bool = False) -> str:
    """The text outside fenced code blocks, and outside inline code spans unless code_spans."""
    out, fenced = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line if code_spans else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    s = re.sub(r"[^\w\- ]", "", s.replace("`", ""))
    return s.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(page.read_text(), code_spans=True).split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = _slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        anchors.add(s if n == 0 else f"{s}-{n}")
    return anchors


def _links(page: Path) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(_prose(page.read_text()))]


def test_pages_found():
    assert all(p.is_file() for p in PAGES), [str(p) for p in PAGES if not p.is_file()]
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "research/README.md"} <= names and len(PAGES) >= 3, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_tracker_issue_numbers_or_missing_files_cited(page):
    """Issue numbers of a tracker outside the repository, and files that are not in it, mean nothing to a
    reader of the repository."""
    text = page.read_text()
    assert not re.search(r"\bissues? \d+", text, re.I), re.search(r".{0,40}\bissues? \d+.{0,40}", text, re.I).group(0)
    assert "RESEARCH.md" not in text


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; keep it <= {README_MAX_LINES} and move detail to docs/"


def test_readme_keeps_the_two_commands():
    """.ci/run runs ./setup.sh and ./test.sh; the README names them as the way to build and test."""
    text = (ROOT / "README.md").read_text()
    assert "./setup.sh" in text and "./test.sh" in text
    assert '-m "not slow"' in text, "the README documents the fast loop beside the full suite"


def test_slow_list_names_tests_that_exist():
    """The README's fast loop (`-m "not slow"`) leaves out conftest.SLOW_TESTS: a renamed or removed test
    left in that list would silently stop being marked, so every name must still be a test file or a test."""
    from conftest import SLOW_TESTS

    stale = []
    for prefixes in SLOW_TESTS.values():
        for p in prefixes:
            file, _, name = p.partition("::")
            path = ROOT / file
            if not path.exists() or (name and not re.search(rf"^(async )?def {re.escape(name)}\(", path.read_text(), re.M)):
                stale.append(p)
    assert not stale, f"tests/conftest.py SLOW_TESTS names tests that do not exist: {stale}"
