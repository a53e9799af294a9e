"""Two gloo ranks (torchrun, CPU) give the same weights as one process on the same samples."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from distributed_worker import CASES, owl_schedule, run_case
from test_stream import tensors_of

from secateurs.api import PruneConfig, prune
from secateurs.data.calib import CalibConfig
from secateurs.engine.distributed import assign, split_samples
from secateurs.engine.sequential import EngineOptions
from secateurs.errors import UsageError
from secateurs.model.load import load_model
from secateurs.recipe import run as run_recipe
from secateurs.schema import argv
from secateurs.stages import STAGES
from secateurs.stages import run as run_stage

HERE = Path(__file__).resolve().parent


def torchrun(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environ, check=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ranks")
    done = torchrun(str(HERE / "distributed_worker.py"), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


def masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in state.items() if k.endswith("proj.weight") or "c_attn" in k or "c_fc" in k}


@pytest.mark.parametrize(("arch", "method", "n"), CASES)
def test_two_ranks_equal_one_process(two_ranks, arch, method, n):
    key = f"{arch}-{method}-{n}"
    rank0, rank1 = two_ranks[0][key], two_ranks[1][key]
    for name in rank0:  # every rank ends with the very same weights
        assert torch.equal(rank0[name], rank1[name]), name
    single = run_case(arch, method, n, EngineOptions(device="cpu"))
    if n == 2 and method != "sparsegpt":
        # One sample per rank: the all-reduce adds the same two sums one process adds, bit for bit.
        for name in single:
            assert torch.equal(single[name], rank0[name]), name
        return
    # Sums added in another order (more samples per rank, or XᵀX accumulated inside a GEMM): the
    # statistics agree to rounding, so masks may differ only where two scores tie to within it, and
    # SparseGPT's updates then differ along those rows (tiny Hessians here are ill-conditioned).
    m_dist, m_one = masks(rank0), masks(single)
    total = sum(m.numel() for m in m_one.values())
    differ = sum(int((m_dist[k] != m_one[k]).sum()) for k in m_one)
    assert differ <= 5e-3 * total
    for name in single:
        assert (rank0[name] - single[name]).norm() <= 2e-2 * single[name].norm() + 1e-6, name


def test_owl_schedule_equal(two_ranks):
    assert two_ranks[0]["owl"] == two_ranks[1]["owl"] == owl_schedule(EngineOptions(device="cpu"))


def test_dead_rank_fails_the_job(tmp_path):
    done = torchrun(str(HERE / "distributed_worker.py"), str(tmp_path), "die", env={"SECATEURS_DIST_TIMEOUT": "60"})
    assert done.returncode != 0
    assert not list(tmp_path.glob("rank*.pt"))


def test_split_and_assign():
    ids = torch.arange(10).unsqueeze(1)
    parts = [split_samples(ids, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), ids) and [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(UsageError, match="--n-samples"):
        split_samples(ids[:2], 0, 3)
    owners = assign([1.0, 8.0, 4.0, 4.0], 2)
    assert owners == [0, 0, 1, 1]  # 8 → rank 0, both 4s → rank 1, then 1 → rank 0 (tie, lower rank)


def test_cli_nproc_wanda_smollm2_equals_one_process(smollm2_folder, data_dir, tmp_path):
    """``secateurs prune --nproc 2`` (torchrun, gloo) vs one process, Wanda on SmolLM2, one sample per rank."""
    args = ["prune", str(smollm2_folder), "--method", "wanda", "--calib", "wikitext2", "--n-samples", "2",
            "--seq-len", "64", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path / "two"), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, timeout=600, env=env, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran one thread each: same kernels, same rounding
    try:
        loaded = load_model(str(smollm2_folder))
        prune(loaded, PruneConfig("wanda", 0.5), CalibConfig("wikitext2", 2, 64, 0, str(data_dir)), EngineOptions(device="cpu"))
    finally:
        torch.set_num_threads(threads)
    saved = tensors_of(tmp_path / "two")
    state = loaded.model.state_dict()
    for name, value in saved.items():
        assert torch.equal(value, state[name]), name
    stages = json.loads((tmp_path / "two" / "secateurs.json").read_text())["stages"]
    assert stages[0]["method"] == "wanda" and abs(stages[0]["achieved_sparsity"]["mean"] - 0.5) < 0.01


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_joined_through_a_tcp_rendezvous(tmp_path):
    """Multi-node with no code change: two torchrun launches (one per "node"), joined through a c10d
    rendezvous on a TCP endpoint, give the one-process weights bit for bit (one sample per rank)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=secateurs-test",
               str(HERE / "distributed_worker.py"), str(tmp_path), "one"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    single = run_case("llama", "wanda", 2, EngineOptions(device="cpu"))
    for rank in (0, 1):
        joined = torch.load(tmp_path / f"rank{rank}.pt")["llama-wanda-2"]
        for name in single:
            assert torch.equal(single[name], joined[name]), name


