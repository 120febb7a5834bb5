"""Rebuild README.md's long sections from their sources in docs/readme/.

Each ``docs/readme/NAME.md`` starts with the ``## `` heading of one README section; this
script replaces that section of README.md (up to the next ``## `` heading) with the file,
rewriting its relative links so they resolve from the repository root (``x.png`` ->
``docs/readme/x.png``, ``../x.md`` -> ``docs/x.md``). Edit the source, then run

    python tools/build_readme.py          # rewrite README.md
    python tools/build_readme.py --check  # exit 1 if README.md is out of date (as tests/test_readme.py checks)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rig.atomic import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "manipulators-sensapex",
    "manipulators-scientifica",
    "microscope",
    "localiser",
    "localiser-paper",
    "calibration",
    "daemon",
)
_LOCAL_LINK = re.compile(r"\]\((?!https?:|docs/|#|/|\.\./)([^)]+)\)")
_PARENT_LINK = re.compile(r"\]\(\.\./([^)]+)\)")
_SECTION_HEADING = re.compile(r"^## ", re.M)


def section_text(name: str, root: Path = ROOT) -> str:
    """The README text of section ``name``: its source with links made root-relative."""
    text = (root / "docs" / "readme" / f"{name}.md").read_text(encoding="utf-8")
    if not text.startswith("## "):
        raise ValueError(f"docs/readme/{name}.md must start with a '## ' heading")
    text = _LOCAL_LINK.sub(r"](docs/readme/\1)", text)
    return _PARENT_LINK.sub(r"](docs/\1)", text)


def build(readme: str, root: Path = ROOT) -> str:
    """``readme`` with every section of ``SECTIONS`` replaced by its source."""
    for name in SECTIONS:
        text = section_text(name, root)
        heading = text.splitlines()[0]
        start = readme.find(heading + "\n")
        if start < 0:
            raise ValueError(f"README.md has no section {heading!r} (from docs/readme/{name}.md)")
        nxt = _SECTION_HEADING.search(readme, start + len(heading))
        if nxt is None:
            readme = readme[:start] + text
        else:
            readme = readme[:start] + text.rstrip("\n") + "\n\n" + readme[nxt.start():]
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if README.md is out of date")
    args = parser.parse_args(argv)
    path = ROOT / "README.md"
    current = path.read_text(encoding="utf-8")
    wanted = build(current)
    if args.check:
        if wanted != current:
            print("README.md is out of date: run python tools/build_readme.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        write_text_atomic(path, wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
