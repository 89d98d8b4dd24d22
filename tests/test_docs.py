"""The README and docs/ pages: every relative link resolves, every page is reachable."""
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
INLINE_CODE = re.compile(r"`+[^`\n]*`+")
# [text](target) and ![alt](target); the target may carry a "title" after a space.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'][^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_TARGET = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(text):
    """The Markdown without code: links in code blocks or spans are examples, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def link_targets(text):
    text = prose(text)
    found = INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text) + HTML_TARGET.findall(text)
    return [t for t in found if t and not EXTERNAL.match(t)]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path):
    seen, result = {}, set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    return result


def broken_links(page):
    problems = []
    for target in link_targets(page.read_text()):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{page.relative_to(REPO)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    return problems


def linked_pages(page):
    result = set()
    for target in link_targets(page.read_text()):
        path_part = target.partition("#")[0]
        if path_part:
            result.add((page.parent / unquote(path_part)).resolve())
    return result


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_front_page_or_the_index():
    linked = linked_pages(REPO / "README.md") | linked_pages(REPO / "docs" / "README.md")
    docs = [p for p in sorted((REPO / "docs").glob("*.md"))
            if p.name != "README.md" and not p.name.startswith("notes-")]  # notes-*: helpers' drafts
    assert docs, "docs/ has no pages"
    assert [str(p.relative_to(REPO)) for p in docs if p.resolve() not in linked] == []
    assert (REPO / "docs" / "README.md").resolve() in linked_pages(REPO / "README.md")


def test_front_page_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_checker_finds_broken_links_and_anchors_and_ignores_code(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "img.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# The `folder` dataset: bring your own\n## Twice\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top (CPU, 2 threads)\n"
        "[ok](other.md#the-folder-dataset-bring-your-own) [ok2](other.md#twice-1) ![i](img.png)\n"
        "[self](#top-cpu-2-threads) [web](https://example.org/x) [ref]: other.md\n"
        "`[code](missing-in-span.md)`\n```\n[code](missing-in-block.md)\n```\n"
        "[bad](missing.md) ![bad img](missing.png \"title\") [bad anchor](other.md#nope)\n"
        '[bad ref]: gone.md\n<img src="gone.png">\n')
    assert broken_links(page) == [
        "page.md: missing.md (no such file)", "page.md: missing.png (no such file)",
        "page.md: other.md#nope (no such heading)", "page.md: gone.md (no such file)",
        "page.md: gone.png (no such file)"]
