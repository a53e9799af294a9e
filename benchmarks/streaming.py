"""Peak host memory of streaming (``prune --stream``) against the in-memory path, on CPU.

Each run is a fresh subprocess (load or stream, prune, write OUT) so its peak resident set size
(VmHWM) is the run's alone; a subprocess that only imports secateurs and torch gives the
floor every run pays. Models: SmolLM2-135M (float32, magnitude 50%, and Wanda 50% on 16 × 256
WikiText-2 tokens) and a random-weight Llama of TinyLlama-1.1B's shape (hidden 2048, MLP 5632,
32 heads / 4 KV heads, vocabulary 32000, bfloat16 shards written here) at two depths, so the table
shows whether memory grows with the number of layers. Both paths' outputs are compared tensor by
tensor (they must be bit-identical).

    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/streaming.py --depths 6,22

Prints the table and writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from records import save_results

RESULTS = Path(__file__).parent / "results"

# Peak RSS is read from /proc/self/status (VmHWM, this process's own high-water mark): ru_maxrss
# would also count the parent's pages at the fork that started the child.
CHILD = """
import json, sys, time
def peak_memory_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
mode, model, out, method, dtype, calib = sys.argv[1:7]
start = time.perf_counter()
if mode != "floor":
    import secateurs
    from secateurs.api import prune_streamed
    from secateurs.data.calib import CalibConfig
    config = secateurs.PruneConfig(method, 0.5)
    calib_config = CalibConfig("wikitext2", 16, 256, 0) if calib == "yes" else None
    engine = secateurs.EngineOptions(device="cpu")
    if mode == "memory":
        loaded = secateurs.load_model(model, dtype)
        report = secateurs.prune(loaded, config, calib_config, engine)
        secateurs.save(loaded, out, [report.stage_record()])
    else:
        report, _ = prune_streamed(model, out, config, calib_config, engine, dtype)
else:
    import secateurs  # noqa: F401  (what every run pays before touching a model)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_memory_mb()}))
"""


def random_llama(folder: Path, layers: int) -> Path:
    """A TinyLlama-1.1B-shaped Llama with random bfloat16 weights, one safetensors shard per block."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype="bfloat16")
    return random_llama_folder(folder, config, torch.bfloat16)


def random_llama_folder(folder: Path, config, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Path:
    """Write a random-weight model of ``config`` as one safetensors shard per block (plus one for the
    rest) with its index, never holding more than one block; reused by benchmarks/scale.py, which
    draws the numbers on the GPU (``device``): a 70B-shape block takes seconds there, minutes on a CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".random-llama-", dir=folder.parent))
    config.save_pretrained(tmp)
    generator = torch.Generator(device).manual_seed(seed)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        groups.setdefault(f"block{int(parts[2]):03d}" if parts[1] == "layers" else "rest", []).append(key)
    weight_map, total = {}, 0
    for i, (name, keys) in enumerate(sorted(groups.items())):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key in keys:
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(shapes[key], dtype=dtype)
            else:
                tensors[key] = (torch.randn(shapes[key], generator=generator, device=device) * 0.02).to(dtype).cpu()
            weight_map[key] = file
            total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    tmp.rename(folder)
    return folder


def run_child(mode: str, model: str, out: Path, method: str, dtype: str, calib: bool) -> dict:
    command = [sys.executable, "-c", CHILD, mode, model, str(out), method, dtype, "yes" if calib else "no"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of folder ``a`` equals ``b``'s, read one at a time (both may be large)."""
    where_b = {}
    for path in b.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            where_b.update({k: path for k in handle.keys()})
    seen = 0
    for path in sorted(a.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                if key not in where_b:
                    return False
                with safe_open(where_b[key], framework="pt") as other:
                    if not torch.equal(handle.get_tensor(key), other.get_tensor(key)):
                        return False
                seen += 1
    return seen == len(where_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="6,22", help="layer counts of the random 1.1B-shape Llama")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="secateurs-streaming-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = []
    if not args.skip_smollm2:
        from secateurs.model.sources import _shortcut_folder

        smol = str(_shortcut_folder("smollm2-135m"))
        cases += [("SmolLM2-135M (30 layers, fp32)", smol, "magnitude", "float32", False),
                  ("SmolLM2-135M (30 layers, fp32)", smol, "wanda", "float32", True)]
    for depth in [int(d) for d in args.depths.split(",")]:
        folder = random_llama(work / f"llama1b-{depth}", depth)
        cases.append((f"random Llama 1.1B shape, {depth} layers, bf16", str(folder), "magnitude", "bfloat16", False))
    floor = run_child("floor", "", work / "unused", "", "", False)
    print(f"floor (import secateurs + torch): {floor['peak_rss_mb']:.0f} MiB", flush=True)
    rows = []
    try:
        for label, model, method, dtype, calib in cases:
            size = sum(p.stat().st_size for p in Path(model).glob("*.safetensors")) / 2**20
            measured = {}
            for mode in ("memory", "stream"):
                out = work / f"out-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                measured[mode] = run_child(mode, model, out, method, dtype, calib)
                print(f"{label} {method} {mode}: {measured[mode]}", flush=True)
            equal = same_tensors(work / "out-memory", work / "out-stream")
            rows.append({
                "model": label, "method": method, "checkpoint_mib": round(size),
                "memory_peak_rss_mib": round(measured["memory"]["peak_rss_mb"]),
                "stream_peak_rss_mib": round(measured["stream"]["peak_rss_mb"]),
                "memory_seconds": round(measured["memory"]["seconds"], 1),
                "stream_seconds": round(measured["stream"]["seconds"], 1),
                "rss_ratio_stream_over_memory": round(measured["stream"]["peak_rss_mb"] / measured["memory"]["peak_rss_mb"], 3),
                "above_floor_ratio": round(max(measured["stream"]["peak_rss_mb"] - floor["peak_rss_mb"], 0.0)
                                           / max(measured["memory"]["peak_rss_mb"] - floor["peak_rss_mb"], 1.0), 3),
                "outputs_bit_identical": equal,
            })
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    header = ["model", "method", "ckpt MiB", "in-memory RSS", "stream RSS", "stream/mem", "above floor", "mem s", "stream s", "identical"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['checkpoint_mib']} | {r['memory_peak_rss_mib']} | {r['stream_peak_rss_mib']} | "
              f"{r['rss_ratio_stream_over_memory']:.2f} | {r['above_floor_ratio']:.2f} | {r['memory_seconds']} | "
              f"{r['stream_seconds']} | {r['outputs_bit_identical']} |")
    RESULTS.mkdir(exist_ok=True)
    result = {
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "command": "SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/streaming.py --depths " + args.depths,
        "floor_peak_rss_mib": round(floor["peak_rss_mb"]),
        "rows": rows,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_results(RESULTS / "streaming.json", result)


if __name__ == "__main__":
    main()
