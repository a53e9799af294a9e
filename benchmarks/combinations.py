"""Which pruning families, alone or combined, give the best model at one parameter budget (issue #12).

    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/combinations.py      # full run
    SECATEURS_DATA=../shared/data nice -n 10 python benchmarks/combinations.py --quick  # smoke test

Every configuration is one recipe (``secateurs.run``) on SmolLM2-135M: its pruning stages, then the
same short masked-LoRA recovery (which measures WikiText-2 perplexity before and after it), then a
CPU ``bench`` of the final model beside the dense one in the same run (prefill latency of one
512-token prompt, median; latencies are compared as ratios to that same-run dense measurement, so
the load on a shared machine cancels as far as it can). All configurations use the same calibration
text, seed, recovery schedule and evaluation windows.

Matching the budget (``--budget``, default 0.70 of the decoder blocks' parameters): with ``n``
blocks, a budget ``b`` means removing ``R = n(1 − b)`` block-equivalents (9 of 30). Depth removes
whole blocks (angular distance, uncompensated unless ``--compensate``). 2:4 on a block removes half
of its weights, so 2:4 runs on ``2R`` blocks centred in the stack (the first and last blocks are the
ones every layer criterion here keeps). Width removes MLP channels (one gate row, one up row and one
down column each; KV groups are not touched, because SmolLM2 has 3 per layer and they would move the
budget in 8% steps), rounded to a multiple of 4 so that 2:4 can follow. In a two-family combination
the coarser family (depth, else 2:4) takes ``ceil(R/2)`` block-equivalents (5 of 9) and the other the
rest. Sparse configurations are counted by their non-zero weights; the table reports stored and
non-zero parameters. 2:4 on every block is also run, at its natural 50%, below the budget, and said so.

Each configuration's work folder is ``--work/NAME`` (git-ignored ``runs/`` by default): a rerun of the
same command reuses every finished stage (the recipe runner's content hashes), so an interrupted run
resumes. Results are written to ``--results`` after every configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig

import secateurs
from secateurs.model.load import LoadedModel, load_model

from records import save_results

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "combinations.json"
WORK = HERE.parent / "runs" / "combinations"
NM = 4  # the M of 2:4: MLP widths must stay divisible by it when 2:4 follows a width stage
QUICK = {  # tiny settings for a smoke test: every stage runs, the numbers mean nothing
    "steps": 2, "warmup": 0, "batch_size": 2, "train_seq_len": 64, "windows": 2, "calib_samples": 8,
    "calib_seq_len": 128, "repeats": 1, "bench_warmup": 0, "new_tokens": 2, "work": WORK.with_name("combinations-quick"),
}


@dataclass(frozen=True)
class Shape:
    """What the budget arithmetic needs from the model config (a Llama-style gated MLP)."""

    layers: int
    mlp_width: int
    attention_params: int  # q, k, v, o weights of one block
    mlp_params: int  # gate, up, down weights of one block

    @classmethod
    def of(cls, config: PretrainedConfig) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q = config.num_attention_heads * head_dim
        kv = config.num_key_value_heads * head_dim
        return cls(
            config.num_hidden_layers, config.intermediate_size,
            config.hidden_size * (2 * q + 2 * kv), 3 * config.hidden_size * config.intermediate_size,
        )

    @property
    def attention_share(self) -> float:
        return self.attention_params / (self.attention_params + self.mlp_params)

    def mlp_keep(self, block_fraction: float) -> int:
        """MLP channels (a multiple of 4) that leave ``block_fraction`` of a block's weights."""
        share = self.attention_share
        exact = self.mlp_width * (block_fraction - share) / (1 - share)
        return int(round(exact / NM)) * NM

    def width_fraction(self, kept: int) -> float:
        return self.attention_share + (1 - self.attention_share) * kept / self.mlp_width


@dataclass(frozen=True)
class Configuration:
    """One row: its name, a short description of the chain, the pruning stages and the planned budget."""

    name: str
    chain: str
    stages: list[dict]
    planned: float  # fraction of dense block weights left (non-zero), from the arithmetic above
    on_budget: bool = True


