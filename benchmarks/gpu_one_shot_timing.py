"""Where the time goes: Wanda and SparseGPT per engine stage on a Llama-2-7B-shaped model (GPU).

The issue's reference, measured on an H100 for 8 of Llama-2-7B's 32 layers with 128 × 2048
calibration tokens and fp16 weights: llm-compressor 0.14 took 26 s (Wanda 50%), 162 s (SparseGPT
50%) and 171 s (SparseGPT 2:4), peak 5–13 GiB. This script builds the same shape with random fp16
weights (speed does not depend on the values), prunes it with the engine and prints, per method,
the wall time split into capture / statistics / solve / propagate / transfer, the peak GPU memory,
and the forward-pass floor (two passes over the calibration tokens at --peak-tflops).

    python benchmarks/gpu_one_shot_timing.py                      # on the GPU machine
    python benchmarks/gpu_one_shot_timing.py --device cpu --dtype float32 --layers 2 --hidden 64 \\
        --intermediate 128 --heads 4 --n-samples 4 --seq-len 32    # a seconds-long smoke run

Writes benchmarks/results/gpu_one_shot_timing_<cuda|cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from secateurs.engine.sequential import EngineOptions, run_blocks
from secateurs.model.arch import spec_for
from secateurs.sparsity.base import SparsityTarget
from secateurs.sparsity.registry import method_class

RESULTS = Path(__file__).parent / "results"
LLMC_SECONDS = {("wanda", "unstructured"): 26.0, ("sparsegpt", "unstructured"): 162.0, ("sparsegpt", "2:4"): 171.0}
CASES = [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--n-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="Dense matmul rate for the floor.")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = (args.layers, args.hidden, args.intermediate, args.heads, args.n_samples, args.seq_len, args.dtype)
    same_as_reference = device.type == "cuda" and shape == (8, 4096, 11008, 32, 128, 2048, "float16")
    ids = torch.randint(0, 32000, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for name, pattern in CASES:
        model = build(args)
        spec = spec_for(model)
        cls = method_class(name)
        method = cls(SparsityTarget.build(0.5 if pattern == "unstructured" else None, pattern, args.layers))
        engine = EngineOptions(device=args.device, batch_size=args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run_blocks(model, spec, method, ids, engine, f"{name} {pattern}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        block_params = sum(p.numel() for p in spec.blocks_of(model)[0].parameters())
        floor = 2 * (2 * block_params * ids.numel()) * args.layers / (args.peak_tflops * 1e12)
        reference = LLMC_SECONDS.get((name, pattern)) if same_as_reference else None
        row = {"method": name, "pattern": pattern, "seconds": seconds, "peak_gib": peak,
               "stages": engine.stage_seconds, "forward_floor_s": floor,
               "llmcompressor_s": reference, "speedup": reference / seconds if reference else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model, method
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{args.layers} layers of a {args.hidden}/{args.intermediate} Llama shape, {args.dtype}, "
          f"{args.n_samples} × {args.seq_len} calibration tokens, batch {args.batch_size}, {args.device}\n")
    print("| method | s | llmc 0.14 s (issue) | speedup | peak GiB | capture | statistics | solve | propagate "
          "| transfer | 2-pass forward floor s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        st = row["stages"]
        ref = "—" if row["llmcompressor_s"] is None else f"{row['llmcompressor_s']:.0f}"
        speed = "—" if row["speedup"] is None else f"{row['speedup']:.1f}×"
        print(f"| {row['method']} {row['pattern']} | {row['seconds']:.1f} | {ref} | {speed} | {row['peak_gib']:.1f} | "
              + " | ".join(f"{st.get(k, 0.0):.1f}" for k in ("capture", "statistics", "solve", "propagate", "transfer"))
              + f" | {row['forward_floor_s']:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", **vars(args)}
    (RESULTS / f"gpu_one_shot_timing_{device.type}.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
