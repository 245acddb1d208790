"""Shared by the benchmarks: replace (or append) one marked section of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nMeasured comparisons; each section says how to reproduce it.\n"


def markers(name: str) -> tuple[str, str]:
    """The HTML comments that delimit section ``name``."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(section: str, name: str, docs: Path = DOCS) -> None:
    """Put ``section`` (which includes its own markers) in place of the old one, or append it."""
    begin, end = markers(name)
    text = docs.read_text(encoding="utf-8") if docs.exists() else HEADER
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    docs.write_text(text, encoding="utf-8")
