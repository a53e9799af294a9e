"""The compressed-tensors sparse checkpoint layout (kernels/compressed.py), both ways.

compressed-tensors 0.15+ no longer ships the sparse compressors (and 0.14, which does, requires
transformers < 5), so the package's own pieces that still define the layout are what these tests hold
the code to: its bit packing (``pack_bitmasks`` / ``unpack_bitmasks``, the ``bitorder="little"`` numpy
packing) and its config classes (``Sparse24BitMaskConfig`` / ``BitmaskConfig``). A checkpoint is written
with them the way the 0.14 compressor writes it (the values gathered with the keep-mask in row-major
order), and our output is decompressed with them.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from secateurs import load_model
from secateurs.api import export_sparse, save
from secateurs.errors import UsageError
from secateurs.kernels import Bitmap, Sparse24, sparse_layers, sparsify
from secateurs.kernels.compressed import FORMAT_24, FORMAT_BITMASK
from secateurs.kernels.formats import pack_bits, unpack_bits
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import nm_mask, unstructured_mask
from tiny_models import random_ids, tiny_model

ct_config = pytest.importorskip("compressed_tensors.config")
ct_utils = pytest.importorskip("compressed_tensors.utils")


def pruned(arch: str = "llama", pattern: str = "2:4", dtype: torch.dtype = torch.float32):
    """A tiny model whose block linears are 2:4 or unstructured sparse: ``u<percent>`` zeros (u70 goes to the banded
    layout, u95, outside its bands, to the bitmap)."""
    loaded = tiny_model(arch)
    loaded.model.to(dtype)
    for module in loaded.spec.named_linears(loaded.model).values():
        w = weight_matrix(module)
        if pattern == "2:4":
            w.mul_(nm_mask(w.abs(), 2, 4))
            continue
        sparsity, group = int(pattern[1:]) / 100, w[0, 4:8].clone()
        w.mul_(unstructured_mask(w.abs(), sparsity))
        if sparsity > 0.9:  # so sparse that most weights are 2:4 too: one whole group of 4 kept makes them unstructured
            w[0, 4:8] = group
    return loaded


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def package_decompress(stored: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A stored weight expanded with the package's own unpacking (as its 0.14 decompressor does)."""
    shape = stored[f"{name}.shape"].flatten().tolist()
    mask = ct_utils.unpack_bitmasks(stored[f"{name}.bitmask"], shape)
    return torch.zeros(shape, dtype=stored[f"{name}.compressed"].dtype).masked_scatter_(mask, stored[f"{name}.compressed"].flatten())


def package_checkpoint(loaded, folder, storage: str):
    """Save ``loaded`` as a compressed-tensors checkpoint built with the package's pieces: every block
    linear compressed, the 2:4 mask the package's top-2-by-magnitude (kept zeros included)."""
    dense_dir = save(loaded, folder.with_name(folder.name + "-dense"), stages=[])
    state = tensors(dense_dir)
    names = set(loaded.spec.named_linears(loaded.model))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removesuffix(".weight")
        if name not in names:
            out[key] = value
            continue
        if storage == FORMAT_24:
            groups = value.reshape(-1, 4)
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
            mask = mask.reshape(value.shape)
            out[f"{name}.compressed"] = value[mask].reshape(value.shape[0], -1)
            out[f"{name}.shape"] = torch.tensor(list(value.shape)).reshape(-1, 1)
        else:
            mask = value != 0
            counts = mask.sum(dim=1)
            out[f"{name}.compressed"] = value[mask]
            out[f"{name}.row_offsets"] = counts.cumsum(0) - counts
            out[f"{name}.shape"] = torch.tensor(list(value.shape))
        out[f"{name}.bitmask"] = ct_utils.pack_bitmasks(mask)
    folder.mkdir()
    for file in dense_dir.iterdir():
        if file.name not in ("model.safetensors", "secateurs.json"):
            (folder / file.name).write_bytes(file.read_bytes())
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config_cls = ct_config.Sparse24BitMaskConfig if storage == FORMAT_24 else ct_config.BitmaskConfig
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "version": "0.14.0", "transform_config": {},
        "sparsity_config": config_cls(targets=["Linear"], ignore=["lm_head"]).model_dump(),
    }
    (folder / "config.json").write_text(json.dumps(config))
    return dense_dir


