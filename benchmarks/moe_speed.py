"""Size and speed of a pruned mixture-of-experts model: a real MoE shape with random weights (issue 32).

    python benchmarks/moe_speed.py                                  # GPU: OLMoE-1B-7B shape, bf16, all variants
    python benchmarks/moe_speed.py --shape qwen3-30b-a3b --layers 24  # GPU: Qwen3-30B-A3B shape, its first 24 blocks
    python benchmarks/moe_speed.py --variants 24 --prompt-lengths 512 --batches 1,8 --new-tokens 16 --repeats 3  # GPU: 2:4, short
    python benchmarks/moe_speed.py --tiny                           # CPU: a tiny config, checks the script runs

Variants, each built from the same seeded random weights on the device, measured one at a time in one
process (``secateurs.evaluate.speed.measure``: weights, prefill, decode by the fastest method, peak):

- dense, under each of transformers' experts implementations (``grouped_mm``, its default, and
  ``batched_mm``): the fastest is the baseline every ratio is over;
- experts removed: half of each layer's routed experts (a seeded random half: speed does not depend on
  which), the router's rows sliced, as ``secateurs experts --keep 0.5`` leaves it;
- 2:4 experts: every routed expert's matrices pruned by magnitude to 2:4 and held in the stored format
  (``SparseExperts``: each expert a ``SparseLinear`` on the sparse dispatcher), attention and routers dense;
  its logits are checked against the masked dense model under transformers' eager experts (the same
  per-expert loop) before it is timed, and the script stops if they disagree;
- both.

What expert removal changes is memory, not the bytes a token reads: a token still visits top-k experts
of the same size, so batch-1 decode stays where it was and only weights and peak memory shrink
(and, at larger batches, fewer distinct experts are read per step). 2:4 shrinks the bytes every routed
expert reads; ``SparseExperts`` picks its routed experts on the host (one ``.tolist()`` per layer), so
its decode step cannot be captured in a CUDA graph and runs eager: the table says which method each
variant's decode used.

How much is measured: ``--prompt-lengths`` (default 512,2048), ``--batches`` (decode batch sizes, default
1,8,32), ``--new-tokens`` (decode steps timed, default 64), ``--warmup`` and ``--repeats`` (untimed and timed
runs of each prefill and decode measurement, default 2 and 5): the fields of ``SpeedConfig``. A 2:4 variant
decodes eagerly, one host read per layer per step, so its decode costs (warmup + repeats) x new tokens
eager steps per batch: fewer of them make a short GPU call possible.

Where the time goes: every phase prints when it starts and how long it took, with the seconds since the
run began (build, prune, sparsify, logits check, then measure's warm-up forwards, each prompt length's
prefill and each batch's decode by each method), so a run cut off by a time limit shows the phase it was
in; the JSON, saved as each phase starts and ends, holds every finished phase's seconds (``phase_seconds``)
and the phase running when it was saved (``phase_running``).

A (variant, implementation) that runs out of GPU memory is recorded in the notes (where, and torch's
first line) and the run goes on to the next. ``batched_mm`` copies each token's top-k expert matrices,
so it is measured only at the prompt lengths and decode batches whose copies fit the free memory; the
others are named in the notes. The baseline is the fastest dense run among those measured at every size.
Results go to benchmarks/results/moe_speed.json (``--out`` to write elsewhere), rewritten after every
variant with ``"partial": true`` until the last one is done, so a cut-off run keeps what it measured.
A ``--tiny`` run saves only when given ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.errors import UsageError
from secateurs.evaluate.speed import SpeedConfig, SpeedResult, measure, ratios
from secateurs.kernels import sparsify
from secateurs.kernels.linear import fallback_notes, plans
from secateurs.model.arch import spec_for
from secateurs.model.experts import keep_experts
from secateurs.model.linear import weight_matrix
from secateurs.sparsity.masks import nm_mask

from records import save_results

RESULTS = Path(__file__).resolve().parent / "results"
# Public configs of the two shapes (their config.json values that decide the work per token).
SHAPES = {
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
                                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                                  max_position_embeddings=4096)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
                                        max_position_embeddings=40960, decoder_sparse_step=1, mlp_only_layers=[])),
    "tiny": ("olmoe", dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=128,
                           max_position_embeddings=256, eos_token_id=2, pad_token_id=1, bos_token_id=0)),
}
IMPLEMENTATIONS = ("grouped_mm", "batched_mm")
VARIANTS = ("dense", "experts50", "24", "experts50+24")


class Progress:
    """Prints each phase of the run as it starts and when it ends, with the seconds since the run began,
    keeps every finished phase's seconds per label and the phase now running, and calls ``checkpoint`` (the
    partial save) at both ends: a GPU call cut off by its time limit printed nothing for minutes and saved
    nothing, so where its time went was unknown (issue 32's first 2:4 run)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.seconds: dict[str, dict[str, float]] = {}
        self.running: str | None = None
        self.checkpoint: Callable[[], None] | None = None

    def say(self, label: str, text: str) -> None:
        print(f"{label}: {text} [{time.time() - self.started:.0f}s]", flush=True)

    def _saved(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint()

    @contextmanager
    def phase(self, label: str, name: str) -> Iterator[list[str]]:
        """Announce ``name``, run the block, then print its seconds and whatever outcome it appended to
        the yielded list; the start is printed (and saved) first so that a cut-off run shows the phase it was in."""
        self.say(label, f"{name} ...")
        self.running = f"{label}: {name}"
        self._saved()
        outcome: list[str] = []
        start = time.time()
        yield outcome
        took = time.time() - start
        self.seconds.setdefault(label, {})[name] = round(took, 2)
        self.running = None
        self.say(label, f"{name}: {', '.join(outcome) or 'done'} in {took:.1f}s")
        self._saved()


def build(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype, implementation: str):
    """The shape's model with random weights (seed 0), allocated and initialised on ``device``."""
    model_type, values = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **{**values, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=implementation).eval()
    return model, spec_for(model)


def remove_half(model, spec) -> int:
    """Half of every MoE layer's routed experts removed (a seeded random half), router rows sliced, config updated."""
    gen = torch.Generator().manual_seed(0)
    kept_count = 0
    for block in spec.blocks_of(model):
        experts = spec.experts_of(block)
        if experts is None:
            continue
        count = experts.gate_up_proj.shape[0]
        kept = torch.randperm(count, generator=gen)[: count // 2].sort().values
        keep_experts(experts, spec.router_of(block), kept)
        kept_count = len(kept)
    setattr(spec.text_config(model.config), spec.moe.experts_key, kept_count)
    return kept_count


@torch.no_grad()
def experts_to_24(model, spec) -> None:
    """Every routed expert matrix pruned to 2:4 by magnitude, in place (attention, routers, shared experts dense)."""
    for path, module in spec.named_linears(model).items():
        if ".experts." in path:  # the routed experts' views (a shared expert is ``shared_expert``)
            w = weight_matrix(module)
            w.mul_(nm_mask(w.abs(), 2, 4).to(w.dtype))


def gathered_bytes_per_token(model, spec) -> int:
    """Bytes transformers' ``batched_mm`` copies per token in one MoE layer: each of its top-k experts'
    gate_up and down matrices (the down copies are made while the gate_up ones are still held)."""
    experts = next(e for e in map(spec.experts_of, spec.blocks_of(model)) if e is not None)
    _, top_k = spec.expert_counts(model.config)
    return top_k * (experts.gate_up_proj[0].nbytes + experts.down_proj[0].nbytes)


def fitting(config: SpeedConfig, per_token: int, free: int) -> tuple[SpeedConfig, list[str]]:
    """``config`` without the prompt lengths and decode batches (their ``decode_prompt``-token prefill
    counted) whose gathered expert copies exceed ``free`` bytes, and the skipped ones in words."""
    lengths = tuple(n for n in config.prompt_lengths if n * per_token <= free)
    batches = tuple(b for b in config.decode_batches if b * config.decode_prompt * per_token <= free)
    skipped = [f"prefill at {n} tokens" for n in config.prompt_lengths if n not in lengths]
    skipped += [f"decode at batch {b}" for b in config.decode_batches if b not in batches]
    return replace(config, prompt_lengths=lengths, decode_batches=batches), skipped


def prepare(model, spec, variant: str, implementation: str, device: torch.device, dtype: torch.dtype,
            notes: dict, progress: Progress) -> None:
    """Prune the freshly built dense model into ``variant`` in place, checking a 2:4 variant's stored-format
    logits against the masked dense model (the script exits if they disagree); facts go to ``notes``."""
    if "experts50" in variant:
        with progress.phase(variant, "remove half the experts"):
            notes[variant] = f"{remove_half(model, spec)} experts kept per layer"
    if "24" not in variant.replace("experts50", ""):
        return
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with progress.phase(variant, "prune the experts to 2:4, reference logits"):
        experts_to_24(model, spec)
        # The reference runs transformers' eager experts, the per-expert loop SparseExperts runs, so only the
        # kernels' rounding differs: grouped_mm sums in another order, which in bf16 alone moves the logits
        # by about 1.5e-2 of their largest at two OLMoE layers (CPU), half the tolerance below.
        model.set_experts_implementation("eager")
        with torch.inference_mode():
            reference = model(ids).logits.float()
        model.set_experts_implementation(implementation)
    with progress.phase(variant, "sparsify (stored formats)"):
        report = sparsify(model, spec)
    tuned = len(plans())
    with progress.phase(variant, "logits check (the first sparse forward)") as outcome, torch.inference_mode():
        error = float((model(ids).logits.float() - reference).abs().max() / reference.abs().max())
        outcome.append(f"{len(plans()) - tuned} kernel plans tuned")
    print(f"{variant}: logits of the stored-format model vs the masked dense one: max rel error {error:.1e}")
    if not error <= (1e-5 if dtype == torch.float32 else 3e-2):
        sys.exit(f"{variant}: the stored-format model disagrees with the masked dense model ({error:.1e})")
    notes[f"{variant} stored"] = f"{report.sparse_bytes / report.dense_bytes:.3f} of the dense bytes of the swapped matrices"
    notes[f"{variant} logit error"] = error


def run_one(shape: str, layers: int | None, device: torch.device, dtype: torch.dtype, variant: str,
            implementation: str, label: str, speed: SpeedConfig, notes: dict, progress: Progress) -> SpeedResult | None:
    """One (variant, implementation) built, pruned and measured, or None with the reason in
    ``notes[f"{label} not measured"]`` when it cannot fit: running out of GPU memory must not cost the
    variants after it. Its model is freed when this returns (the caller collects the garbage)."""
    stage = "build"
    try:
        with progress.phase(label, "build"):
            model, spec = build(shape, layers, device, dtype, implementation)
        stage = "prune"
        prepare(model, spec, variant, implementation, device, dtype, notes, progress)
        stage = "measure"
        if implementation == "batched_mm" and device.type == "cuda":
            # batched_mm copies each token's top-k expert matrices (memory grows with tokens x expert size), so
            # only the sizes whose copies fit in nine tenths of the free memory are measured, the rest named.
            gc.collect()
            torch.cuda.empty_cache()
            speed, skipped = fitting(speed, gathered_bytes_per_token(model, spec),
                                     int(0.9 * torch.cuda.mem_get_info(device)[0]))
            if skipped:
                notes[f"{label} skipped"] = f"{', '.join(skipped)}: its expert copies would not fit in memory"
                print(f"{label}: skipped {notes[f'{label} skipped']}", flush=True)
            if not speed.prompt_lengths or not speed.decode_batches:
                notes[f"{label} not measured"] = "no prompt length or no decode batch fits"
                return None
        return measure(model, label, device, speed, phase=lambda name: progress.phase(label, name))
    except torch.OutOfMemoryError as error:
        notes[f"{label} not measured"] = f"out of memory at {stage}: {str(error).splitlines()[0]}"
        return None


def integers(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers (an argparse type): a typo is argparse's one-line error."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. 512,2048") from None


def speed_config(args: argparse.Namespace) -> SpeedConfig:
    """What ``measure`` runs: the flags given, else the full run's sizes (a ``--tiny`` run's are small)."""
    tiny = args.tiny
    given = {"prompt_lengths": args.prompt_lengths, "new_tokens": args.new_tokens, "warmup": args.warmup,
             "repeats": args.repeats}
    defaults = {"prompt_lengths": (16,) if tiny else (512, 2048), "new_tokens": 4 if tiny else 64,
                "warmup": 1 if tiny else 2, "repeats": 1 if tiny else 5}
    chosen = {key: defaults[key] if value is None else value for key, value in given.items()}
    speed = SpeedConfig(decode_batches=args.batches, decode_methods=tuple(args.decode_methods.split(",")), **chosen)
    speed.check()
    return speed


def summary(results: list[SpeedResult], batches: tuple[int, ...]) -> tuple[SpeedResult | None, dict]:
    """The baseline (the most complete dense run, as a batched_mm run may lack sizes that did not fit; the
    fastest at the first batch) and every other result's ratios over it."""
    candidates = [r for r in results if r.label.startswith("dense")] or results
    baseline = max(candidates, key=lambda r: (len(r.prefill_ms) + len(r.decode_tokens_per_s),
                                              r.decode_tokens_per_s.get(batches[0], 0.0)), default=None)
    return baseline, {r.label: ratios(baseline, r) for r in results if r is not baseline}


def main() -> dict:
    """Measure every requested variant, saving after each; returns what it saves last (a ``--tiny`` run
    without ``--out`` saves nothing)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="olmoe-1b-7b")
    parser.add_argument("--layers", type=int, default=None, help="Keep only the first N blocks (default: all).")
    parser.add_argument("--batches", type=integers, default=(1, 8, 32), help="Decode batch sizes (default 1,8,32).")
    parser.add_argument("--prompt-lengths", type=integers, default=None,
                        help="Prefill prompt lengths (default 512,2048; --tiny: 16).")
    parser.add_argument("--new-tokens", type=int, default=None, help="Decode steps timed per batch (default 64; --tiny: 4).")
    parser.add_argument("--warmup", type=int, default=None,
                        help="Untimed runs before each prefill and decode measurement (default 2; --tiny: 1).")
    parser.add_argument("--repeats", type=int, default=None,
                        help="Timed runs of each, median reported (default 5; --tiny: 1).")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--decode-methods", default="cuda-graph", help="cuda-graph and/or compile (eager is the fallback).")
    parser.add_argument("--tiny", action="store_true", help="A tiny config on the CPU: checks the script, no speed claim.")
    parser.add_argument("--out", type=Path, default=None,
                        help="Where the results JSON goes (default: benchmarks/results/moe_speed.json; "
                             "a --tiny run saves only here).")
    args = parser.parse_args()
    out = args.out if args.out is not None or args.tiny else RESULTS / "moe_speed.json"
    if out is not None and out.is_dir():
        parser.error(f"--out {out} is a folder; name the JSON file, e.g. {out / 'moe_speed.json'}")
    try:
        speed = speed_config(args)
    except UsageError as error:
        parser.error(str(error))
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:  # an unknown name would otherwise be measured as the dense model under its label
        parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    shape = "tiny" if args.tiny else args.shape
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("moe_speed.py needs a CUDA GPU (or --tiny to check the script on the CPU)")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    results: list[SpeedResult] = []
    notes: dict = {}
    progress = Progress()

    def payload(partial: bool) -> dict:
        baseline, table = summary(results, speed.decode_batches)
        return {
            "partial": partial,
            "shape": shape if not args.layers else f"{shape}, first {args.layers} blocks",
            "weights": "random (seed 0), built on the device",
            "dtype": str(dtype),
            "machine": {"gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                        "torch": torch.__version__, "python": platform.python_version()},
            "speed_config": vars(speed),
            "variants": variants,
            "seconds": round(time.time() - progress.started, 1),
            "phase_seconds": progress.seconds,
            "phase_running": progress.running,
            "baseline": baseline.label if baseline else None,
            "results": [r.to_dict() for r in results],
            "ratios_over_baseline": table,
            "notes": notes,
            "fallback_notes": fallback_notes(),
        }

    def checkpoint() -> None:
        """What is measured so far, saved so that it survives a run cut off later."""
        if out is not None:
            save_results(out, payload(partial=True))

    progress.checkpoint = checkpoint
    for variant in variants:
        implementations = IMPLEMENTATIONS if variant == "dense" else ("grouped_mm",)
        for implementation in implementations:
            label = variant if variant != "dense" else f"dense ({implementation})"
            result = run_one(shape, args.layers, device, dtype, variant, implementation, label, speed, notes, progress)
            if result is None:
                progress.say(label, f"not measured: {notes[f'{label} not measured']}")
            else:
                results.append(result)
                progress.say(label, f"weights {result.weight_mib:.0f} MiB, decode {result.decode_tokens_per_s} "
                                    f"({result.decode_mode}), prefill ms {result.prefill_ms}, peak {result.peak_mib} MiB")
            gc.collect()  # the model (and, after an out-of-memory error, its traceback's tensors) goes before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
            checkpoint()
    final = payload(partial=False)
    for label, ratio in final["ratios_over_baseline"].items():
        print(f"{label} / {final['baseline']}: {ratio}", flush=True)
    if out is None:
        print("tiny run: the script works; nothing saved (no speed claim from a tiny CPU model)")
        return final
    print("saved", save_results(out, final))
    return final


if __name__ == "__main__":
    main()
