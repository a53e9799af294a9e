"""``secateurs demo``: the main job end to end on an embedded default, with no network or data files.

Loads SmolLM2-135M (shipped in a PyPI package), has it write its own calibration text and a separate
held-out text (seeded), prunes it, and prints dense vs pruned: perplexity on the held-out text, KL
divergence and top-1 agreement against the dense model, sparsity, time and memory.
"""

from __future__ import annotations

import copy
from typing import Annotated

import typer

from ..engine.options import EngineOptions
from ..schema import help_of
from ..sparsity.config import parse_sparsity
from ..sparsity.registry import method_names
from ..stages.flags import check_at_least, check_context, preflight
from ..stages.groups import LoadOptions
from .app import app
from .common import check_out_folder, friendly, out_console, table

Device = Annotated[str, typer.Option(help=help_of(EngineOptions, "device"))]
Overwrite = Annotated[bool, typer.Option(help=help_of(LoadOptions, "overwrite"))]

HELD_OUT_SEED_OFFSET = 1000


@app.command("demo")
@friendly
def demo_command(
    model: Annotated[str, typer.Option(help="Model to prune.")] = "smollm2-135m",
    method: Annotated[str, typer.Option(help=f"One of: {', '.join(method_names())}.")] = "wanda",
    sparsity: Annotated[str | None, typer.Option(help="Fraction to remove (default 0.5).")] = None,
    pattern: Annotated[str, typer.Option(help="unstructured or N:M.")] = "unstructured",
    n_samples: Annotated[int, typer.Option(help="Self-generated calibration sequences.")] = 16,
    eval_samples: Annotated[int, typer.Option(help="Self-generated held-out sequences.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for generation and sampling.")] = 0,
    device: Device = "auto",
    out: Annotated[str | None, typer.Option(help="Also save the pruned model here.")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Prune SmolLM2-135M on self-generated data and print a before / after table."""
    from ..api import PruneConfig, check_prune, prune, save
    from ..data.calib import CalibConfig, self_generated
    from ..evaluate.agreement import agreement
    from ..evaluate.perplexity import perplexity
    from ..model.load import load_model

    engine = EngineOptions(device=device)
    torch_device = engine.torch_device()
    check_at_least(1, n_samples=n_samples, eval_samples=eval_samples)
    config = PruneConfig(method, parse_sparsity(sparsity), pattern)
    calib = CalibConfig("self", n_samples, seq_len, seed)
    if out:
        check_out_folder(out, model, overwrite)
    skeleton = preflight(model)
    check_prune(skeleton, config, calib)
    check_context(skeleton, seq_len=seq_len)
    loaded = load_model(model)
    loaded.model.to(torch_device)
    held_out = self_generated(loaded.model, loaded.tokenizer, eval_samples, seq_len, seed + HELD_OUT_SEED_OFFSET)
    dense = copy.deepcopy(loaded.model)
    dense_ppl = perplexity(dense, held_out.flatten(), seq_len, device=torch_device)
    loaded.model.to("cpu")
    report = prune(loaded, config, calib, engine)
    loaded.model.to(torch_device)
    pruned_ppl = perplexity(loaded.model, held_out.flatten(), seq_len, device=torch_device)
    agree = agreement(loaded.model, dense, held_out, torch_device)
    rows = [
        ["sparsity of block linears", "0.0000", f"{report.achieved:.4f}"],
        ["perplexity, held-out self-generated text", f"{dense_ppl.ppl:.3f}", f"{pruned_ppl.ppl:.3f}"],
        ["KL(dense ‖ pruned) per token", "0", f"{agree.kl:.4f}"],
        ["top-1 agreement with dense", "1.0000", f"{agree.top1:.4f}"],
        ["pruning time (s)", "", f"{report.seconds:.1f}"],
        ["peak memory (MiB)", "", f"{report.peak_memory_mb:.0f}"],
    ]
    calibration = (
        f"{n_samples}×{seq_len} self-generated tokens" if report.calibration else "none needed"
    )
    title = (
        f"{model}: {method} {report.target.pattern} "
        f"(calibration: {calibration}; held-out: {eval_samples}×{seq_len} self-generated tokens)"
    )
    out_console.print(table(title, ["", "dense", "pruned"], rows))
    if out:
        loaded.model.to("cpu")
        results = {"held_out_ppl": {"dense": dense_ppl.ppl, "pruned": pruned_ppl.ppl}, "agreement": agree.to_dict()}
        path = save(loaded, out, [report.stage_record()], results, overwrite)
        out_console.print(f"saved to {path}")
