"""Scale past one device: multi-GPU calibration and streamed 70B-shape pruning (issue 11's GPU numbers).

Parts, each writing benchmarks/results/scale_<part>*.json and printing its numbers:

``--part ranks`` (run once per process count, under torchrun): a random fp16 model of Llama-2-7B's
shape, identical on every rank (seeded), pruned in memory by Wanda 50% and SparseGPT 50% on 128 ×
2048 random calibration tokens split over the ranks. Records wall seconds, per-stage seconds and
peak GPU memory per rank, and a fingerprint of every mask so runs with 1 and N ranks can be
compared (equal up to floating-point reduction order)::

    torchrun --nproc-per-node 1 benchmarks/scale.py --part ranks
    torchrun --nproc-per-node 2 benchmarks/scale.py --part ranks
    python benchmarks/scale.py --part compare     # ratios and mask agreement of the two runs

``--part stream``: a random fp16 model of Llama-3-70B's shape (hidden 8192, 64 / 8 heads, MLP 28672,
vocabulary 128256) written as safetensors shards for a subset of its 80 layers, then pruned by
``prune_streamed`` (one block in memory) with Wanda 50% and SparseGPT 50% on 128 × 2048 WikiText-2
tokens, each in its own subprocess: seconds per layer, peak host RSS, peak GPU memory, and the time
extrapolated to 80 layers::

    SECATEURS_DATA=shared/data python benchmarks/scale.py --part stream --layers 2,4 --overlap on,off

``--overlap on,off`` runs each prune with the session's background reader and writer on and off.

``--part solve``: SparseGPT's solve of one 70B-shape block, peak GPU memory above the block and its
statistics, and with ``--before`` an earlier sparsegpt.py beside it (bit-equal weights checked)::

    python benchmarks/scale.py --part solve --before old_sparsegpt.py

``--shape tiny --device cpu`` runs any part on a toy shape, to check the script itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from records import save_results

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, vocab_size=32000),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       num_hidden_layers=80, vocab_size=128256),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=4, vocab_size=49152),
}


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    values = dict(SHAPES[shape])
    if layers is not None:
        values["num_hidden_layers"] = layers
    return LlamaConfig(**values, max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16")


def part_ranks(args) -> None:
    """One process count, in memory: every rank builds the same random model and prunes its share."""
    from transformers import AutoModelForCausalLM

    from secateurs.engine.distributed import DistributedHooks, init_from_env
    from secateurs.engine.sequential import EngineOptions, run_blocks
    from secateurs.model.arch import spec_for
    from secateurs.sparsity.base import SparsityTarget
    from secateurs.sparsity.registry import method_class

    device = torch.device(args.device)
    group = init_from_env(device)
    world, rank = (group.world, group.rank) if group else (1, 0)
    config = llama_config(args.shape)
    ids = torch.randint(0, config.vocab_size, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for method in ("wanda", "sparsegpt"):
        torch.manual_seed(0)
        with device:  # built and initialised where it runs: a 7B built on the CPU takes minutes per rank
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float16 if device.type == "cuda" else torch.float32).eval()
        model.requires_grad_(False)
        spec = spec_for(model)
        engine, hooks = EngineOptions(device=str(device)), DistributedHooks(group) if group else None
        pruner = method_class(method)(SparsityTarget.build(0.5, "unstructured", config.num_hidden_layers))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        times = run_blocks(model, spec, pruner, ids, engine, method, hooks)
        seconds = time.perf_counter() - start
        masks = {}
        for i, block in enumerate(spec.blocks_of(model)):
            for name, module in spec.linears(block).items():
                zero = (module.weight == 0).cpu().numpy().tobytes()
                masks[f"{i}.{name}"] = hashlib.sha256(zero).hexdigest()[:16]
        rows.append({"method": method, "world": world, "seconds": seconds, "stages": times.stages,
                     "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                     "peak_rss_mib": peak_rss_mib(), "masks": masks})
        del model
    if rank == 0:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"scale_ranks_{world}.json").write_text(json.dumps(rows, indent=2) + "\n")
        for r in rows:
            print(f"{r['method']}: {world} rank(s) {r['seconds']:.1f} s, peak GPU {r['peak_gpu_gib']} GiB")


def part_compare(_args) -> None:
    one = {r["method"]: r for r in json.loads((RESULTS / "scale_ranks_1.json").read_text())}
    many_files = sorted(p for p in RESULTS.glob("scale_ranks_*.json") if p.stem != "scale_ranks_1")
    print("| method | ranks | seconds | vs 1 rank | peak GPU GiB/rank | masks equal to 1 rank |")
    print("|---|---|---|---|---|---|")
    out = []
    for path in many_files:
        for r in json.loads(path.read_text()):
            base = one[r["method"]]
            equal = sum(r["masks"][k] == v for k, v in base["masks"].items()) / len(base["masks"])
            row = {"method": r["method"], "world": r["world"], "seconds": r["seconds"], "speedup": base["seconds"] / r["seconds"],
                   "peak_gpu_gib": r["peak_gpu_gib"], "masks_equal_fraction": equal}
            out.append(row)
            print(f"| {r['method']} | {r['world']} | {r['seconds']:.1f} | {row['speedup']:.2f}× | {r['peak_gpu_gib']} | {equal:.3f} |")
    (RESULTS / "scale_compare.json").write_text(json.dumps(out, indent=2) + "\n")


def write_random_model(folder: Path, shape: str, layers: int, tokenizer: str | None, device: str = "cpu") -> Path:
    """Random fp16 shards for ``layers`` layers of ``shape``, one shard per block, plus a tokenizer.

    The tokenizer is SmolLM2's (from the packaged GGUF) unless ``tokenizer`` names a folder holding one,
    so a GPU machine without the GGUF can run this part.
    """
    sys.path.insert(0, str(Path(__file__).parent))
    from streaming import random_llama_folder

    from secateurs.model.sources import _shortcut_folder
    from secateurs.model.tokenizer import _try_tokenizer

    if not (folder / "model.safetensors.index.json").is_file():
        random_llama_folder(folder, llama_config(shape, layers), torch.float16, device=device)
        _try_tokenizer(Path(tokenizer) if tokenizer else _shortcut_folder("smollm2-135m")).save_pretrained(folder)
    return folder


STREAM_CHILD = """
import importlib, importlib.util, json, sys, time, torch
sys.path.insert(0, sys.argv[5])
from scale import peak_rss_mib
from secateurs.api import PruneConfig, prune_streamed
from secateurs.data.calib import CalibConfig
from secateurs.engine.sequential import EngineOptions
from secateurs.engine.stream import StreamSession
folder, out, method, device, _, n, seq, offload, overlap = sys.argv[1:10]


