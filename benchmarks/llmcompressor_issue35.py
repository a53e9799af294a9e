"""Issue 35's missing baseline: llm-compressor's SparseGPT on the issue-35 protocol.

For one model (a GGUF file, read by secateurs' ``load_model``) and one calibration seed: the dense
perplexity, then llm-compressor's ``oneshot`` with its ``SparseGPTModifier`` (its default dampening
and block size, ``targets=["Linear"]``, lm_head ignored, as ``compare_llmcompressor.py`` drove it)
at 2:4, 50% and 70%, each from the same dense weights. llm-compressor gets exactly secateurs'
calibration token windows (``calibration_ids(CalibConfig("wikitext2", 16, 512, seed=s))``: 16 × 512
tokens of the local WikiText-2 validation text, no shuffling), and every result is scored by
secateurs' ``evaluate_perplexity`` on the first 40 × 512 windows of WikiText-2 raw test, float32 —
the same numbers as ``reconstruct_models.py`` writes for our SparseGPT.

llm-compressor prunes a deep copy of the model (it wraps modules for offloading); the pruned weights
are copied back into secateurs' own model for scoring. llm-compressor is not a dependency of
secateurs: install it beside it (``pip install --no-deps --target DIR`` of llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, datasets, loguru, pydantic, dill, multiprocess) and put DIR on PYTHONPATH.

    SECATEURS_DATA=DATA PYTHONPATH=DIR:src python benchmarks/llmcompressor_issue35.py MODEL.gguf \\
        --name smollm2-135m --seed 0 --device cuda --results benchmarks/results/llmcompressor_issue35_smollm2-135m-seed0.json
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from records import save_results

PATTERNS = {"2:4": ("2:4", 0.5), "50": ("0:0", 0.5), "70": ("0:0", 0.7)}
LABELS = {"2:4": "2:4", "50": "50%", "70": "70%"}


def prune_llmcompressor(model: torch.nn.Module, tokenizer, ids: torch.Tensor, structure: str, sparsity: float,
                        seed: int) -> dict:
    """Run llm-compressor's SparseGPT on a copy of ``model``; return the pruned state dict (CPU)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    work = copy.deepcopy(model)
    # oneshot re-reads the config from model.config.name_or_path: point it at a saved copy.
    folder = tempfile.mkdtemp(prefix="llmc-config-")
    work.config.save_pretrained(folder)
    work.config._name_or_path = folder
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    torch.manual_seed(seed)
    oneshot(model=work, processor=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    state = {k: v.detach().to("cpu").clone() for k, v in work.state_dict().items()}
    del work
    return state


def measure(args: argparse.Namespace) -> None:
    import llmcompressor

    from secateurs.api import evaluate_perplexity
    from secateurs.data.calib import CalibConfig, calibration_ids
    from secateurs.model.load import load_model

    loaded = load_model(args.model)
    loaded.model.to(torch.float32).to("cpu")
    dense = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    ids = calibration_ids(CalibConfig("wikitext2", args.n_samples, args.seq_len, seed=args.seed), loaded.tokenizer)
    device = args.device
    card = torch.cuda.get_device_name() if torch.cuda.is_available() and device != "cpu" else "cpu"

    def ppl() -> float:
        value = evaluate_perplexity(loaded, ["wikitext2"], 512, args.windows, device=device)["wikitext2"].ppl
        loaded.model.to("cpu")
        return value

    payload = {"model": args.name, "seed": args.seed, "tool": f"llmcompressor {llmcompressor.__version__}",
               "method": "SparseGPTModifier (defaults; targets Linear, lm_head ignored)",
               "calibration": f"{args.n_samples} x {args.seq_len} wikitext2 valid (secateurs calibration_ids, seed {args.seed})",
               "eval": f"wikitext2 raw test, first {args.windows} x 512 windows (secateurs evaluate_perplexity)",
               "card": card, "rows": []}
    if args.skip_dense:  # a slow machine: the dense ppl is the one already measured for our rows
        payload["dense_ppl"] = None
    else:
        payload["dense_ppl"] = ppl()
        print(f"{args.name} seed {args.seed} dense {payload['dense_ppl']:.3f} ({card})", flush=True)
    for key in args.patterns.split(","):
        structure, sparsity = PATTERNS[key]
        loaded.model.load_state_dict(dense)
        start = time.perf_counter()
        state = prune_llmcompressor(loaded.model, loaded.tokenizer, ids, structure, sparsity, args.seed)
        seconds = time.perf_counter() - start
        missing = [k for k in dense if k not in state]
        loaded.model.load_state_dict({k: state.get(k, dense[k]) for k in dense})
        linears = [(n, m.weight) for n, m in loaded.model.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        achieved = sum(float((w == 0).float().mean()) for _, w in linears) / len(linears)
        value = ppl()
        row = {"pattern": LABELS[key], "variant": "llm-compressor SparseGPT", "ppl": value,
               "achieved": round(achieved, 4), "prune_s": round(seconds, 2), "keys_not_returned": missing}
        payload["rows"].append(row)
        save_results(args.results, payload)
        print(f"{args.name} llmcompressor sparsegpt {row['pattern']}: ppl {value:.3f}, achieved {achieved:.3f}, "
              f"{seconds:.1f} s", flush=True)
    loaded.model.load_state_dict(dense)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--name", default="model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--patterns", default="2:4,50,70", help=f"any of {', '.join(PATTERNS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-dense", action="store_true", help="do not measure the dense perplexity (slow CPU runs)")
    parser.add_argument("--results", default="benchmarks/results/llmcompressor_issue35.json")
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
