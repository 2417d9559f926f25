"""The front page stays a front page, and every link in the docs leads somewhere."""
import re

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def text_outside_code(path):
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)


def anchors(path):
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.*)$", text_outside_code(path), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_readme_is_a_front_page():
    """README.md is read once, top to bottom: at most 150 lines and 1,600 words; the rest lives in docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines, words = len(text.splitlines()), len(text.split())  # as `wc -l -w README.md` counts them
    assert lines <= 150 and words <= 1600, (lines, words)


def test_every_relative_link_resolves():
    assert (ROOT / "docs").is_dir() and len(PAGES) >= 5
    broken = []
    for page in PAGES:
        for target in LINK.findall(text_outside_code(page)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists() or (anchor and (dest.suffix != ".md" or anchor not in anchors(dest))):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pages = [p.relative_to(ROOT).as_posix() for p in PAGES[1:]]
    assert all(f"]({p})" in readme for p in pages), pages
