"""Every (#anchor) and (file.md#anchor) link in README.md and docs/*.md names a heading that exists, by
GitHub's anchor rules: lowercase; every character that is not a letter, digit, space, '-' or '_' dropped;
spaces to '-'; a repeated heading's anchor gets -1, -2, ...; headings inside ``` fences do not count."""

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]*#[^)\s]*)\)")


def github_anchor(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()  # a link's text only
    return "".join(c for c in text if c.isalnum() or c in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, found, fenced = Counter(), set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        heading = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            anchor = github_anchor(heading.group(1))
            found.add(f"{anchor}-{seen[anchor]}" if seen[anchor] else anchor)
            seen[anchor] += 1
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        for target in LINK.findall(line):
            file, _, anchor = target.partition("#")
            if file.startswith(("http://", "https://")):
                continue
            dest = (path.parent / file) if file else path
            if not dest.exists():
                broken.append(f"{path.name}:{n}: {target}: no file {file}")
            elif dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.name}:{n}: {target}: no heading with that anchor in {dest.name}")
    return broken


def test_github_anchor_follows_githubs_rules(tmp_path):
    assert github_anchor("Against the real peers: sparsify and SAELens (issue 29, 2026-12-06)") == \
        "against-the-real-peers-sparsify-and-saelens-issue-29-2026-12-06"
    assert github_anchor("`make demo` wall time") == "make-demo-wall-time"
    page = tmp_path / "page.md"
    page.write_text("# A b\n## A b\n```\n# not a heading\n```\n[x](#a-b-1) [y](#a-b-2) [z](#not-a-heading)\n")
    assert [b.split(": ")[1] for b in broken_links(page)] == ["#a-b-2", "#not-a-heading"]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_anchor_link_names_a_heading(path):
    assert broken_links(path) == []