def depth_stage(remove: int, compensate: bool) -> dict:
    """Angular distance (Gromov et al.): the best criterion in the layer-pruning section (lowest
    perplexity at 3 and 6 layers), and forward-only, so cheap. Uncompensated unless asked: at 9
    layers (10-18) the compensation raised WikiText-2 perplexity from 293 to 1127 (first 2 windows,
    8,192 calibration tokens), although it lowered it at 3 and 6 layers."""
    return {"layers": {"method": "angular", "remove": remove, "compensate": compensate}}


def width_stage(shape: Shape, kept: int) -> dict:
    """FLAP, uniform over layers, MLP channels only: the best one-shot width method in the width
    section (WikiText-2 46.9 vs LLM-Pruner 55.0 at 20%), and no gradients."""
    return {"width": {"method": "flap", "ratio": (shape.mlp_width - kept) / shape.mlp_width, "target": "channels"}}


def nm_stage(blocks: int, on: int) -> dict:
    """SparseGPT 2:4 on ``on`` consecutive blocks centred in a stack of ``blocks`` (the rest stay dense)."""
    fields: dict = {"method": "sparsegpt", "pattern": "2:4"}
    if on < blocks:
        start = (blocks - on) // 2
        fields["sparsity"] = [0.5 if start <= i < start + on else 0.0 for i in range(blocks)]
    return {"prune": fields}


def configurations(shape: Shape, budget: float, compensate: bool) -> list[Configuration]:
    """The rows, each tuned to ``budget`` of the block weights by the rules in the module docstring."""
    n = shape.layers
    angular = "(compensated)" if compensate else "(uncompensated)"
    removed = n * (1 - budget)  # block-equivalents to remove
    coarse = math.ceil(removed / 2)
    depth = round(removed)
    nm_only = round(2 * removed)
    width_only = shape.mlp_keep(budget)
    width_after_depth = shape.mlp_keep(budget * n / (n - coarse))
    nm_after_depth = round(2 * (removed - coarse))
    width_with_nm = shape.mlp_keep(budget / (1 - coarse / n))
    return [
        Configuration("dense", "no pruning, no recovery", [], 1.0),
        Configuration(f"depth -{depth}", f"angular -{depth} layers {angular}", [depth_stage(depth, compensate)], (n - depth) / n),
        Configuration(
            f"width mlp {width_only}", f"FLAP MLP {shape.mlp_width} -> {width_only}",
            [width_stage(shape, width_only)], shape.width_fraction(width_only),
        ),
        Configuration(
            f"2:4 on {nm_only}/{n}", f"SparseGPT 2:4 on blocks {(n - nm_only) // 2}-{(n - nm_only) // 2 + nm_only - 1}",
            [nm_stage(n, nm_only)], 1 - nm_only / (2 * n),
        ),
        Configuration(f"2:4 on {n}/{n}", "SparseGPT 2:4 on every block (natural 50%, below the budget)",
                      [nm_stage(n, n)], 0.5, on_budget=False),
        Configuration(
            f"depth -{coarse} + width mlp {width_after_depth}",
            f"angular -{coarse} layers {angular} -> FLAP MLP {shape.mlp_width} -> {width_after_depth}",
            [depth_stage(coarse, compensate), width_stage(shape, width_after_depth)],
            (n - coarse) / n * shape.width_fraction(width_after_depth),
        ),
        Configuration(
            f"depth -{coarse} + 2:4 on {nm_after_depth}/{n - coarse}",
            f"angular -{coarse} layers {angular} -> SparseGPT 2:4 on {nm_after_depth} centred blocks",
            [depth_stage(coarse, compensate), nm_stage(n - coarse, nm_after_depth)], (n - coarse - nm_after_depth / 2) / n,
        ),
        Configuration(
            f"width mlp {width_with_nm} + 2:4 on {2 * coarse}/{n}",
            f"FLAP MLP {shape.mlp_width} -> {width_with_nm} -> SparseGPT 2:4 on {2 * coarse} centred blocks",
            [width_stage(shape, width_with_nm), nm_stage(n, 2 * coarse)],
            shape.width_fraction(width_with_nm) * (1 - coarse / n),
        ),
    ]


