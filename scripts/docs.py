"""Regenerate the options tables of docs/<command>.md from the commands' own parsers.

    .venv/bin/python scripts/docs.py           # rewrite every page's generated section in place
    .venv/bin/python scripts/docs.py --check   # change nothing; exit 1 naming the stale pages

Only the text between `<!-- options: ... -->` and `<!-- /options -->` is written; the prose around it is
the page's own. A command without a page gets a new one (title, its one line and the table) to write
the prose into. tests/test_docs.py runs the same comparison."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's cnnkit, installed or not

from cnnkit.cli import manual  # noqa: E402


def expected_pages(docs: Path) -> dict[Path, str]:
    """Every command's page as it should read: the page with its section regenerated, or a new page."""
    pages = {}
    for name in manual.command_names():
        path = docs / f"{name}.md"
        pages[path] = manual.updated_page(path.read_text(encoding="utf-8"), name) if path.exists() \
            else manual.new_page(name)
    return pages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is missing or stale")
    p.add_argument("--docs", type=Path, default=ROOT / "docs", help="the docs folder (default: the checkout's)")
    args = p.parse_args(argv)
    try:
        pages = expected_pages(args.docs)
    except ValueError as e:  # a page whose markers are missing or doubled
        print(f"docs: error: {e}", file=sys.stderr)
        return 1
    stale = [path for path, text in pages.items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            why = "missing" if not path.exists() else "options section differs from --help"
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            print(f"stale: {shown} ({why}; run python scripts/docs.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(pages[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
