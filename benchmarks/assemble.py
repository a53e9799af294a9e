"""Assemble BENCHMARKS.md from benchmarks/sections/*.md, in a fixed reading order.

Each benchmark script's author writes its section (command, machine, table, what it says); this
keeps BENCHMARKS.md one file without everyone editing it at once.

    python benchmarks/assemble.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
ORDER = ("foundation", "one_shot", "layer_pruning", "width_pruning", "recovery", "zeroshot", "shearing",
         "sparse_kernels", "scale", "combinations")
HEADER = """# Benchmarks

Every number here was printed by a committed script in `benchmarks/` (its JSON is in
`benchmarks/results/`), on the machine named in its section. Quality numbers come from the real
SmolLM2-135M (Q4_1 GGUF dequantized to float32); tiny random models are never used for quality.
Sections are assembled by `python benchmarks/assemble.py` from `benchmarks/sections/`.
"""


def main() -> None:
    sections = {p.stem: p for p in (HERE / "sections").glob("*.md")}
    ordered = [sections.pop(name) for name in ORDER if name in sections] + sorted(sections.values())
    parts = [HEADER] + [p.read_text().strip() + "\n" for p in ordered]
    (HERE.parent / "BENCHMARKS.md").write_text("\n".join(parts))
    print(f"BENCHMARKS.md: {len(ordered)} sections")


if __name__ == "__main__":
    main()
