"""The safetensors files of a Hugging Face folder, read and written without a library's copy.

- :func:`read_header`: a file's tensor table and where its data starts, after checking it as the
  safetensors library does (a truncated or corrupt file is a one-line error naming the file and fix);
- :class:`ShardReader`: tensor names → shard files of a folder (single file or index; no shard
  outside the folder), checked before any work, and reads of any subset of tensors;
- :func:`read_tensors`: positional reads straight into new tensors (optionally page-locked, so they
  reach a GPU by DMA), never a memory map, whose touched pages would count as resident;
- :func:`write_tensors`: a file written one tensor at a time from producers, so at most one is held.

Used by streaming (engine/stream.py) and by anything that reads headers only (report.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UsageError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_META = {"format": "pt"}


class ShardReader:
    """Tensor names → shard files of an HF folder, checked before any work starts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if (folder / INDEX).is_file():
            weight_map = _weight_map(folder / INDEX)
        elif (folder / SINGLE).is_file():
            weight_map = {}
        else:
            raise UsageError(f"{folder} has no {SINGLE} or {INDEX}: streaming reads safetensors; convert the model or drop --stream")
        files = sorted(set(weight_map.values())) or [SINGLE]
        self.keys: dict[str, str] = {}
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            header, _ = read_header(inside(folder, name), folder)
            for key, info in header.items():
                self.keys[key] = name
                self.shapes[key] = info["shape"]
                self.dtypes[key] = info["dtype"]
        missing = [k for k, f in weight_map.items() if self.keys.get(k) != f]
        if missing:
            raise UsageError(
                f"{INDEX} lists {len(missing)} tensors its shards do not hold (e.g. {missing[0]}); re-download the model"
            )
        self.files = files

    @classmethod
    def of(cls, folder: Path) -> ShardReader | None:
        """The reader of ``folder``'s safetensors, checked; None where it keeps its weights otherwise."""
        return cls(folder) if (folder / INDEX).is_file() or (folder / SINGLE).is_file() else None

    def read(self, keys: list[str], pin: bool = False) -> dict[str, torch.Tensor]:
        """``keys`` read from their shards into fresh tensors (page-locked with ``pin``)."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.keys[key], []).append(key)
        out = {}
        for name, names in by_file.items():
            out.update(read_tensors(self.folder / name, names, pin))
        return out

    def fingerprint(self) -> list:
        return [[name, (self.folder / name).stat().st_size, (self.folder / name).stat().st_mtime_ns] for name in self.files]


def _weight_map(path: Path) -> dict[str, str]:
    """An index's ``weight_map``: tensor name → shard file name, both strings."""
    try:
        weight_map = json.loads(path.read_text(), parse_constant=_no_constant)["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a valid safetensors index ({exc}); re-download the model") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UsageError(f"{path} is not a valid safetensors index (its weight_map is not a map of tensor names to files); re-download the model")
    return weight_map


def inside(folder: Path, name: str) -> Path:
    """``folder / name`` for a shard an index names, refused where it leaves the folder: an absolute
    name, a ``..`` step, or a symlink out. The one symlink out allowed is the Hugging Face cache's:
    ``snapshots/<revision>/<file>`` pointing into the same repository's ``blobs/``."""
    parts = name.replace("\\", "/").split("/")
    path = folder / name
    if name and not Path(name).is_absolute() and ".." not in parts:
        root, target = folder.resolve(), path.resolve()
        if target.is_relative_to(root) or _hub_blob(root, target):
            return path
    raise UsageError(
        f"shard {name!r} of {folder} lies outside it (an absolute path, '..' or a symlink out); "
        "a model's shards must sit in its folder"
    )


def _hub_blob(root: Path, target: Path) -> bool:
    return root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs"


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
# Bits per element of every dtype the safetensors library knows (its ``Dtype::bitsize``); a file
# naming another is refused as safetensors refuses it, though streaming reads only ``DTYPES``.
BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# The largest header safetensors reads (its MAX_HEADER_SIZE): a larger length field is corruption,
# and is never used to size a read.
MAX_HEADER = 100_000_000


def _bytes_of(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def read_tensors(path: Path, keys: list[str], pin: bool = False) -> dict[str, torch.Tensor]:
    """Read ``keys`` of one safetensors file with positional reads into new tensors, page-locked
    with ``pin`` so that they reach a GPU by DMA, without a staging copy."""
    header, start = read_header(path, path.parent)
    out = {}
    try:
        with path.open("rb", buffering=0) as f:
            for key in keys:
                out[key] = _read_one(f, path, key, header[key], start, pin)
    except OSError as exc:  # a disk or network share that failed, a file that vanished mid-run
        raise UsageError(
            f"shard {path.name} could not be read ({exc.strerror or exc}); check the disk or re-copy the model, "
            "then rerun the same command (a streamed run resumes after its last finished block)"
        ) from None
    return out


def _read_one(f, path: Path, key: str, info: dict, start: int, pin: bool) -> torch.Tensor:
    if info["dtype"] not in DTYPES:
        raise UsageError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which streaming cannot read")
    tensor = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]], pin_memory=pin)
    begin, end = info["data_offsets"]
    view, done = memoryview(_bytes_of(tensor)) if tensor.numel() else memoryview(b""), 0
    if view.nbytes != end - begin:
        raise UsageError(f"shard {path.name}: tensor {key} has {end - begin} bytes for shape {info['shape']}; the file is corrupt")
    f.seek(start + begin)
    while done < end - begin:  # one read returns at most ~2 GiB on Linux: loop
        got = f.readinto(view[done:])
        if not got:
            raise UsageError(f"shard {path.name} is truncated; re-download or re-copy the model")
        done += got
    return tensor