def test_rendezvous_that_never_completes_is_one_line():
    """A rank whose peers never start fails after the timeout with one line, not a hang or a traceback."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "SECATEURS_DIST_TIMEOUT": "3"}
    code = "import torch\nfrom secateurs.engine.distributed import init_from_env\ninit_from_env(torch.device('cpu'))"
    wrapped = ("from secateurs.errors import UsageError\ntry:\n" + "".join(f"    {line}\n" for line in code.splitlines())
               + "except UsageError as exc:\n    print(exc)\n    raise SystemExit(2)\n")
    done = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stdout.strip()
    assert "\n" not in message and "could not join the 2-process job" in message and "SECATEURS_DIST_TIMEOUT" in message


@pytest.fixture()
def tiny_folder(tmp_path) -> tuple[Path, Path]:
    """A tiny Llama folder and a calibration text file, for the two-rank runs of each entry point."""
    loaded = tiny_model("llama")
    folder = tmp_path / "tiny"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    return folder, text


def _one_process(folder: Path, text: Path) -> dict[str, torch.Tensor]:
    """Wanda on two calibration samples in one process, one thread (as each rank runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(str(folder))
        prune(loaded, PruneConfig("wanda", 0.5), CalibConfig(str(text), 2, 32, 0), EngineOptions(device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return loaded.model.state_dict()


def _same_weights(saved: Path, state: dict[str, torch.Tensor]) -> None:
    for name, value in tensors_of(saved).items():
        assert torch.equal(value, state[name]), name


def test_argv_rebuilds_the_request():
    """The flags a rank is started with build the very request the launcher built."""
    values = {"model": "m", "out": "o", "method": "wanda", "sparsity": "0.1,0.2", "option": ["a=1"], "n_samples": 2,
              "calib": "wikitext2", "owl_m": 7.25, "stream": True, "ppl": "wikitext2"}
    prune_stage = STAGES["prune"]
    line = argv(prune_stage.config_class, values)
    assert line[:1] == ["m"] and "--nproc" not in line and ["--option", "a=1"] == line[line.index("--option"):][:2]
    again = dict(zip(line[1::2], line[2::2]))
    assert again["--owl-m"] == "7.25" and again["--sparsity"] == "0.1,0.2" and "--stream" in line


def test_python_caller_with_nproc_is_refused(tiny_folder, tmp_path):
    folder, text = tiny_folder
    request = STAGES["prune"].parse(str(folder), str(tmp_path / "out"), method="wanda", calib=str(text),
                                        n_samples=2, seq_len=32, nproc=2)
    with pytest.raises(UsageError, match="start this script with `torchrun --nproc-per-node 2`") as error:
        run_stage(request)
    assert "\n" not in str(error.value) and not (tmp_path / "out").exists()


def test_cli_nproc_tiny_equals_one_process(tiny_folder, tmp_path):
    """``secateurs prune --nproc 2``: the command, without --nproc, on two gloo ranks."""
    folder, text = tiny_folder
    args = ["prune", str(folder), "--method", "wanda", "--calib", str(text), "--n-samples", "2", "--seq-len", "32",
            "--device", "cpu", "--out", str(tmp_path / "two"), "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "secateurs", *args], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    _same_weights(tmp_path / "two", _one_process(folder, text))


def test_recipe_stage_with_nproc_runs_that_stage_across_ranks(tiny_folder, tmp_path):
    """A recipe's ``nproc: 2`` stage runs that stage (not the whole recipe) on two ranks, into its stage folder."""
    folder, text = tiny_folder
    recipe = {"model": str(folder), "calib": {"source": str(text), "n_samples": 2, "seq_len": 32, "seed": 0},
              "stages": [{"prune": {"method": "wanda", "sparsity": 0.5, "device": "cpu", "nproc": 2}}],
              "out": str(tmp_path / "run")}
    lines: list[str] = []
    record = run_recipe(recipe, echo=lines.append)
    assert lines == ["stage 1 (prune): running"]
    assert record["stages"][0]["record"]["method"] == "wanda"
    _same_weights(tmp_path / "run", _one_process(folder, text))