def rewrite(folder, change) -> None:
    """Apply ``change`` to the folder's tensors (a corrupt checkpoint)."""
    state = tensors(folder)
    change(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("cols", [64, 61])
def test_bit_packing_is_the_packages(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) > 0.6
    packed = pack_bits(mask)
    assert torch.equal(packed, ct_utils.pack_bitmasks(mask))
    assert torch.equal(unpack_bits(packed, cols), ct_utils.unpack_bitmasks(packed, [5, cols]))


@pytest.mark.parametrize("pattern,storage,kinds", [("2:4", FORMAT_24, {"2:4"}), ("u70", FORMAT_BITMASK, {"banded"}),
                                                  ("u95", FORMAT_BITMASK, {"bitmap"})])
def test_export_is_the_package_layout_and_reloads_onto_the_kernels(tmp_path, pattern, storage, kinds):
    loaded = pruned(pattern=pattern)
    ids = random_ids(2, 12)
    expected = loaded.model(ids).logits
    dense = {name: weight_matrix(m).clone() for name, m in loaded.spec.named_linears(loaded.model).items()}
    stage = export_sparse(loaded)
    folder = save(loaded, tmp_path / "sparse", stages=[stage])
    entry = json.loads((folder / "config.json").read_text())["quantization_config"]
    config_cls = ct_config.Sparse24BitMaskConfig if storage == FORMAT_24 else ct_config.BitmaskConfig
    written = config_cls.model_validate(entry["sparsity_config"]).model_dump()
    assert entry["sparsity_config"] == written and written["format"] == storage and entry["quant_method"] == "compressed-tensors"
    stored = tensors(folder)
    assert stage.layers and stage.storage == storage
    for name, weight in dense.items():  # too-dense or too-narrow layers stay plain weights
        assert torch.equal(package_decompress(stored, name) if name in stage.layers else stored[f"{name}.weight"], weight)
    reloaded = load_model(str(folder))
    assert {layer.kind for layer in sparse_layers(reloaded.model).values()} == kinds
    assert set(sparse_layers(reloaded.model)) == set(stage.layers)
    torch.testing.assert_close(reloaded.model(ids).logits, expected, rtol=0, atol=0)


def test_2_4_weights_store_in_0_5625_of_their_fp16_bytes(tmp_path):
    loaded = pruned(dtype=torch.float16)
    names = list(loaded.spec.named_linears(loaded.model))
    dense_bytes = sum(weight_matrix(m).numel() * 2 for m in loaded.spec.named_linears(loaded.model).values())
    folder = save(loaded, tmp_path / "s", stages=[export_sparse(loaded)])
    stored = tensors(folder)
    sparse_bytes = sum(stored[f"{n}.{p}"].numel() * stored[f"{n}.{p}"].element_size() for n in names for p in ("compressed", "bitmask"))
    assert sparse_bytes == dense_bytes * 9 // 16


@pytest.mark.parametrize("pattern,storage,kind", [("2:4", FORMAT_24, "2:4"), ("u70", FORMAT_BITMASK, "banded"),
                                                 ("u95", FORMAT_BITMASK, "bitmap")])
def test_a_package_written_checkpoint_loads_onto_the_kernels(tmp_path, pattern, storage, kind):
    loaded = pruned(pattern=pattern, dtype=torch.float16)
    names = list(loaded.spec.named_linears(loaded.model))
    weight_matrix(loaded.spec.named_linears(loaded.model)[names[0]])[:, :4] = 0  # groups keeping zeros
    folder = tmp_path / "ct"
    package_checkpoint(loaded, folder, storage)
    stored = tensors(folder)
    for name in names:  # the package's own decompression is the dense reference
        weight_matrix(loaded.spec.named_linears(loaded.model)[name]).copy_(package_decompress(stored, name))
    ids = random_ids(2, 12)
    expected = loaded.model.float()(ids).logits
    reloaded = load_model(str(folder), dtype="float16")
    layers = sparse_layers(reloaded.model)  # a bitmap needs 128-wide inputs (banded: 8): narrower layers load dense
    wide = [n for n in names if kind != "bitmap" or weight_matrix(loaded.spec.named_linears(loaded.model)[n]).shape[1] % 128 == 0]
    assert set(layers) == set(wide) and {layer.kind for layer in layers.values()} == {kind}
    torch.testing.assert_close(reloaded.model(ids).logits.float(), expected, rtol=2e-2, atol=2e-2)


def test_gpt2_conv1d_layers_store_as_their_transposed_weight(tmp_path):
    loaded = pruned("gpt2")
    ids = random_ids(1, 10)
    expected = loaded.model(ids).logits
    stage = export_sparse(loaded)
    assert stage.storage == FORMAT_BITMASK  # 2:4 along the inputs is not 2:4 along Conv1D's stored rows
    folder = save(loaded, tmp_path / "g", stages=[stage])
    reloaded = load_model(str(folder))
    assert sparse_layers(reloaded.model)
    torch.testing.assert_close(reloaded.model(ids).logits, expected)  # Conv1D's addmm rounds differently


def test_earlier_layout_still_loads_with_a_note(tmp_path, caplog):
    loaded = pruned()
    ids = random_ids(1, 10)
    expected = loaded.model(ids).logits
    folder = save(loaded, tmp_path / "old", stages=[sparsify(loaded.model, loaded.spec).stage_record()])
    assert "model.layers.0.mlp.up_proj.values" in tensors(folder)
    with caplog.at_level(logging.WARNING, logger="secateurs.kernels"):
        reloaded = load_model(str(folder))
    assert any("earlier layout" in r.getMessage() and "re-export" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(reloaded.model(ids).logits, expected, rtol=0, atol=0)


def _flip_one_bit(state):
    key = "model.layers.0.mlp.down_proj.bitmask"
    state[key] = state[key].clone()
    state[key][0, 0] ^= 1


def _wrong_shape(state):
    state["model.layers.0.mlp.down_proj.shape"] = torch.tensor([[7], [128]])


def _truncated(state):
    key = "model.layers.0.mlp.down_proj.compressed"
    state[key] = state[key][:-3].clone()


def _config(change):
    def apply(folder):
        config = json.loads((folder / "config.json").read_text())
        change(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    return apply


@pytest.mark.parametrize("pattern,corrupt,message", [
    ("2:4", _wrong_shape, "down_proj.shape says \\[7, 128\\]"),
    ("2:4", _flip_one_bit, "does not keep exactly 2 of every 4"),
    ("2:4", _truncated, "down_proj.compressed is \\[.*\\], not"),
    ("u70", _truncated, "holds .* values, but its bitmask keeps"),
    ("2:4", _config(lambda q: q.update(version="0.15.0")), "compressed-tensors '0.15.0'"),
    ("2:4", _config(lambda q: q["sparsity_config"].update(format="marlin-24")), "'marlin-24'"),
])
def test_a_folder_that_disagrees_with_its_config_is_one_usage_line(tmp_path, pattern, corrupt, message):
    loaded = pruned(pattern=pattern)
    folder = save(loaded, tmp_path / "bad", stages=[export_sparse(loaded)])
    if corrupt.__name__ == "apply":
        corrupt(folder)
    else:
        rewrite(folder, corrupt)
    with pytest.raises(UsageError, match=message) as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value)


def test_sparse24_and_bitmap_from_mask_keep_the_stored_values():
    weight = torch.randn(8, 32)
    weight.mul_(nm_mask(weight.abs(), 2, 4))
    weight[0, :4] = 0  # a group whose two stored positions hold zeros
    fmt = Sparse24.compress(weight)
    again = Sparse24.from_mask(fmt.values, fmt.mask())
    assert torch.equal(again.meta, fmt.meta) and torch.equal(again.to_dense(), weight)
    bitmap_weight = torch.randn(4, 128)
    bitmap_weight.mul_(unstructured_mask(bitmap_weight.abs(), 0.7))
    keep = bitmap_weight != 0
    ref = Bitmap.compress(bitmap_weight)
    built = Bitmap.from_mask(bitmap_weight[keep], keep)
    assert all(torch.equal(a, b) for a, b in zip(built.tensors().values(), ref.tensors().values()))