def write_tensors(path: Path, entries: list[tuple[str, torch.dtype, list[int], Callable[[], torch.Tensor]]]) -> None:
    """Write a safetensors file one tensor at a time: ``entries`` are (name, dtype, shape, producer),
    and each producer is called only when its bytes are due, so at most one tensor is held."""
    table, offset = {"__metadata__": _META}, 0
    for key, dtype, shape, _ in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        table[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(table, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key, dtype, shape, produce in entries:
            tensor = produce().detach().to("cpu", dtype).contiguous()
            if list(tensor.shape) != list(shape):
                raise RuntimeError(f"{key}: shape {list(tensor.shape)} differs from the header's {list(shape)}")
            if tensor.numel():
                f.write(_bytes_of(tensor))


def read_header(path: Path, folder: Path) -> tuple[dict[str, dict], int]:
    """The tensor table of one safetensors file and where its data starts, after checking it as the
    ``safetensors`` library does, so that a file it would refuse is refused here too, on one line
    naming the file, before any number read from it sizes an allocation or a read."""
    if not path.is_file():
        raise UsageError(f"shard {path.name} is missing from {folder}; re-download or re-copy the model")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"shard {path.name} is truncated ({size} bytes); re-download or re-copy the model")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER:
            raise _corrupt(path, f"its header length field says {n} bytes, over safetensors' limit of {MAX_HEADER}")
        if 8 + n > size:
            raise UsageError(
                f"shard {path.name} is truncated or corrupt (a {n}-byte header in a {size}-byte file); "
                "re-download or re-copy the model"
            )
        raw = f.read(n)
    header = _parse(path, raw)
    end = _check_table(path, header)
    if size < 8 + n + end:
        raise UsageError(f"shard {path.name} is truncated ({size} of {8 + n + end} bytes); re-download or re-copy the model")
    if size > 8 + n + end:
        raise _corrupt(path, f"{size - 8 - n - end} bytes follow its last tensor")
    return header, 8 + n


def _corrupt(path: Path, reason: str) -> UsageError:
    return UsageError(f"shard {path} is not a valid safetensors file ({reason}); re-download or re-copy the model")


def _parse(path: Path, raw: bytes) -> dict[str, dict]:
    """The header's JSON object, its ``__metadata__`` (a str → str map, or null) checked and removed."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"shard {path.name} is truncated or corrupt (unreadable header); re-download or re-copy the model") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _corrupt(path, "its __metadata__ is not a map of strings to strings")
    return header


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _is_size(value: object) -> bool:
    """A JSON number safetensors reads as a ``usize``: a non-negative integer below 2**64 (not a bool)."""
    return type(value) is int and 0 <= value < 2**64


def _check_table(path: Path, header: dict) -> int:
    """Check every entry (known dtype, non-negative integer shape and offsets) and that the tensors,
    in offset order, tile the data from byte 0 with no gap or overlap, each exactly shape × dtype
    long; returns where the data ends."""
    for key, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _corrupt(path, f"entry {key!r} is not a tensor with dtype, shape and data_offsets")
        if not isinstance(info["dtype"], str) or info["dtype"] not in BITS:
            raise _corrupt(path, f"tensor {key} has unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise _corrupt(path, f"tensor {key} has shape {shape!r}, not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
            raise _corrupt(path, f"tensor {key} has data_offsets {offsets!r}, not two non-negative integers")
    end = 0
    for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = info["data_offsets"]
        if begin != end or stop < begin:
            raise _corrupt(path, f"tensor {key} at bytes {begin}-{stop} overlaps another or leaves a gap before it")
        bits = _bits(info["shape"], BITS[info["dtype"]])
        if bits is None or bits % 8 or stop - begin != bits // 8:
            raise _corrupt(path, f"tensor {key} spans {stop - begin} bytes, not what shape {info['shape']} of {info['dtype']} needs")
        end = stop
    return end


def _bits(shape: list[int], element: int) -> int | None:
    """Bits of a tensor, or None where safetensors' 64-bit product would overflow (checked at each
    step, as it does, so a later zero does not hide an overflow)."""
    total = 1
    for factor in (*shape, element):
        total *= factor
        if total >= 2**64:
            return None
    return total
