"""The ``compressed-tensors`` sparse checkpoint layout: what llm-compressor writes and vLLM and
``transformers`` 4.x (with compressed-tensors ≤ 0.14) read. ``--export sparse`` writes it, and
``load_model`` puts such a checkpoint, ours or llm-compressor's, straight onto the sparse kernels.

Per compressed linear ``<name>`` the checkpoint holds, instead of ``<name>.weight`` (stored orientation):

- ``sparse-24-bitmask`` (2:4): ``<name>.compressed`` (out, in/2), the two kept values of every group of
  4 in row-major order (a kept value may be zero); ``<name>.bitmask`` (out, ceil(in/8)) uint8 with
  exactly two bits set per group; ``<name>.shape`` int64 (2, 1) = [out, in];
- ``sparse-bitmask`` (unstructured): ``<name>.compressed`` (nnz,), the non-zeros in row-major order;
  ``<name>.bitmask`` of the non-zeros; ``<name>.row_offsets`` int64 (out,), where each row starts in
  ``compressed``; ``<name>.shape`` int64 (2,).

A bitmask is numpy's ``packbits(mask, axis=-1, bitorder="little")``: bit j of byte k is column 8k + j.
``config.json`` says which format under ``quantization_config`` (``compression_config`` in older
writers): ``{"quant_method": "compressed-tensors", "version", "sparsity_config": {"format", "targets",
"ignore", "global_sparsity", "sparsity_structure", "registry_requires_subclass"}, "transform_config"}``.

Both directions are done here, without the package: the layout is a bitmask and a gather, and the
package cannot serve at run time anyway. compressed-tensors removed these sparse compressors after
0.14 (0.15 and later neither read nor write them, and transformers 5 loads only through those), while
0.14 requires transformers < 5. The tests check the layout against the package's own bit packing and
config classes; the 0.14 compressor itself was checked by hand (see ``tests/test_compressed_tensors.py``).

In memory a 2:4 bitmask becomes the kernel format whose ``checkpoint_storage`` it is (:class:`Sparse24`)
with its values as stored (only the 2-bit positions are derived); a bitmask becomes whatever
:func:`choose_format` picks for it; a layer no kernel format holds (too dense, or a width the kernels do
not take) becomes a dense weight again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import UsageError
from ..model.arch import ArchSpec, spec_for
from ..model.experts import DOWN, GATE_UP
from ..model.formats import FolderFormat, register_folder_format
from ..model.linear import is_transposed
from ..model.stored import StoredLayout
from ..record import ExportStage
from .experts import SparseExperts, unsupported
from .formats import SparseFormat, pack_bits, unpack_bits
from .linear import SparseLinear
from .registry import choose_format, format_classes
from .swap import DEFAULT_MIN_SPARSITY, set_module, sparsify

FORMAT_24 = "sparse-24-bitmask"
FORMAT_BITMASK = "sparse-bitmask"
PARTS = {FORMAT_24: ("compressed", "bitmask", "shape"), FORMAT_BITMASK: ("compressed", "bitmask", "row_offsets", "shape")}
QUANT_METHOD = "compressed-tensors"
CONFIG_KEYS = ("quantization_config", "compression_config")
# The compressed-tensors release whose layout is written (the last one with these compressors), and
# the newest whose sparse layout is known: a later version may mean a layout this code has not seen.
WRITTEN_VERSION = "0.14.0"
NEWEST_KNOWN = (0, 14)
LAYOUT = "compressed-tensors"


def sparsity_entry(folder: Path) -> tuple[str, dict] | None:
    """(config key, its value) when ``folder/config.json`` declares a compressed-tensors sparse format
    (anything but ``dense``), else None; never raises, so detection is safe on any folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in CONFIG_KEYS:
        entry = config.get(key) if isinstance(config, dict) else None
        if not isinstance(entry, dict) or entry.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            continue
        sparsity = entry.get("sparsity_config")
        if isinstance(sparsity, dict) and sparsity.get("format", "dense") != "dense":
            return key, entry
    return None


