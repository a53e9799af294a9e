"""Offline test setup: local data from ../shared/data, no progress bars, shared model fixtures, and the
``slow`` marker on the tests that load the real SmolLM2 or train (``pytest -m "not slow"`` skips them
for a fast loop; the README's command runs everything)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("SECATEURS_DATA", str(SHARED_DATA))
os.environ["SECATEURS_PROGRESS"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def one_thread():
    """Tiny models train far faster on one thread than on an oversubscribed shared CPU; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """3,000 seeded words of a small vocabulary: training and calibration text for tiny models."""
    words = "the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm fire".split()
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (3000,), generator=generator).tolist()))
    return path


@pytest.fixture()
def tiny_folder(tmp_path) -> Path:
    """A tiny random Llama saved as an HF folder with its tokenizer (what most CLI tests run on)."""
    from tiny_models import tiny_model

    loaded = tiny_model("llama")
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def no_loading(monkeypatch) -> None:
    """Fail the test if a command gets as far as loading weights: its refusal must come first."""
    import secateurs.model.load

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(secateurs.model.load, "load_model", refuse)  # the stages import it when they load


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The cached plain-HF copy of SmolLM2-135M (built from the packaged GGUF on first use)."""
    from secateurs.model.sources import _shortcut_folder

    return _shortcut_folder("smollm2-135m")


TRAINING_MODULES = {"test_recover", "test_recover_loop", "test_shear", "test_moe_recover"}
"""Test files whose tests run training loops (LoRA, LoRAPrune, shearing, iterative pruning)."""


def _loads_smollm2(item: pytest.Item) -> bool:
    if "smollm2_folder" in getattr(item, "fixturenames", ()):
        return True
    function = getattr(item, "function", None)
    return function is not None and "smollm2-135m" in inspect.getsource(function)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module.__name__ in TRAINING_MODULES or _loads_smollm2(item):
            item.add_marker(pytest.mark.slow)


class FakeNvrtc:
    """NVRTC as ``cuda_ops._compile`` calls it (cuda-bindings' ``nvrtc`` module), compiling nothing: records each
    program created (name, header count, header names, header texts) and each compile's options, and offers the
    architectures ``archs``; tests of the compile step's options, headers and cache keys need no toolkit."""

    def __init__(self, archs: tuple[int, ...] = (80, 90)) -> None:
        self.archs = list(archs)
        self.created: list[tuple] = []
        self.options: list[list[str]] = []

    def nvrtcVersion(self):
        return (0, 13, 5)

    def nvrtcGetSupportedArchs(self):
        return (0, self.archs)

    def nvrtcCreateProgram(self, text, name, count, headers, names):
        self.created.append((name.decode(), count, list(names), [bytes(h) for h in headers]))
        return (0, "program")

    def nvrtcCompileProgram(self, program, count, options):
        self.options.append([o.decode() for o in options])
        return (0,)

    def nvrtcGetCUBINSize(self, program):
        return (0, 4)

    def nvrtcGetCUBIN(self, program, binary):
        return (0,)

    def nvrtcDestroyProgram(self, program):
        return (0,)


@pytest.fixture()
def fake_nvrtc(monkeypatch, tmp_path):
    """``cuda_ops._compile`` on a :class:`FakeNvrtc` (set its ``archs`` as needed), caching into ``tmp_path``."""
    from secateurs.kernels import cuda_ops

    fake = FakeNvrtc()
    monkeypatch.setattr(cuda_ops, "_bindings", lambda: (None, fake))
    monkeypatch.setenv("SECATEURS_KERNEL_CACHE", str(tmp_path))
    cuda_ops.cache_dir.cache_clear()
    yield fake
    cuda_ops.cache_dir.cache_clear()


def _nvcc() -> str:
    """The nvcc of this machine; skips the test where there is none (CI has no CUDA toolkit)."""
    import shutil

    nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("no nvcc here")
    return nvcc


@pytest.fixture()
def nvcc_builds_without_spills(tmp_path):
    """Compile a kernel source with nvcc and ptxas's report for Hopper and Ampere (NVRTC compiles it at run time on
    users' GPUs) and check every named kernel exists, is compiled, and spills no register. Skips without a toolkit."""
    import subprocess

    nvcc = _nvcc()

    def check(source: Path, names: list[str]) -> None:
        for arch in ("sm_90", "sm_80"):
            out = tmp_path / f"{source.stem}-{arch}.cubin"
            done = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", str(out),
                                   str(source)], capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr[-2000:]
            binary = out.read_bytes().decode("latin-1")
            assert all(name in binary for name in names)
            report = done.stdout + done.stderr
            assert report.count("Compiling entry function") == len(names)
            assert report.count(" 0 bytes spill stores, 0 bytes spill loads") == len(names), report

    return check


@pytest.fixture()
def nvcc_cubins(tmp_path):
    """Compile a kernel source with nvcc for Hopper and Ampere (NVRTC compiles it at run time on users'
    GPUs); returns each architecture's cubin as text to search for kernel names. Skips without a toolkit."""
    import subprocess

    nvcc = _nvcc()

    def compile_source(source: Path) -> dict[str, str]:
        cubins = {}
        for arch in ("sm_90", "sm_80"):
            out = tmp_path / f"{source.stem}-{arch}.cubin"
            done = subprocess.run([nvcc, "-std=c++17", f"-arch={arch}", "-cubin", "-o", str(out), str(source)],
                                  capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr[-2000:]
            cubins[arch] = out.read_bytes().decode("latin-1")
        return cubins

    return compile_source



def _unverified(monkeypatch, on: bool):
    from secateurs.kernels import cuda_ops

    if on:
        monkeypatch.setenv(cuda_ops.UNVERIFIED_ENV, "1")
    else:
        monkeypatch.delenv(cuda_ops.UNVERIFIED_ENV, raising=False)
    cuda_ops.unverified_offered.cache_clear()
    yield
    cuda_ops.unverified_offered.cache_clear()


@pytest.fixture()
def opted_in(monkeypatch):
    """SECATEURS_UNVERIFIED_KERNELS=1: kernels not yet cleared on a GPU (wgmma, banded) are offered (and banded weights stored)."""
    yield from _unverified(monkeypatch, True)


@pytest.fixture()
def not_opted_in(monkeypatch):
    """The default: no SECATEURS_UNVERIFIED_KERNELS, only kernels measured on a GPU."""
    yield from _unverified(monkeypatch, False)
