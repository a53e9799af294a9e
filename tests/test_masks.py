"""Masks: exact sparsity per row / per layer, valid N:M, determinism, pattern validation."""

from __future__ import annotations

import pytest
import torch

from secateurs.errors import UsageError
from secateurs.model.linear import sparsity_of
from secateurs.sparsity.base import SparsityTarget
from secateurs.sparsity.masks import Pattern, is_nm, nm_mask, select, unstructured_mask


def scores(rows=8, cols=32, seed=0):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_per_row_exact_and_drops_lowest(sparsity):
    s = scores()
    keep = unstructured_mask(s, sparsity, "row")
    dropped_per_row = (~keep).sum(dim=1)
    assert (dropped_per_row == int(32 * sparsity)).all()
    for r in range(s.shape[0]):
        if (~keep[r]).any() and keep[r].any():
            assert s[r][~keep[r]].max() <= s[r][keep[r]].min()


def test_per_layer_exact_and_global():
    s = scores()
    keep = unstructured_mask(s, 0.6, "layer")
    assert (~keep).sum() == int(s.numel() * 0.6)
    assert s[~keep].max() <= s[keep].min()
    assert (~keep).sum(dim=1).unique().numel() > 1  # rows differ: the comparison was layer-wide


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_valid_and_keeps_largest(n, m):
    s = scores(cols=32)
    keep = nm_mask(s, n, m)
    assert is_nm(keep.float(), n, m)
    assert keep.sum() == s.numel() * n // m
    groups, kept = s.reshape(8, -1, m), keep.reshape(8, -1, m)
    assert (groups.masked_fill(~kept, 2).min(dim=2).values >= groups.masked_fill(kept, -1).max(dim=2).values).all()


def test_masks_are_deterministic_with_ties():
    s = torch.ones(4, 16)
    a, b = select(s, 0.5, Pattern()), select(s, 0.5, Pattern())
    assert torch.equal(a, b)
    assert sparsity_of(s * a) == 0.5


def test_pattern_parsing_and_errors():
    assert Pattern.parse("2:4") == Pattern(2, 4)
    assert str(Pattern.parse("unstructured")) == "unstructured"
    for bad in ("4:2", "2-4", "0:4", "dense"):
        with pytest.raises(UsageError, match="N:M"):
            Pattern.parse(bad)
    with pytest.raises(UsageError, match="multiple of 8"):
        Pattern(4, 8).check_fits(100, "layer x")


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_outside_range(bad):
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        SparsityTarget.build(bad, "unstructured", 4)


def test_target_schedule_and_nm_implied():
    assert SparsityTarget.build(None, "2:4", 3).per_block == (0.5, 0.5, 0.5)
    assert SparsityTarget.build([0.1, 0.2, 0.3], "unstructured", 3).mean == pytest.approx(0.2)
    with pytest.raises(UsageError, match="one value per block"):
        SparsityTarget.build([0.1, 0.2], "unstructured", 3)
    with pytest.raises(UsageError, match="fixes the sparsity"):
        SparsityTarget.build(0.7, "2:4", 3)


def test_per_layer_mask_of_a_transposed_view():
    s = scores().t()  # non-contiguous, as for a GPT-2 Conv1D weight
    keep = unstructured_mask(s, 0.5, "layer")
    assert (~keep).sum() == s.numel() // 2 and s[~keep].max() <= s[keep].min()
