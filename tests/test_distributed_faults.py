"""Faults of a multi-process or streamed run (issue 22): a rank killed mid-block, fewer calibration
samples than ranks, a shard that turns unreadable mid-run. Each ends in one line, leaves nothing in
OUT, and a rerun of the same command resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_stream import assert_same_folder, calib_for, sharded  # noqa: F401  (module fixture)

from secateurs.api import PruneConfig, prune_streamed
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import EngineOptions
from secateurs.errors import UsageError

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_ranks(mode: str, folder: Path, out: Path, n_samples: int) -> tuple[list[tuple[int, str]], float]:
    """Start both ranks as torchrun would (its environment, no agent); their exit codes and stderr."""
    port, calib = _free_port(), calib_for(folder).source
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "SECATEURS_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}
        command = [sys.executable, str(HERE / "fault_worker.py"), mode, str(folder), str(out), calib, str(n_samples)]
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    start = time.monotonic()
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        results.append((proc.returncode, err))
    return results, time.monotonic() - start


def last_line(err: str) -> str:
    return [line for line in err.splitlines() if line.strip()][-1]


def partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def test_rank_killed_mid_block_stops_every_rank_and_a_rerun_resumes(sharded, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    results, seconds = two_ranks("die", sharded, out, 2)
    (rank0, err0), (rank1, _) = results
    assert rank1 == 3 and rank0 == 2, err0[-2000:]
    assert seconds < 120  # the survivor stops by itself (a closed connection, or the 30 s collective timeout)
    assert "Traceback" not in err0
    line = last_line(err0)
    assert line.startswith("error: rank 0 of the 2-process job") and "rerun the same command" in line
    assert not out.exists()
    done = json.loads((partial_of(out) / "progress.json").read_text())["done"]
    assert set(done) == {"0", "1"}  # block 2 never finished: its statistics were being summed
    assert not [p for p in partial_of(out).iterdir() if p.name.endswith(".tmp")]
    results, _ = two_ranks("run", sharded, out, 2)
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
    assert "resuming after 2 finished blocks" in results[0][1]
    calib = CalibConfig(calib_for(sharded).source, 2, 16, 0)
    _, whole = prune_streamed(sharded, tmp_path / "one", PruneConfig("wanda", 0.5), calib, EngineOptions(device="cpu"))
    assert_same_folder(whole, out)  # one sample per rank: bit for bit the one-process result


def test_fewer_samples_than_ranks_is_one_line_before_any_output(sharded, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    results, seconds = two_ranks("run", sharded, out, 1)
    for code, err in results:
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert last_line(err) == "error: 2 ranks but only 1 calibration samples: pass --n-samples ≥ 2 or use fewer processes"
    assert not out.exists() and not partial_of(out).exists()
    assert seconds < 120


def test_shard_unreadable_mid_run_is_one_line_and_a_rerun_resumes(sharded, tmp_path, monkeypatch, capsys):  # noqa: F811
    import secateurs.engine.stream as stream

    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    victim = sharded / index["model.layers.2.mlp.down_proj.weight"]
    saved, stat = victim.read_bytes(), victim.stat()
    release = stream.StreamSession.release_block

    def breaks_a_shard(self, i, block, method, resumed):
        release(self, i, block, method, resumed)
        if i == 0:  # block 1 is being read ahead; block 2's shard goes bad now
            victim.write_bytes(saved[: len(saved) // 2])

    config, calib, out = PruneConfig("wanda", 0.5), calib_for(sharded), tmp_path / "out"
    monkeypatch.setattr(stream.StreamSession, "release_block", breaks_a_shard)
    try:
        with pytest.raises(UsageError) as caught:
            prune_streamed(sharded, out, config, calib, EngineOptions(device="cpu"))
    finally:
        victim.write_bytes(saved)  # the disk comes back: same bytes, same time stamp
        os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    message = str(caught.value)
    assert "\n" not in message and victim.name in message and "truncated" in message
    assert not out.exists()
    done = json.loads((partial_of(out) / "progress.json").read_text())["done"]
    assert done and "2" not in done and not [p for p in partial_of(out).iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    capsys.readouterr()
    _, resumed = prune_streamed(sharded, out, config, calib, EngineOptions(device="cpu"))
    assert f"resuming after {len(done)} finished blocks" in capsys.readouterr().err
    _, whole = prune_streamed(sharded, tmp_path / "whole", config, calib, EngineOptions(device="cpu"))
    assert_same_folder(whole, resumed)