def recipe(config: Configuration, args: argparse.Namespace) -> dict:
    """The configuration's pruning stages + the shared recovery (or, for dense, an eval) + the bench."""
    ppl = {"ppl": "wikitext2", "limit_windows": args.windows}
    bench = {
        "sparse": False, "device": "cpu", "prompt_lengths": "512", "batches": "1", "new_tokens": args.new_tokens,
        "warmup": args.bench_warmup, "repeats": args.repeats, "seed": args.seed,
    }
    if config.stages:  # the dense model measured again in the same run: latency as a ratio to it
        bench["baseline"] = args.model
    measure = [{"eval": {**ppl, "seq_len": args.eval_seq_len}}] if not config.stages else [{"recover": {
        "method": "lora", "steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup,
        "batch_size": args.batch_size, "seq_len": args.train_seq_len, "gradient_checkpointing": False,
        "device": args.device, **ppl, "eval_seq_len": args.eval_seq_len,
    }}]
    return {
        "model": args.model,
        "calib": {"source": "wikitext2", "n_samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": args.seed},
        "stages": [*config.stages, *measure, {"bench": bench}],
        "out": str(args.work / re.sub(r"[^a-z0-9]+", "-", config.name.replace(":", "of")).strip("-")),
    }


def block_parameters(loaded: LoadedModel) -> dict[str, int]:
    """Stored and non-zero parameters of the decoder blocks (weights, norms, FLAP's biases)."""
    params = [p for block in loaded.spec.blocks_of(loaded.model) for p in block.parameters()]
    return {
        "stored": sum(p.numel() for p in params),
        "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
        "model_stored": sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values()),
    }


def measure_row(config: Configuration, record: dict, dense_block: int) -> dict:
    """One table row from the recipe's record: perplexities, parameters, latency, stage times."""
    stages = {done["stage"]: done for done in record["stages"]}
    if "recover" in stages:
        results = stages["recover"]["results"]
        before, after = results["ppl_wikitext2_before"]["ppl"], results["ppl_wikitext2"]["ppl"]
    else:
        before = after = stages["eval"]["results"]["perplexity"]["wikitext2"]["ppl"]
    bench = stages["bench"]["results"]["results"]
    model, dense = bench[-1], bench[0]
    params = block_parameters(load_model(record["results"]["final_model"]))
    seconds = {done["stage"]: done["seconds"] for done in record["stages"]}
    pruning = sum(done["seconds"] for done in record["stages"] if done["stage"] in ("layers", "width", "prune"))
    return {
        "config": config.name, "chain": config.chain, "on_budget": config.on_budget, "planned_fraction": config.planned,
        "block_params_stored": params["stored"], "block_params_nonzero": params["nonzero"],
        "stored_fraction": params["stored"] / dense_block, "nonzero_fraction": params["nonzero"] / dense_block,
        "model_params_stored": params["model_stored"],
        "ppl_pruned": before, "ppl_recovered": after,
        "prefill_512_ms": model["prefill_ms"]["512"], "dense_prefill_512_ms": dense["prefill_ms"]["512"],
        "latency_vs_dense": model["prefill_ms"]["512"] / dense["prefill_ms"]["512"],
        "decode_tokens_per_s": model["decode_tokens_per_s"]["1"],
        "pruning_seconds": round(pruning, 1), "recover_seconds": seconds.get("recover", 0.0),
        "total_seconds": round(sum(seconds.values()), 1),
        "removed_layers": stages["layers"]["record"]["removed_layers"] if "layers" in stages else [],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| config | stages | block params stored (÷ dense) | non-zero (÷ dense) | ppl pruned | ppl recovered | "
        "prefill 512 ms (÷ dense, same run) | decode tok/s | prune s | recover s | total s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']}{'' if r['on_budget'] else ' (off budget)'} | {r['chain']} | "
            f"{r['block_params_stored']:,} ({r['stored_fraction']:.3f}) | {r['block_params_nonzero']:,} "
            f"({r['nonzero_fraction']:.3f}) | {r['ppl_pruned']:.2f} | "
            f"{r['ppl_recovered']:.2f} | {r['prefill_512_ms']:.0f} ({r['latency_vs_dense']:.2f}) | "
            f"{r['decode_tokens_per_s']:.1f} | {r['pruning_seconds']:.0f} | {r['recover_seconds']:.0f} | {r['total_seconds']:.0f} |"
        )
    return "\n".join(lines)


