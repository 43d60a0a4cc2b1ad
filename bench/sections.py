"""BENCHMARKS.md sections: put one `## ` section in place, leaving every other section as it is."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str, first: bool = False) -> None:
    """Put `text` (a section: its `## ` heading line, then its body) into the markdown file `path`.

    A section with the same heading is replaced where it stands; a new one goes at the end, or with
    `first` right after the title. A missing file starts as "# Benchmarks"."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = old.split("\n## ")
    head, sections = parts[0].rstrip("\n"), ["## " + p.strip("\n") for p in parts[1:]]
    headings = [s.split("\n", 1)[0].strip() for s in sections]
    body = text.strip("\n")
    heading = body.split("\n", 1)[0].strip()
    if heading in headings:
        sections[headings.index(heading)] = body
    else:
        sections.insert(0 if first else len(sections), body)
    path.write_text("\n\n".join([head, *sections]) + "\n")
