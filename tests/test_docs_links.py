"""Every relative link in README.md and docs/*.md points to a file or folder of the repository (links to web pages
and to anchors of the same page are not checked; a link's own #anchor is dropped)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^\s*```")


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside fenced code blocks whose target is a path."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):    # not inside inline code either
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue                                                # http:, mailto:, same-page anchors
            out.append((i, target.split("#", 1)[0]))
    return out


def test_the_link_parser():
    text = ("[a](docs/x.md) [b](https://example.org) [c](#here) `[d](not/a/link.md)` [e](../y.md#sec)\n"
            "```\n[f](inside/a/block.md)\n```\n")
    assert relative_links(text) == [(1, "docs/x.md"), (1, "../y.md")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    links = relative_links(page.read_text())
    broken = [f"{page.relative_to(ROOT)}:{line}: {target}" for line, target in links
              if not (page.parent / target).exists()]
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_readme_points_to_every_page_of_docs():
    readme = {t for _, t in relative_links((ROOT / "README.md").read_text())}
    missing = [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md links to no docs/ page named {missing}"
