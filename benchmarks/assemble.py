"""Assemble BENCHMARKS.md from benchmarks/sections/*.md, in a fixed reading order, opening with a
generated one-screen summary and a table of contents; superseded runs go to docs/BENCHMARKS-archive.md
from benchmarks/archive/*.md the same way.

Each benchmark script's author writes its section (command, machine, table, what it says); this
keeps BENCHMARKS.md one file without everyone editing it at once. A section states its headline
results in summary lines, which are HTML comments (invisible in the section itself)::

    <!-- summary: capability | best result | against the reference | goal met or missed -->

and the summary table at the top of BENCHMARKS.md is built from them, each row linking to its section.

    python benchmarks/assemble.py
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ("foundation", "one_shot", "sparse_kernels", "layer_pruning", "width_pruning", "recovery", "distillation",
         "zeroshot", "shearing", "scale", "combinations", "moe")
HEADER = """# Benchmarks

Every number here was printed by a committed script in `benchmarks/` (its JSON is in
`benchmarks/results/`), on the machine named in its section. Quality numbers come from the real
SmolLM2-135M (Q4_1 GGUF dequantized to float32); tiny random models are never used for quality.
Sections are assembled by `python benchmarks/assemble.py` from `benchmarks/sections/`; runs that
later runs replaced are kept in [docs/BENCHMARKS-archive.md](docs/BENCHMARKS-archive.md).
"""
ARCHIVE_HEADER = """# Benchmarks: superseded runs

Runs that a later run in [BENCHMARKS.md](../BENCHMARKS.md) replaced (an older version of a method or
script, or a setting no longer recommended), kept so earlier closing notes can be checked. Assembled
by `python benchmarks/assemble.py` from `benchmarks/archive/`.
"""
SUMMARY = re.compile(r"<!--\s*summary:(.*?)-->", re.DOTALL)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def heading_of(text: str) -> str | None:
    match = re.search(r"^## (.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else None


def summary_rows(text: str, link: str) -> list[str]:
    rows = []
    for found in SUMMARY.findall(text):
        cells = [c.strip() for c in " ".join(found.split()).split("|")]
        if len(cells) != 4:
            raise SystemExit(f"a summary line needs 4 cells (capability | best | reference | goal), got: {found!r}")
        rows.append(f"| [{cells[0]}]({link}) | {cells[1]} | {cells[2]} | {cells[3]} |")
    return rows


def ordered_sections(folder: Path, order: tuple[str, ...]) -> list[Path]:
    sections = {p.stem: p for p in folder.glob("*.md")}
    return [sections.pop(name) for name in order if name in sections] + sorted(sections.values())


def build(header: str, sections: list[Path], with_summary: bool) -> str:
    texts = [p.read_text().strip() + "\n" for p in sections]
    toc, rows = [], []
    for text in texts:
        heading = heading_of(text)
        if heading is None:
            continue
        toc.append(f"- [{heading}](#{slug(heading)})")
        rows += summary_rows(text, f"#{slug(heading)}")
    parts = [header]
    if with_summary and rows:
        parts.append("## Summary\n\n| capability | best result | against the reference | goal |\n|---|---|---|---|\n"
                     + "\n".join(rows) + "\n")
    parts.append("## Contents\n\n" + "\n".join(toc) + "\n")
    return "\n".join(parts + texts)


def main() -> None:
    sections = ordered_sections(HERE / "sections", ORDER)
    (HERE.parent / "BENCHMARKS.md").write_text(build(HEADER, sections, with_summary=True))
    archived = ordered_sections(HERE / "archive", ORDER) if (HERE / "archive").is_dir() else []
    if archived:
        (HERE.parent / "docs" / "BENCHMARKS-archive.md").write_text(build(ARCHIVE_HEADER, archived, with_summary=False))
    print(f"BENCHMARKS.md: {len(sections)} sections; archive: {len(archived)}")


if __name__ == "__main__":
    main()
