"""Instructions per stored value in the main loop of the N:M GEMVs (SASS), without a GPU.

A decode GEMV keeps up with memory only while an SM can issue its instructions as fast as the bytes arrive
(an H100 issues about 26 warp-lane instructions per stored 4:8 value at 3 TB/s), so the count per stored value
of the unrolled main loop is the number to compare between layouts. This compiles a kernel source with nvcc
(``-cubin``), disassembles it with ``cuobjdump -sass`` (the CUDA toolkit's, or the copy Triton ships) and, for
every GEMV entry point, counts the instructions of its longest loop (the span of its longest backward branch: the
U-times unrolled main loop of ``gemv_nm`` in ``common.cuh``) and divides by the values that loop consumes per lane
(U steps x R rows x 8 stored values per 16-input step).

    python benchmarks/sass_count.py                       # 4:8 and 8:16, sm_90
    python benchmarks/sass_count.py --arch sm_80 --formats 8:16
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CUDA = Path(__file__).resolve().parents[1] / "src" / "secateurs" / "kernels" / "cuda"
# format -> (source, the instantiation macro: name prefix, its (tokens, rows, unroll) arguments)
SOURCES = {"4:8": (CUDA / "sparse48.cu", "GEMV48", "gemv48"), "8:16": (CUDA / "sparse816.cu", "GEMV816", "gemv816")}
VALUES_PER_STEP = 8


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise SystemExit("no cuobjdump: install the CUDA toolkit (or Triton, which ships one)")


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> its (address, instruction) list."""
    found: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in sass.splitlines():
        head = re.search(r"Function : (\S+)", line)
        if head:
            current = found.setdefault(head.group(1), [])
            continue
        instruction = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if instruction and current is not None:
            current.append((int(instruction.group(1), 16), instruction.group(2).strip()))
    return found


def main_loop(body: list[tuple[int, str]]) -> int:
    """Instructions of the longest loop: from a backward branch's target to the branch, inclusive."""
    longest = 0
    for address, text in body:
        branch = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            longest = max(longest, sum(1 for a, _ in body if int(branch.group(1), 16) <= a <= address))
    return longest


def mma_loop(body: list[tuple[int, str]]) -> list[str]:
    """The instructions of a kernel's main loop: the longest loop (a backward branch's target to the branch) that
    holds an HMMA."""
    loop: list[str] = []
    for address, text in body:
        branch = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            span = [t for a, t in body if int(branch.group(1), 16) <= a <= address]
            if any("HMMA" in t for t in span) and len(span) > len(loop):
                loop = span
    return loop


def load_uses(loop: list[str], load: str) -> list[tuple[int, int | None]]:
    """For each load of ``loop`` matching ``load`` (a pattern whose group 1 is the width suffix, 128 or 64 or none,
    and group 2 the first destination register's number): (HMMAs, instructions) issued between it and the first
    instruction reading its registers, around the back edge; instructions None where nothing reads them within one
    trip (the HMMAs are then the whole trip's). How far ahead a kernel issues its loads is what the decode kernels'
    SASS tests check."""
    uses: list[tuple[int, int | None]] = []
    for i, text in enumerate(loop):
        found = re.search(load, text)
        if not found:
            continue
        registers = {f"R{int(found.group(2)) + j}" for j in range({"128": 4, "64": 2}.get(found.group(1), 1))}
        mmas, steps = 0, None
        for step in range(1, len(loop)):
            later = loop[(i + step) % len(loop)]
            if registers & {o.split(".")[0] for o in re.split(r"[ ,\[\]]+", later)[2:]}:
                steps = step - 1
                break
            mmas += "HMMA" in later
        uses.append((mmas, steps))
    return uses


def count(kind: str, arch: str) -> list[dict]:
    source, macro, prefix = SOURCES[kind]
    made = {(int(t), int(r)): int(u) for t, r, u in re.findall(rf"{macro}\(DT, BF, (\d+), (\d+), (\d+)\)", source.read_text())}
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "k.cubin"
        subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-o", str(cubin), str(source)], check=True)
        sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    rows = []
    for name, body in sorted(functions(sass).items()):
        match = re.fullmatch(rf"{prefix}_(f16|bf16)_t(\d+)_r(\d+)", name)
        if not match:
            continue
        tokens, per_warp = int(match.group(2)), int(match.group(3))
        unroll = made[tokens, per_warp]
        loop = main_loop(body)
        rows.append({"format": kind, "kernel": name, "loop": loop, "values": unroll * per_warp * VALUES_PER_STEP,
                     "per_value": loop / (unroll * per_warp * VALUES_PER_STEP)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--formats", default="4:8,8:16", help="comma-separated: " + ", ".join(SOURCES))
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.formats.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in SOURCES]
    if unknown or not kinds:
        raise SystemExit(f"error: --formats {args.formats!r}: use a comma-separated list of {', '.join(SOURCES)}")
    if shutil.which("nvcc") is None:
        raise SystemExit("error: no nvcc on PATH: install the CUDA toolkit (no GPU needed)")
    print(f"| kernel ({args.arch}) | main-loop instructions | stored values per lane | per stored value |")
    print("|---|---|---|---|")
    for kind in kinds:
        for row in count(kind, args.arch):
            print(f"| {row['kernel']} | {row['loop']} | {row['values']} | {row['per_value']:.1f} |")


if __name__ == "__main__":
    main()
