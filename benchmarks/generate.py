"""``secateurs generate`` against the benchmark's decode on the same model (issue 28: within 5%).

    python benchmarks/generate.py                              # GPU: Llama-2-7B shape (random fp16), dense and 2:4
    python benchmarks/generate.py --layers 4 --new-tokens 64   # a smoke run
    python benchmarks/generate.py --model OUT                  # a saved model (e.g. a --export sparse folder), as stored

For each model and decode method, ``bench``'s decode (:func:`secateurs.evaluate.speed.decode`: a static
cache, ``--new-tokens`` greedy steps replayed back to back, median of repeats) and ``secateurs.generate``
(the code ``secateurs generate`` runs: the same decoder, plus reading each token on the host, streaming
it as text and stopping at the end token) run on the same weights in the same process, one after the
other; the ratio generate / bench is what the goal bounds. The random model takes SmolLM2's tokenizer,
so its vocabulary is SmolLM2's 49,152 instead of Llama-2's 32,000 (the same in both columns). Results
go to benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from records import save_results
from sparse_kernels import LLAMA2_7B, _prune, machine
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import secateurs
from secateurs.evaluate.speed import SpeedConfig, _timer, decode
from secateurs.kernels import sparse_layers, sparsify
from secateurs.model.arch import spec_for
from secateurs.model.load import LoadedModel, load_model, model_folder

RESULTS = Path(__file__).resolve().parent / "results"


def random_llama(layers: int, vocab: int, device: torch.device) -> torch.nn.Module:
    """The Llama-2-7B shape with random fp16 weights, built on ``device``."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **{**LLAMA2_7B, "num_hidden_layers": layers, "vocab_size": vocab})
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()


def compare(loaded: LoadedModel, label: str, prompt: str, args, device: torch.device) -> list[dict]:
    """Bench decode and generate's decode, per method, on one model."""
    rows = []
    prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    for method in args.decode_methods.split(","):
        config = SpeedConfig(decode_batches=(1,), decode_prompt=prompt_tokens, new_tokens=args.new_tokens,
                             decode_methods=(method,), warmup=1, repeats=args.repeats)
        bench_rate = decode(loaded.model, config, device, _timer(device))[0][1]
        runs = [secateurs.generate(loaded, prompt, args.new_tokens, method=method, device=str(device))
                for _ in range(args.repeats)]
        generate_rate = statistics.median(r.decode_tokens_per_s or 0.0 for r in runs)
        row = {"model": label, "method": method, "prompt_tokens": prompt_tokens, "new_tokens": len(runs[-1].tokens),
               "bench_decode_tok_s": bench_rate, "generate_decode_tok_s": generate_rate,
               "generate_prefill_tok_s": statistics.median(r.prefill_tokens_per_s for r in runs),
               "ratio": generate_rate / bench_rate, "path": runs[-1].path, "notes": runs[-1].notes}
        print(f"{label:>6} {method:>10}: bench {bench_rate:7.1f} tok/s, generate {generate_rate:7.1f} tok/s "
              f"({row['ratio']:.3f}x; {row['new_tokens']} new tokens; {row['path']})", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a saved model instead of the random Llama-2-7B shape")
    parser.add_argument("--patterns", default="dense,2:4", help="random model: dense and/or 2:4 (on the sparse kernels)")
    parser.add_argument("--layers", type=int, default=32, help="random model: decoder layers (32 = Llama-2-7B)")
    parser.add_argument("--decode-methods", default="cuda-graph,compile")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-words", type=int, default=32, help="the prompt: this many words of plain text")
    parser.add_argument("--tokenizer", default=None, help="random model: a tokenizer folder (default: SmolLM2-135M's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "generate.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    prompt = " ".join(("the quick brown fox jumps over the lazy dog".split() * args.prompt_words)[: args.prompt_words])
    rows = []
    if args.model is not None:
        loaded = load_model(args.model, "float16" if device.type == "cuda" else "float32")
        label = "sparse" if sparse_layers(loaded.model) else "model"
        rows += compare(loaded, label, prompt, args, device)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or model_folder("smollm2-135m"))
        for pattern in args.patterns.split(","):
            model = random_llama(args.layers, len(tokenizer), device)
            spec = spec_for(model)
            if pattern != "dense":
                _prune(model, spec, pattern)
                sparsify(model, spec)
            rows += compare(LoadedModel(model, tokenizer, spec, f"llama2-7b-{pattern}", None), pattern, prompt, args, device)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save_results(args.out, {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