def latency_view(rows: list[dict]) -> str:
    """Rows by latency (as a ratio to the same-run dense model), with the latency-perplexity front:
    a row is on it when every faster row has a higher recovered perplexity."""
    ordered = sorted(rows, key=lambda r: r["latency_vs_dense"])
    lines = ["| prefill ÷ dense | config | non-zero ÷ dense | ppl recovered | best at this latency |", "|---|---|---|---|---|"]
    best = math.inf
    for r in ordered:
        front = r["ppl_recovered"] < best
        best = min(best, r["ppl_recovered"])
        lines.append(
            f"| {r['latency_vs_dense']:.2f} | {r['config']} | {r['nonzero_fraction']:.3f} | {r['ppl_recovered']:.2f} | "
            f"{'yes' if front else ''} |"
        )
    lines.append(
        "\n2:4 rows run dense on CPU (no sparse kernel speedup there: expect ÷ dense ≈ 1 plus noise); "
        "their GPU latency is in BENCHMARKS.md, \"Sparse execution\"."
    )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=float, default=0.70, help="Fraction of block parameters to keep.")
    parser.add_argument("--compensate", action="store_true", help="Compensate the depth stages (it hurt at 9 layers).")
    parser.add_argument("--steps", type=int, default=30, help="Masked-LoRA steps (same for every row).")
    parser.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (1e-4 barely moves in 30 steps).")
    parser.add_argument("--warmup", type=int, default=3, help="LoRA warm-up steps.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows for perplexity.")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="Timed bench runs (median).")
    parser.add_argument("--bench-warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16, help="Decode steps timed by the bench.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="Device for pruning and recovery (the bench is always CPU).")
    parser.add_argument("--only", default=None, help="Comma-separated row numbers (1 = dense) to run.")
    parser.add_argument("--work", type=Path, default=WORK, help="Work folders, one per configuration.")
    parser.add_argument("--results", type=Path, default=None, help=f"JSON to write (default {RESULTS}).")
    parser.add_argument("--quick", action="store_true", help="Tiny settings for a smoke test (results under --work).")
    if parser.parse_known_args()[0].quick:  # quick sizes are defaults, so explicit options still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args()
    if args.results is None:
        args.results = args.work / "combinations.json" if args.quick else RESULTS
    return args


def main() -> None:
    args = parse_args()
    dense = load_model(args.model)
    shape = Shape.of(dense.model.config)
    rows_wanted = configurations(shape, args.budget, args.compensate)
    if args.only:
        rows_wanted = [rows_wanted[int(i) - 1] for i in args.only.split(",")]
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("only", "results")}
    previous = json.loads(args.results.read_text()) if args.results.is_file() else {}
    rows = {r["config"]: r for r in previous.get("rows", [])} if previous.get("args") == settings else {}
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    )
    dense_block = block_parameters(dense)["stored"]
    del dense
    for config in rows_wanted:
        print(f"== {config.name}: {config.chain} (planned {config.planned:.4f} of block params)", flush=True)
        start = time.perf_counter()
        record = secateurs.run(recipe(config, args))
        row = measure_row(config, record, dense_block)
        row["script_seconds"] = round(time.perf_counter() - start, 1)
        rows[row["config"]] = row
        args.results.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": settings, "machine": machine, "dense_block_params": dense_block, "rows": list(rows.values())}
        save_results(args.results, payload)
        print(
            f"   kept {row['nonzero_fraction']:.4f} non-zero / {row['stored_fraction']:.4f} stored, ppl {row['ppl_pruned']:.2f} -> "
            f"{row['ppl_recovered']:.2f}, prefill {row['prefill_512_ms']:.0f} ms ({row['latency_vs_dense']:.2f} of dense), "
            f"{row['total_seconds']:.0f} s",
            flush=True,
        )
    print(f"\n{table(list(rows.values()))}\n\nMatched latency (sorted by prefill ÷ dense):\n\n{latency_view(list(rows.values()))}")
    print(f"\nsaved {args.results}")


if __name__ == "__main__":
    main()