class Session(StreamSession):  # the same session with its background reader and writer on or off
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, overlap=overlap == "1")


for name in ("secateurs.api", "secateurs.sparsity.prune"):  # wherever prune_streamed finds the class
    module = importlib.import_module(name) if importlib.util.find_spec(name) else None
    if hasattr(module, "StreamSession"):
        module.StreamSession = Session
engine = EngineOptions(device=device, offload_activations=offload == "1")
start = time.perf_counter()
report, _ = prune_streamed(folder, out, PruneConfig(method, 0.5), CalibConfig("wikitext2", int(n), int(seq), 0), engine,
                           "float16" if device.startswith("cuda") else "float32")
gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
host = torch.cuda.host_memory_stats() if device.startswith("cuda") else {}
print(json.dumps({"seconds": time.perf_counter() - start, "stages": report.stage_seconds, "peak_gpu_gib": gpu,
                  "peak_rss_mib": peak_rss_mib(),
                  "pinned_gib": {k: round(v / 2**30, 3) for k, v in host.items() if "bytes" in k}}))
"""


def part_stream(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="secateurs-scale-"))
    total_layers = SHAPES[args.shape]["num_hidden_layers"]
    result = RESULTS / f"scale_stream_{args.shape}{args.tag}.json"
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        start = time.perf_counter()
        folder = write_random_model(work / f"{args.shape}-{layers}", args.shape, layers, args.tokenizer, args.device)
        print(f"{layers}-layer random model ready in {time.perf_counter() - start:.0f} s", flush=True)
        for overlap in args.overlap.split(","):
            for method in args.methods.split(","):
                out = work / f"out-{method}-{layers}"
                command = [sys.executable, "-c", STREAM_CHILD, str(folder), str(out), method, args.device,
                           str(Path(__file__).parent), str(args.n_samples), str(args.seq_len),
                           str(int(args.offload_activations)), str(int(overlap == "on"))]
                done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False, env=os.environ)
                shutil.rmtree(out, ignore_errors=True)  # the disk holds the inputs, not every output
                if done.returncode:
                    raise SystemExit(f"{method} on {layers} layers failed (its stderr is above)")
                r = json.loads(done.stdout.strip().splitlines()[-1])
                r.update(method=method, layers=layers, overlap=overlap == "on", offload_activations=args.offload_activations,
                         per_layer_s=r["seconds"] / layers, stages_per_layer={k: v / layers for k, v in r["stages"].items()})
                rows.append(r)
                print(f"{method} overlap {overlap}, {layers} layers: {r['seconds']:.1f} s, {r['per_layer_s']:.1f} s/layer, "
                      f"peak GPU {r['peak_gpu_gib']} GiB, RSS {r['peak_rss_mib']:.0f} MiB, stages/layer "
                      + ", ".join(f"{k} {v:.2f}" for k, v in r["stages_per_layer"].items()), flush=True)
                _extrapolate(rows, total_layers, (method, overlap == "on"))
                RESULTS.mkdir(exist_ok=True)
                result.write_text(json.dumps(rows, indent=2) + "\n")


def _extrapolate(rows: list[dict], total_layers: int, key: tuple[str, bool]) -> None:
    """Fixed costs (start-up, capture, the last shard) cancel in the difference between two depths:
    the shallowest run plus the marginal seconds per layer for the remaining layers."""
    runs = sorted((r for r in rows if (r["method"], r["overlap"]) == key), key=lambda r: r["layers"])
    if len(runs) > 1 and runs[-1]["layers"] > runs[0]["layers"]:
        marginal = (runs[-1]["seconds"] - runs[0]["seconds"]) / (runs[-1]["layers"] - runs[0]["layers"])
        full = runs[0]["seconds"] + marginal * (total_layers - runs[0]["layers"])
        runs[-1].update(marginal_s_per_layer=marginal, extrapolated_full_min=full / 60)
        print(f"{key[0]} overlap {'on' if key[1] else 'off'}: marginal {marginal:.1f} s/layer, "
              f"{total_layers} layers ≈ {full / 60:.1f} min", flush=True)


def part_solve(args) -> None:
    """SparseGPT's solve of one 70B-shape block (the seven linears, random weights, Hessians of 8192
    random tokens): peak GPU memory above the block and its statistics, seconds, and, with
    ``--before FILE`` (an older sparsegpt.py, e.g. ``git show 7ba190b:src/secateurs/sparsity/sparsegpt.py``),
    the same for that version and whether the pruned weights are bit for bit equal."""
    import importlib.util

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    import secateurs.sparsity.sparsegpt as current
    from secateurs.engine.stats import Hessian
    from secateurs.sparsity.base import SparsityTarget

    versions = {"current": current}
    if args.before:
        spec = importlib.util.spec_from_file_location("secateurs.sparsity._sparsegpt_before", args.before)
        versions["before"] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = versions["before"]
        spec.loader.exec_module(versions["before"])
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = llama_config(args.shape)
    torch.manual_seed(0)
    with device:
        block = LlamaDecoderLayer(config, 0).to(dtype)
    for param in block.parameters():
        param.data.normal_(0, 0.02)
    feeds = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn", "self_attn.o_proj": "o",
             "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp", "mlp.down_proj": "down"}
    linears = {name: block.get_submodule(name) for name in feeds}
    generator = torch.Generator(device).manual_seed(1)
    widths = {"attn": config.hidden_size, "o": config.hidden_size, "mlp": config.hidden_size, "down": config.intermediate_size}
    inputs = {k: torch.randn(args.tokens, w, device=device, generator=generator).to(dtype) for k, w in widths.items()}
    dense = {name: module.weight.detach().clone() for name, module in linears.items()}
    rows, pruned = [], {}
    for label in [v for v in versions for _ in range(2)]:  # each twice: the first also warms up
        for name, module in linears.items():
            module.weight.data.copy_(dense[name])
        stats = {}
        for name, feed in feeds.items():
            stats[name] = {"hessian": Hessian(widths[feed], device)}
            stats[name]["hessian"].update(inputs[feed])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.perf_counter()
        versions[label].SparseGPT(SparsityTarget.build(0.5, "unstructured", 1)).process_block(0, block, linears, stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
        rows.append({"version": label, "seconds": time.perf_counter() - start, "solve_peak_above_block_and_stats_gib": peak})
        print(rows[-1], flush=True)
        pruned[label] = {name: module.weight.detach().clone() for name, module in linears.items()}
        del stats
    out = {"shape": args.shape, "tokens": args.tokens, "runs": rows}
    if "before" in pruned:
        out["weights_equal_to_before"] = all(torch.equal(pruned["before"][n], pruned["current"][n]) for n in feeds)
        print("pruned weights equal to the earlier version:", out["weights_equal_to_before"])
    RESULTS.mkdir(exist_ok=True)
    save_results(RESULTS / f"scale_solve_{args.shape}{args.tag}.json", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("ranks", "compare", "stream", "solve"), required=True)
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", default="6,12")
    parser.add_argument("--methods", default="wanda,sparsegpt", help="streamed methods, in order (--part stream)")
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--offload-activations", action="store_true", help="keep calibration activations in host memory")
    parser.add_argument("--overlap", default="on", help="on, off or on,off: background shard reads and writes (--part stream)")
    parser.add_argument("--before", default=None, help="an earlier sparsegpt.py to compare with (--part solve)")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens of the Hessians (--part solve)")
    parser.add_argument("--tag", default="", help="suffix of the results file name (--part stream)")
    parser.add_argument("--tokenizer", default=None, help="folder with a tokenizer (default: SmolLM2's)")
    parser.add_argument("--work", default=None, help="scratch folder for the streamed shards")
    args = parser.parse_args()
    args.shape = args.shape or ("llama3-70b" if args.part in ("stream", "solve") else "llama2-7b")
    {"ranks": part_ranks, "compare": part_compare, "stream": part_stream, "solve": part_solve}[args.part](args)


if __name__ == "__main__":
    main()
