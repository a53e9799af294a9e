"""Wanda and SparseGPT on a Llama-2-7B shape (GPU): secateurs and llm-compressor side by side, per stage.

The issue's reference, measured on an H100 for 8 of Llama-2-7B's 32 layers with 128 × 2048
calibration tokens and fp16 weights: llm-compressor 0.14 took 26 s (Wanda 50%), 162 s (SparseGPT
50%) and 171 s (SparseGPT 2:4), peak 5–13 GiB. This script builds the same shape with random fp16
weights (speed does not depend on the values) and prunes it with each tool in a fresh subprocess,
one case after the other on the same card, so time and peak GPU memory belong to that prune alone:

- secateurs: the engine; its wall time is split into capture / statistics / solve / propagate /
  transfer, beside the forward-pass floor (two passes over the calibration tokens at --peak-tflops).
- llm-compressor (when importable, e.g. its wheels on PYTHONPATH): ``oneshot``, with
  ``--llmc-batch-size`` (1 is its default).

``--placement gpu`` (default) puts the model and the calibration activations on the GPU for both
tools, each at its fastest; ``--placement cpu`` keeps the model in CPU memory (each layer moved to
the GPU in turn) and the activations in CPU memory, llm-compressor's default for activations and our
``offload_activations``: the least GPU memory either tool needs.

    python benchmarks/gpu_one_shot_timing.py                      # on the GPU machine, both tools
    python benchmarks/gpu_one_shot_timing.py --device cpu --dtype float32 --layers 2 --hidden 64 \\
        --intermediate 128 --heads 4 --n-samples 4 --seq-len 32    # a seconds-long smoke run

Writes benchmarks/results/gpu_one_shot_timing_<cuda|cpu>.json (or --results).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from records import save_results
from transformers import LlamaConfig, LlamaForCausalLM

RESULTS = Path(__file__).parent / "results"
LLMC_ISSUE_SECONDS = {("wanda", "unstructured"): 26.0, ("sparsegpt", "unstructured"): 162.0,
                      ("sparsegpt", "2:4"): 171.0}
CASES = [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]
TOOLS = ("secateurs", "llmcompressor")


def build(args: argparse.Namespace, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         num_hidden_layers=args.layers, vocab_size=32000, max_position_embeddings=args.seq_len)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, args.dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def calibration(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, 32000, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0))


def start_clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def stop_clock(device: torch.device, start: float) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30
    return time.perf_counter() - start, float("nan")


def achieved_sparsity(model: LlamaForCausalLM) -> float:
    """Mean fraction of zeros over the decoder layers' linears: proof that the tool pruned."""
    linears = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return sum(float((w == 0).float().mean()) for w in linears) / len(linears)


def worker_secateurs(args: argparse.Namespace, name: str, pattern: str) -> dict:
    from secateurs.engine.sequential import EngineOptions, run_blocks
    from secateurs.model.arch import spec_for
    from secateurs.sparsity.base import SparsityTarget
    from secateurs.sparsity.registry import method_class

    device = torch.device(args.device)
    on_gpu = args.placement == "gpu"
    model = build(args, args.device if on_gpu else "cpu")
    spec = spec_for(model)
    method = method_class(name)(SparsityTarget.build(0.5 if pattern == "unstructured" else None, pattern, args.layers))
    engine = EngineOptions(device=args.device, batch_size=args.batch_size, offload_activations=not on_gpu)
    start = start_clock(device)
    times = run_blocks(model, spec, method, calibration(args), engine, f"{name} {pattern}")
    seconds, peak = stop_clock(device, start)
    block_params = sum(p.numel() for p in spec.blocks_of(model)[0].parameters())
    floor = 2 * (2 * block_params * args.n_samples * args.seq_len) * args.layers / (args.peak_tflops * 1e12)
    return {"seconds": seconds, "peak_gib": peak, "stages": times.stages, "forward_floor_s": floor,
            "achieved": achieved_sparsity(model)}