def checked_format(folder: Path, entry: dict) -> str:
    """The entry's sparse format, or one UsageError line for what this reader cannot take."""
    storage = entry["sparsity_config"].get("format")
    if storage not in PARTS:
        raise UsageError(f"{folder}: config.json stores sparse weights as {storage!r}; secateurs reads "
                         f"{FORMAT_24} and {FORMAT_BITMASK} (decompress it with the tool that wrote it)")
    version = str(entry.get("version", WRITTEN_VERSION))
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match.group(1)), int(match.group(2))) > NEWEST_KNOWN:
        raise UsageError(f"{folder}: config.json was written by compressed-tensors {version!r}, whose {storage} "
                         f"layout secateurs does not know (it reads versions up to {'.'.join(map(str, NEWEST_KNOWN))})")
    if entry.get("config_groups"):
        raise UsageError(f"{folder} is quantized as well as sparse; secateurs loads sparse-only compressed-tensors "
                         "checkpoints (load this one with its own tool)")
    return storage


def layer_tensors(fmt: SparseFormat, storage: str, transposed: bool = False,
                  rows: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one compressed weight (names without the ``<layer>.`` prefix).

    ``transposed``: the layer stores its weight as (in, out) (GPT-2's Conv1D), so that is what is written.
    ``rows``: only output rows [start, stop), one linear of the checkpoint's (an expert's gate or up
    projection, stored apart, of a fused gate/up matrix)."""
    start, stop = rows or (0, fmt.shape[0])
    if storage == FORMAT_24:
        cols = fmt.shape[1]
        return {"compressed": fmt.values[start:stop], "bitmask": pack_bits(fmt.mask()[start:stop]),
                "shape": torch.tensor([[stop - start], [cols]], dtype=torch.int64)}
    dense = fmt.to_dense()[start:stop]
    dense = dense.t().contiguous() if transposed else dense
    mask = dense != 0
    counts = mask.sum(dim=1)
    return {"compressed": dense[mask], "bitmask": pack_bits(mask), "row_offsets": counts.cumsum(0) - counts,
            "shape": torch.tensor(list(dense.shape), dtype=torch.int64)}


def read_layer(storage: str, parts: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, values) of one stored weight, checked against ``shape`` (the model's stored weight)
    and against each other; every disagreement is one UsageError line naming the tensor."""
    stated = parts["shape"].flatten().tolist()
    if stated != list(shape):
        raise UsageError(f"{where}.shape says {stated}, but the model's weight there is {list(shape)}; "
                         "the checkpoint does not belong to this config")
    rows, cols = shape
    bitmask, values = parts["bitmask"], parts["compressed"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise UsageError(f"{where}.bitmask is {bitmask.dtype} {list(bitmask.shape)}, not uint8 "
                         f"{[rows, -(-cols // 8)]}; the checkpoint is corrupt")
    if not values.is_floating_point():
        raise UsageError(f"{where}.compressed is {values.dtype}; secateurs reads float values (not a quantized checkpoint)")
    mask = unpack_bits(bitmask, cols)
    if storage == FORMAT_24:
        if cols % 4 or not bool((mask.reshape(rows, -1, 4).sum(dim=2) == 2).all()):
            raise UsageError(f"{where}.bitmask does not keep exactly 2 of every 4 inputs, but config.json says "
                             f"{FORMAT_24}; the checkpoint is corrupt")
        if tuple(values.shape) != (rows, cols // 2):
            raise UsageError(f"{where}.compressed is {list(values.shape)}, not {[rows, cols // 2]}; truncated or corrupt")
        return mask, values
    kept = int(mask.sum())
    if values.dim() != 1 or values.numel() != kept:
        raise UsageError(f"{where}.compressed holds {values.numel()} values, but its bitmask keeps {kept}; truncated or corrupt")
    counts = mask.sum(dim=1)
    if parts["row_offsets"].flatten().tolist() != (counts.cumsum(0) - counts).tolist():
        raise UsageError(f"{where}.row_offsets disagree with its bitmask; the checkpoint is corrupt")
    return mask, values


def kernel_format(storage: str, mask: torch.Tensor, values: torch.Tensor, transposed: bool,
                  min_sparsity: float = DEFAULT_MIN_SPARSITY) -> SparseFormat | torch.Tensor:
    """The kernel format of a stored weight, or its dense (out, in) matrix where none holds it: the
    format that keeps this storage's values as stored, where the layer's width suits it, else the one
    :func:`choose_format` picks for the dense weight."""
    native = next((cls for cls in format_classes() if cls.checkpoint_storage == storage), None)
    if native is not None and not transposed and native.supports(torch.zeros(1, mask.shape[1])) is None:
        return native.from_mask(values, mask)
    dense = torch.zeros(mask.shape, dtype=values.dtype).masked_scatter_(mask, values.flatten())
    dense = dense.t().contiguous() if transposed else dense
    fmt_cls, _ = choose_format(dense, min_sparsity)
    return dense if fmt_cls is None else fmt_cls.compress(dense)


@dataclass(frozen=True)
class ExpertPiece:
    """One linear of the checkpoint that holds rows of one expert's matrix of a fused experts module.

    ``stored``: its name in the checkpoint (``model.layers.0.block_sparse_moe.experts.3.w1``);
    ``emitted``: its name relative to the experts module as the state dict must give it, so that
    ``save_pretrained``'s own renamings turn it into ``stored``; ``rows``: the rows [start, stop) of
    ``matrix`` (``gate_up_proj``, ``down_proj``) of expert ``expert`` it holds."""

    stored: str
    emitted: str
    matrix: str
    expert: int
    rows: tuple[int, int]


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every MoE block's experts module (dense or :class:`SparseExperts`) by path; {} for a dense family."""
    spec = spec_for(model)
    if spec.moe is None:
        return {}
    found = {id(spec.experts_of(block)) for block in spec.blocks_of(model)} - {id(None)}
    return {path: module for path, module in model.named_modules() if id(module) in found}


def expert_pieces(model: nn.Module, layout: StoredLayout, path: str, experts: nn.Module) -> list[ExpertPiece] | str:
    """How the checkpoint stores the experts module at ``path``: one :class:`ExpertPiece` per stored
    linear, found by passing row-numbered stand-ins of the fused parameters through ``transformers``'
    own conversion (``layout``); or why compressed-tensors cannot name them (they are stored fused, or a
    stored tensor mixes experts or columns), one line."""
    if isinstance(experts, SparseExperts):
        family, transposed = experts.family, experts.transposed
        shapes = {name: (len(getattr(experts, name)), getattr(experts, name)[0].out_features) for name in (GATE_UP, DOWN)}
    else:
        family, transposed = type(experts).__name__, spec_for(model).moe.transposed
        shapes = {name: tuple(getattr(experts, name).shape[:2]) for name in (GATE_UP, DOWN)}
    fused = f"{family} keeps its experts fused in the checkpoint"
    if transposed:
        return f"{fused}, [experts, in, out], which compressed-tensors (one tensor set per linear) cannot name"
    offsets, codes, start = {}, {}, 0
    for name, (count, rows) in shapes.items():  # distinct numbers across both matrices
        offsets[name] = start
        codes[f"{path}.{name}"] = torch.arange(start, start + count * rows, dtype=torch.float64).reshape(count, rows, 1)
        start += count * rows
    with _family_conversion(model):
        converted = layout.to_stored(codes)
    pieces = []
    for stored, code in converted.items():
        first = int(code.flatten()[0])
        name = next(n for n in reversed(shapes) if offsets[n] <= first)
        expert, row = divmod(first - offsets[name], shapes[name][1])
        n = code.shape[0]
        expected = torch.arange(first, first + n, dtype=torch.float64).unsqueeze(1)
        if code.dim() != 2 or code.shape[1] != 1 or not stored.endswith(".weight") or row + n > shapes[name][1] \
                or not torch.equal(code, expected):
            return f"{fused} ({stored}, {list(code.shape)}), which compressed-tensors (one tensor set per linear) cannot name"
        pieces.append(ExpertPiece(stored.removesuffix(".weight"), "", name, expert, (row, row + n)))
    if sum(piece.rows[1] - piece.rows[0] for piece in pieces) != start:
        return f"{fused} in tensors that do not hold every expert row once, which compressed-tensors cannot name"
    return _emitted(layout, path, pieces, fused)


@contextmanager
def _family_conversion(model: nn.Module) -> Iterator[None]:
    """``save_pretrained`` reverts only the conversions ``from_pretrained`` applied (``_weight_conversions``):
    a model loaded from a folder whose experts were stored compressed applied no expert fusion, yet its
    checkpoint layout is still the family's. Without the attribute, transformers reverts the family's
    whole mapping, which is what the stored layout of its experts is."""
    applied = model.__dict__.pop("_weight_conversions", None)
    try:
        yield
    finally:
        if applied is not None:
            model._weight_conversions = applied


def _emitted(layout: StoredLayout, path: str, pieces: list[ExpertPiece], fused: str) -> list[ExpertPiece] | str:
    """``pieces`` with the state-dict name of each: the stored name through the model's forward renamings
    (Mixtral's ``block_sparse_moe`` -> ``mlp``), checked to come back to it through ``save_pretrained``'s reverse."""
    def forward(key: str) -> str:
        try:
            for renaming in layout.renamings:
                key = renaming.rename_source_key(key)[0]
        except AttributeError:  # a transformers without per-key renaming: the stored name, checked below
            pass
        return key

    named = [(piece, forward(f"{piece.stored}.compressed")) for piece in pieces]
    back = layout.to_stored({key: torch.tensor([float(i)]) for i, (_, key) in enumerate(named)})
    came_back = {int(t): key for key, t in back.items()}
    found = []
    for i, (piece, key) in enumerate(named):
        if came_back.get(i) != f"{piece.stored}.compressed" or not key.startswith(f"{path}."):
            return f"{fused} under names this model does not round-trip ({piece.stored})"
        found.append(replace(piece, emitted=key[len(path) + 1:].removesuffix(".compressed")))
    return found


def expert_layouts(model: nn.Module) -> dict[str, list[ExpertPiece] | str]:
    """:func:`expert_pieces` of every experts module, by path (each a reason where this ``transformers``
    cannot convert the family's stored names at all)."""
    modules = experts_modules(model)
    if not modules:
        return {}
    try:
        layout = StoredLayout(model)
    except UsageError:  # an older transformers 5 without per-key conversion (StoredLayout says which)
        import transformers

        return {path: f"{type(module).__name__}'s per-expert checkpoint names need a newer transformers than "
                      f"{transformers.__version__} to derive (pip install -U transformers)" for path, module in modules.items()}
    return {path: expert_pieces(model, layout, path, module) for path, module in modules.items()}


def _write_experts_hook(storage: str, pieces: list[ExpertPiece] | str, experts: SparseExperts, state: dict,
                        prefix: str, _meta) -> None:
    """A SparseExperts' state dict as the checkpoint stores the family's experts: each stored linear's
    compressed tensors, or, where the layout cannot name them (``pieces`` is the reason), the dense fused
    parameters the family loads."""
    for key in [key for key in state if key.startswith(prefix)]:
        del state[key]
    if isinstance(pieces, str):
        for name in (GATE_UP, DOWN):
            layers = getattr(experts, name)
            dense = torch.stack([layer.dense_weight() for layer in layers])
            state[prefix + name] = dense.transpose(1, 2).contiguous() if experts.transposed else dense
            if layers[0].bias is not None:
                state[f"{prefix}{name}_bias"] = torch.stack([layer.bias.detach() for layer in layers])
        return
    for piece in pieces:
        layer = getattr(experts, piece.matrix)[piece.expert]
        for part, tensor in layer_tensors(layer.format(), storage, rows=piece.rows).items():
            state[f"{prefix}{piece.emitted}.{part}"] = tensor


def _write_hook(storage: str, transposed: bool, layer: SparseLinear, state: dict, prefix: str, _meta) -> None:
    """A SparseLinear's state dict in the checkpoint layout (so ``save_pretrained`` writes it)."""
    for part in layer.format_class.parts:
        state.pop(prefix + part, None)
    for part, tensor in layer_tensors(layer.format(), storage, transposed).items():
        state[prefix + part] = tensor


def use_layout(model: nn.Module, storage: str, transposed: set[str], ignore: list[str], sparsity: float,
               experts: dict[str, list[ExpertPiece] | str]) -> dict:
    """Make ``model`` save in ``storage``: its SparseLinears write checkpoint tensors, its SparseExperts
    their experts as ``experts`` (:func:`expert_layouts`) says the checkpoint stores them, and its config
    carries the sparsity config as compressed-tensors writes it. Returns that config."""
    entry = {
        "quant_method": QUANT_METHOD,
        "version": WRITTEN_VERSION,
        "sparsity_config": {
            "format": storage,
            "global_sparsity": sparsity,
            "ignore": ignore,
            "registry_requires_subclass": False,
            "sparsity_structure": "2:4" if storage == FORMAT_24 else "unstructured",
            "targets": ["Linear"],
        },
        "transform_config": {},
    }
    for name, layer in model.named_modules():
        if isinstance(layer, SparseExperts):
            layer.register_state_dict_post_hook(partial(_write_experts_hook, storage, experts[name]))
        elif isinstance(layer, SparseLinear) and not _inside(name, experts):
            layer.register_state_dict_post_hook(partial(_write_hook, storage, name in transposed))
    model.config.quantization_config = entry
    return entry


def export(model: nn.Module, spec: ArchSpec, min_sparsity: float = DEFAULT_MIN_SPARSITY) -> ExportStage:
    """Swap the sparse linears for SparseLinear (and sparse fused experts for SparseExperts) and make the
    model save as a compressed-tensors checkpoint: ``sparse-24-bitmask`` when every weight saved
    compressed is 2:4 in its stored orientation, else ``sparse-bitmask`` (which holds any pattern).
    Experts the layout cannot name (stored fused: gpt-oss) stay sparse in memory and are saved dense,
    listed in ``kept_dense`` with that reason. Returns the stage record."""
    linears = spec.named_linears(model)
    transposed = {name for name, module in linears.items() if is_transposed(module)}
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    total = sum(m.weight.numel() for m in linears.values())
    report = sparsify(model, spec, min_sparsity)
    experts = expert_layouts(model)
    for path, pieces in experts.items():
        module = model.get_submodule(path)
        if isinstance(pieces, str) and isinstance(module, SparseExperts):
            for rel, layer in module.layers().items():
                del report.swapped[f"{path}.{rel}"]
                report.kept_dense[f"{path}.{rel}"] = f"saved dense (in memory they run on the sparse kernels): {pieces}"
                report.sparse_bytes += layer.out_features * layer.in_features * layer.format().dtype.itemsize - layer.format().nbytes()
    transposed &= set(report.swapped)
    storage = storage_for(model, transposed, experts)
    ignore = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Linear) or is_transposed(module))
    use_layout(model, storage, transposed, ignore, round(zeros / max(total, 1), 6), experts)
    return replace(report.stage_record(), layout=LAYOUT, storage=storage)


def _inside(name: str, experts: dict[str, list[ExpertPiece] | str]) -> bool:
    """``name`` is a module of one of the experts modules at the paths ``experts`` names."""
    return any(name.startswith(f"{path}.") for path in experts)


def storage_for(model: nn.Module, transposed: set[str], experts: dict[str, list[ExpertPiece] | str]) -> str:
    """The storage every SparseLinear saved compressed keeps its values in as stored (``sparse-24-bitmask``
    for an all-2:4 model), where they share one and none is transposed; else ``sparse-bitmask``, which
    holds any. Experts saved dense (``experts`` gives a reason for their module) do not count."""
    dense = {path for path, pieces in experts.items() if isinstance(pieces, str)}
    storages = {layer.format_class.checkpoint_storage for name, layer in model.named_modules()
                if isinstance(layer, SparseLinear) and not _inside(name, dense)}
    native = storages.pop() if len(storages) == 1 else None
    return native if native is not None and not transposed else FORMAT_BITMASK


def _stored_layers(folder: Path, storage: str) -> dict[str, dict[str, Path]]:
    """Each compressed layer's parts and the shard holding each (from the safetensors headers)."""
    layers: dict[str, dict[str, Path]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name, _, part = key.rpartition(".")
                if part in PARTS[storage]:
                    layers.setdefault(name, {})[part] = file
    return {name: parts for name, parts in layers.items() if "compressed" in parts}


def restore(model: nn.Module, folder: Path, dtype: torch.dtype) -> int:
    """Put a compressed-tensors sparse checkpoint's weights into the freshly built ``model`` (loaded
    without them), on the kernels where a format holds them (a fused experts module whose experts are
    stored compressed, one linear each, on a SparseExperts); returns how many layers were compressed."""
    found = sparsity_entry(folder)
    if found is None:
        return 0
    _, entry = found
    storage = checked_format(folder, entry)
    transposed: set[str] = set()
    layers = _stored_layers(folder, storage)
    experts = expert_layouts(model)
    pieces = {piece.stored: (path, piece) for path, found in experts.items() if not isinstance(found, str)
              for piece in found}
    read: dict[str, dict[ExpertPiece, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, files in layers.items():
        where = f"{folder}: {name}"
        missing = [part for part in PARTS[storage] if part not in files]
        if missing:
            raise UsageError(f"{where}.{missing[0]} is missing ({storage} stores {', '.join(PARTS[storage])}); the checkpoint is incomplete")
        if name in pieces:
            path, piece = pieces[name]
            cols = getattr(model.get_submodule(path), piece.matrix).shape[2]
            read.setdefault(path, {})[piece] = read_layer(storage, _read_parts(files, name), (piece.rows[1] - piece.rows[0], cols), where)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not hasattr(module, "weight") or module.weight.dim() != 2:
            raise UsageError(f"{where} is stored compressed, but config.json builds no linear of that name; "
                             "the checkpoint does not belong to this config")
        mask, values = read_layer(storage, _read_parts(files, name), tuple(module.weight.shape), where)
        flipped = is_transposed(module)
        fmt = kernel_format(storage, mask, values.to(dtype), flipped)
        if isinstance(fmt, torch.Tensor):
            module.weight.data = (fmt.t() if flipped else fmt).contiguous()
            continue
        bias = getattr(module, "bias", None)
        set_module(model, name, SparseLinear(fmt, bias.detach() if bias is not None else None))
        if flipped:
            transposed.add(name)
    for path, stored in read.items():
        _restore_experts(model, path, stored, experts[path], storage, dtype, folder)
    experts = expert_layouts(model)
    sparsity = entry["sparsity_config"]
    use_layout(model, storage_for(model, transposed, experts), transposed, list(sparsity.get("ignore") or []),
               sparsity.get("global_sparsity", 0.0), experts)
    return len(layers)


def _read_parts(files: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    parts = {}
    for part, file in files.items():
        with safe_open(str(file), framework="pt") as handle:
            parts[part] = handle.get_tensor(f"{name}.{part}")
    return parts


def _restore_experts(model: nn.Module, path: str, stored: dict[ExpertPiece, tuple[torch.Tensor, torch.Tensor]],
                     pieces: list[ExpertPiece], storage: str, dtype: torch.dtype, folder: Path) -> None:
    """Rebuild each expert matrix of the experts module at ``path`` from its stored linears' (mask,
    values) (``stored``), and put a SparseExperts holding them in its place; where a matrix fits no kernel
    format, or SparseExperts cannot run the family, every matrix goes back into the dense fused parameters
    instead (a module is sparse whole)."""
    experts = model.get_submodule(path)
    absent = [piece.stored for piece in pieces if piece not in stored]
    if absent:
        raise UsageError(f"{folder}: {absent[0]} is not stored compressed while other experts of {path} are; "
                         "the checkpoint is incomplete")
    formats: dict[str, list[SparseFormat | torch.Tensor]] = {}
    for name in (GATE_UP, DOWN):
        for e in range(getattr(experts, name).shape[0]):
            parts = sorted((p for p in pieces if p.matrix == name and p.expert == e), key=lambda p: p.rows[0])
            mask = torch.cat([stored[p][0] for p in parts])
            values = torch.cat([stored[p][1] if storage == FORMAT_24 else stored[p][1].flatten() for p in parts])
            formats.setdefault(name, []).append(kernel_format(storage, mask, values.to(dtype), False))
    if unsupported(experts) is None and all(isinstance(fmt, SparseFormat) for matrices in formats.values() for fmt in matrices):
        set_module(model, path, SparseExperts(experts, formats, transposed=False))
        return
    for name, matrices in formats.items():
        param = getattr(experts, name)
        for e, fmt in enumerate(matrices):
            param.data[e] = fmt if isinstance(fmt, torch.Tensor) else fmt.to_dense()


register_folder_format(FolderFormat(LAYOUT, lambda folder: sparsity_entry(folder) is not None, restore, CONFIG_KEYS))
