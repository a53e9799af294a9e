"""The safetensors files of a Hugging Face folder, read and written without a library's copy.

- :func:`read_header`: a file's tensor table and where its data starts, after checking the file is
  whole (a truncated or corrupt file is a one-line error naming the fix);
- :class:`ShardReader`: tensor names → shard files of a folder (single file or index), checked
  before any work, and reads of any subset of tensors;
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
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UsageError(f"{folder / INDEX} is not a valid safetensors index ({exc}); re-download the model") from None
        elif (folder / SINGLE).is_file():
            weight_map = {}
        else:
            raise UsageError(f"{folder} has no {SINGLE} or {INDEX}: streaming reads safetensors; convert the model or drop --stream")
        files = sorted(set(weight_map.values())) or [SINGLE]
        self.keys: dict[str, str] = {}
        self.shapes: dict[str, list[int]] = {}
        self.dtypes: dict[str, str] = {}
        for name in files:
            header, _ = read_header(folder / name, folder)
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


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


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
    """The tensor table of one safetensors file and where its data starts, after checking the file
    holds all the bytes the table names."""
    if not path.is_file():
        raise UsageError(f"shard {path.name} is missing from {folder}; re-download or re-copy the model")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"shard {path.name} is truncated ({size} bytes); re-download or re-copy the model")
        n = struct.unpack("<Q", head)[0]
        raw = f.read(n) if n <= size else b""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"shard {path.name} is truncated or corrupt (unreadable header); re-download or re-copy the model") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if size < 8 + n + end:
        raise UsageError(
            f"shard {path.name} is truncated ({size} of {8 + n + end} bytes); re-download or re-copy the model"
        )
    return header, 8 + n
