"""The docs site builds strictly, and README.md stays a short front door into it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# The two set-up commands for a fresh machine, word for word (.ci/run runs the second).
RUN_COMMAND = 'pip install . && llm -m openweight "What is the capital of France?"'
TEST_COMMAND = 'python -m pip install -e ".[dev]" && python -m pytest'

FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})[^\n]*\n(.*?)^\1\2[ \t]*$", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def build_site(site_dir: Path, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def code_blocks(text: str) -> list[str]:
    return [m.group(3) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text with its fenced code blocks blanked out (links in code are not links)."""
    return FENCE.sub("", text)


def heading_anchors(path: Path) -> set[str]:
    """The ids the site gives a page's headings (the same slugs as mkdocs.yml's toc)."""
    import markdown
    from pymdownx.slugs import slugify

    md = markdown.Markdown(
        extensions=["toc", "tables", "pymdownx.superfences"],
        extension_configs={"toc": {"slugify": slugify(case="lower")}},
    )
    html = md.convert(path.read_text(encoding="utf-8"))
    return set(re.findall(r'<h[1-6][^>]* id="([^"]+)"', html))


def nav_pages() -> list[str]:
    """Every page named in mkdocs.yml's nav (python tags such as the slugify are skipped)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *_: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)
    pages: list[str] = []

    def walk(item: object) -> None:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, list):
            for x in item:
                walk(x)
        elif isinstance(item, dict):
            for x in item.values():
                walk(x)

    walk(config["nav"])
    return pages


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    proc = build_site(tmp_path / "site")
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}"
    for page in ("index", "troubleshooting", "performance"):
        built = tmp_path / "site" / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.is_file(), built


def copy_of_the_docs(tmp_path: Path) -> Path:
    """mkdocs.yml and docs/ copied, so that a test can break them without touching the repo."""
    root = tmp_path / "repo"
    shutil.copytree(DOCS, root / "docs")
    shutil.copy2(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    return root


def test_the_copy_builds(tmp_path: Path) -> None:
    """The breakage tests below start from a copy that builds."""
    assert build_site(tmp_path / "site", copy_of_the_docs(tmp_path)).returncode == 0


@pytest.mark.parametrize(("page", "text", "named"), [
    ("troubleshooting.md", "\nSee [nowhere](no-such-page.md).\n", "no-such-page.md"),
    ("troubleshooting.md", "\nSee [the options](plugin.md#no-such-heading).\n",
     "no-such-heading"),
    ("stray.md", "# Stray\n\nIn no nav.\n", "stray.md"),
], ids=["broken-link", "broken-anchor", "page-left-out-of-the-nav"])
def test_strict_build_fails_on(tmp_path: Path, page: str, text: str, named: str) -> None:
    """The guard guards: a link to a missing page or heading, or a page in no nav, fails
    the build and the error names it."""
    root = copy_of_the_docs(tmp_path)
    with (root / "docs" / page).open("a", encoding="utf-8") as f:
        f.write(text)
    proc = build_site(tmp_path / "site", root)
    assert proc.returncode != 0
    assert named in proc.stderr


def test_every_docs_page_is_in_the_nav() -> None:
    nav = nav_pages()
    assert len(nav) == len(set(nav)), f"a page is in the nav twice: {nav}"
    for page in nav:
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav names {page}, not in docs/"
    pages = {
        p.relative_to(DOCS).as_posix()
        for p in DOCS.rglob("*.md")
        if p.relative_to(DOCS).parts[0] != "bench"
    }
    assert pages, "no pages under docs/"
    assert pages <= set(nav), f"pages missing from mkdocs.yml's nav: {sorted(pages - set(nav))}"


def test_readme_is_a_short_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; move the detail into docs/"


@pytest.mark.parametrize("source", ["README.md", "docs/index.md"])
def test_relative_links_point_at_files_that_exist(source: str) -> None:
    path = ROOT / source
    links = LINK.findall(prose(path.read_text(encoding="utf-8")))
    relative = [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]
    assert relative, f"{source} links to no page"
    broken = []
    for link in relative:
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{link}: no heading with that anchor")
    assert not broken, f"broken links in {source}: {broken}"


def test_readme_links_into_every_docs_page() -> None:
    """README's table of contents reaches every page of the manual."""
    links = {link.partition("#")[0] for link in LINK.findall(README.read_text(encoding="utf-8"))}
    pages = {p for p in nav_pages() if not p.startswith("bench/") and p != "index.md"}
    missing = sorted(p for p in pages if f"docs/{p}" not in links)
    assert not missing, f"README.md does not link to {missing}"


def test_readme_has_exactly_the_two_setup_commands() -> None:
    blocks = [b for b in code_blocks(README.read_text(encoding="utf-8")) if "pip install" in b]
    assert len(blocks) == 2, f"README.md has {len(blocks)} code blocks with pip install:\n{blocks}"
    run = [b for b in blocks if "llm -m openweight" in b]
    test = [b for b in blocks if "python -m pytest" in b]
    assert len(run) == 1 and len(test) == 1, blocks
    assert run[0].strip() == RUN_COMMAND
    assert test[0].strip() == TEST_COMMAND
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in ci, "CI must run README's test command exactly"