def placeholder_tokenizer():
    """oneshot insists on a processor even for a pre-tokenised dataset; this one is never used to encode."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>", pad_token="<unk>")


def worker_llmcompressor(args: argparse.Namespace, name: str, pattern: str) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    device = torch.device(args.device)
    model = build(args, args.device if args.placement == "gpu" else "cpu")
    ids = calibration(args)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[name]
    recipe = modifier(sparsity=0.5, mask_structure="0:0" if pattern == "unstructured" else pattern,
                      targets=["Linear"], ignore=["re:.*lm_head"])
    with tempfile.TemporaryDirectory() as config_dir:
        model.config.save_pretrained(config_dir)
        model.config._name_or_path = config_dir  # oneshot re-reads the config from the model's source folder
        start = start_clock(device)
        oneshot(model=model, dataset=dataset, recipe=recipe, processor=placeholder_tokenizer(),
                num_calibration_samples=len(ids), max_seq_length=args.seq_len, shuffle_calibration_samples=False,
                batch_size=args.llmc_batch_size, sequential_offload_device=args.device if args.placement == "gpu" else "cpu")
        seconds, peak = stop_clock(device, start)
    return {"seconds": seconds, "peak_gib": peak, "batch_size": args.llmc_batch_size, "achieved": achieved_sparsity(model)}


def run_case(args: argparse.Namespace, tool: str, name: str, pattern: str) -> dict:
    """One prune in a fresh interpreter: its time and peak memory are its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{tool}:{name}:{pattern}", "--worker-out", out.name]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
        return json.loads(Path(out.name).read_text())


def num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def print_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\n{args.layers} layers of a {args.hidden}/{args.intermediate} Llama shape, {args.dtype}, "
          f"{args.n_samples} × {args.seq_len} calibration tokens, secateurs batch {args.batch_size}, "
          f"llm-compressor batch {args.llmc_batch_size}, {args.device}, placement {args.placement}\n")
    print("| method | secateurs s | llmc s | llmc s (issue) | speedup | peak GiB ours | peak GiB llmc "
          "| capture | statistics | solve | propagate | transfer | 2-pass forward floor s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ours, theirs = row.get("secateurs", {}), row.get("llmcompressor", {})
        st = ours.get("stages", {})
        speed = theirs["seconds"] / ours["seconds"] if "seconds" in ours and "seconds" in theirs else None
        print(f"| {row['method']} {row['pattern']} | {num(ours.get('seconds'), '.1f')} | {num(theirs.get('seconds'), '.1f')} "
              f"| {num(row['llmc_issue_s'], '.0f')} | {num(speed, '.1f')}{'×' if speed else ''} | {num(ours.get('peak_gib'), '.1f')} "
              f"| {num(theirs.get('peak_gib'), '.1f')} | "
              + " | ".join(f"{st.get(k, 0.0):.1f}" for k in ("capture", "statistics", "solve", "propagate", "transfer"))
              + f" | {num(ours.get('forward_floor_s'), '.2f')} |")
        for tool in TOOLS:
            if "error" in row.get(tool, {}):
                print(f"  {tool} failed: {row[tool]['error']}")


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
    parser.add_argument("--llmc-batch-size", type=int, default=1, help="llm-compressor's oneshot batch_size.")
    parser.add_argument("--placement", choices=["gpu", "cpu"], default="gpu",
                        help="gpu: model and activations on the GPU for both tools (fastest); cpu: model in CPU "
                             "memory, each layer moved to the GPU, activations kept in CPU memory (least GPU memory; "
                             "llm-compressor's default for activations, our --offload-activations).")
    parser.add_argument("--tools", default=",".join(TOOLS), help="Comma-separated: secateurs, llmcompressor.")
    parser.add_argument("--cases", default="", help="Comma-separated method:pattern (default: all three).")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="Dense matmul rate for the floor.")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        tool, name, pattern = args.worker.split(":", 2)
        work = worker_secateurs if tool == "secateurs" else worker_llmcompressor
        Path(args.worker_out).write_text(json.dumps(work(args, name, pattern)))
        return

    device = torch.device(args.device)
    shape = (args.layers, args.hidden, args.intermediate, args.heads, args.n_samples, args.seq_len, args.dtype)
    same_as_issue = device.type == "cuda" and shape == (8, 4096, 11008, 32, 128, 2048, "float16")
    cases = [tuple(c.split(":", 1)) for c in args.cases.split(",") if c] or CASES
    tools = [t for t in args.tools.split(",") if t]
    path = args.results or RESULTS / f"gpu_one_shot_timing_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, **{k: v for k, v in vars(args).items() if not k.startswith("worker")}}
    rows = []
    for name, pattern in cases:
        row = {"method": name, "pattern": pattern,
               "llmc_issue_s": LLMC_ISSUE_SECONDS.get((name, pattern)) if same_as_issue else None}
        rows.append(row)
        for tool in tools:
            row[tool] = run_case(args, tool, name, pattern)
            print(json.dumps({"method": name, "pattern": pattern, "tool": tool, **row[tool]}), flush=True)
            save_results(path, {"config": meta, "rows": rows})
    print_table(args, rows)

if __name__ == "__main__":
    main()
