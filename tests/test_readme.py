"""The README: its long sections agree with their sources in docs/readme/, and every local
link or picture in it (and in every document under docs/, the sources included) points at a
file that exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _build_readme_module():
    spec = importlib.util.spec_from_file_location("build_readme", ROOT / "tools" / "build_readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_sections_match_their_sources() -> None:
    build_readme = _build_readme_module()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert build_readme.build(readme) == readme, "README.md is out of date: run python tools/build_readme.py"


def test_build_replaces_a_section_and_rewrites_links(tmp_path: Path) -> None:
    build_readme = _build_readme_module()
    (tmp_path / "docs" / "readme").mkdir(parents=True)
    for name in build_readme.SECTIONS:
        body = f"## {name}\n\nsee ![a](pic.png), [b](../notes.md), [c](#top) and [d](https://x.org/y)\n"
        (tmp_path / "docs" / "readme" / f"{name}.md").write_text(body, encoding="utf-8")
    readme = "# t\n\n" + "".join(f"## {name}\n\nold text\n\n" for name in build_readme.SECTIONS) + "## end\n"
    built = build_readme.build(readme, tmp_path)
    assert "old text" not in built
    assert "](docs/readme/pic.png)" in built and "](docs/notes.md)" in built
    assert "](#top)" in built and "](https://x.org/y)" in built
    assert built.endswith("## end\n")
    with pytest.raises(ValueError, match="no section"):
        build_readme.build("# nothing here\n", tmp_path)


@pytest.mark.parametrize(
    "document", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("**/*.md"))]
)
def test_local_links_resolve(document: str) -> None:
    path = ROOT / document
    text = path.read_text(encoding="utf-8")
    missing = []
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{document} links to files that do not exist: {missing}"
