"""The Python API: one verb per stage, the same objects the CLI builds.

>>> import secateurs
>>> loaded = secateurs.load_model("smollm2-135m")
>>> report = secateurs.prune(loaded, secateurs.PruneConfig("magnitude", 0.5))
>>> secateurs.evaluate_perplexity(loaded, ["wikitext2"], seq_len=512, limit_windows=8)
>>> secateurs.save(loaded, "out", stages=[report.stage_record()])
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data.calib import CalibConfig, tokenize
from .data.sources import load_text
from .depth.plot import score_plot
from .depth.prune import LayerConfig, LayerReport
from .depth.prune import prune_layers as _prune_layers
from .device import resolve_device
from .engine.sequential import EngineHooks, EngineOptions
from .engine.stream import StreamSession
from .errors import SecateursError, UsageError
from .evaluate.generate import Generation, prompt_ids
from .evaluate.generate import generate as _generate
from .evaluate.perplexity import Perplexity, perplexity
from .model.drop_layers import drop_layers
from .model.load import LoadedModel
from .model.save import previous_stages, save_model
from .moe.config import ExpertConfig
from .moe.prune import ExpertReport, experts_streamed, prune_experts
from .record import ExportStage, LayersStage, StageRecord, build_record
from .recover.iterative import IterativeReport
from .recover.iterative import prune_iterative as _prune_iterative
from .recover.lora import RecoverConfig, RecoverReport, recover_lora
from .recover.loraprune import LoRAPruneConfig
from .recover.loraprune import loraprune as _loraprune
from .sparsity.prune import (
    PruneConfig,
    PruneReport,
    check_prune,
    layer_sparsity,
    prunable_linears,
    prune_streamed,
)
from .sparsity.prune import prune as _prune
from .structured.base import WidthConfig, WidthReport, prune_width
from .structured.shearing import ShearConfig, ShearReport
from .structured.shearing import shear as _shear

__all__ = [
    "ExpertConfig", "ExpertReport", "PruneConfig", "PruneReport", "as_calib", "as_engine", "bench", "check_prune",
    "drop_layers_streamed", "evaluate_perplexity", "experts", "experts_streamed", "export_sparse", "generate", "layer_sparsity",
    "loraprune", "prunable_linears", "prune", "prune_iterative", "prune_layers", "prune_streamed", "recover", "report_files", "save", "shear", "width",
]


def as_engine(engine: EngineOptions | str | None) -> EngineOptions:
    """Every verb takes its engine options the same way: an :class:`EngineOptions`, a device name, or None (auto)."""
    if isinstance(engine, EngineOptions):
        return engine
    return EngineOptions(device=engine or "auto")


def as_calib(calib: CalibConfig | str | None) -> CalibConfig | None:
    """Calibration the same way for every verb: a :class:`CalibConfig`, a source name (the papers'
    128 × 2048 tokens of it; width methods use their own paper sizes, see :func:`width`), or None."""
    return CalibConfig(calib) if isinstance(calib, str) else calib


def prune(
    loaded: LoadedModel,
    config: PruneConfig,
    calib: CalibConfig | str | None = None,
    engine: EngineOptions | str | None = None,
    hooks: EngineHooks | None = None,
) -> PruneReport:
    """Prune ``loaded.model`` in place with an unstructured / N:M method, block by block (sparsity/prune.py);
    ``hooks`` for a run split over processes (:class:`~secateurs.engine.distributed.DistributedHooks`)."""
    return _prune(loaded, config, as_calib(calib), as_engine(engine), hooks)


def drop_layers_streamed(
    source: str | Path, out: str | Path, removed: list[int], dtype: str = "float32", overwrite: bool = False
) -> Path | None:
    """Remove the decoder layers ``removed`` (original indices) of a model folder without loading it
    whole: kept blocks are copied shard by shard under their new numbers, the config is cut to match."""
    session = StreamSession(source, out, dtype, {"removed": sorted(set(removed))}, overwrite)
    n_before = len(session.source_index)
    session.source_index = drop_layers(session.loaded.model, session.spec, removed)
    session.open().copy_unchanged()
    stage = LayersStage(method="given", removed_layers=sorted(set(removed)), layers_before=n_before,
                        layers_after=len(session.source_index))
    return session.finish(build_record(session.loaded.source, previous_stages(session.folder) + [stage]))


def width(
    loaded: LoadedModel,
    config: WidthConfig,
    calib: CalibConfig | str | None = None,
    engine: EngineOptions | str | None = None,
) -> WidthReport:
    """Remove attention heads / MLP channels physically (LLM-Pruner, Wanda-SP, FLAP, magnitude).

    The model shrinks in place to a smaller dense model; see ``secateurs.structured``. ``calib`` None
    or a source name calibrates with the method's paper sizes (:meth:`WidthConfig.calibration`), as the CLI does.
    """
    if calib is None or isinstance(calib, str):
        calib = config.calibration(calib or "wikitext2")
    return prune_width(loaded, config, calib, as_engine(engine))


def prune_layers(
    loaded: LoadedModel,
    config: LayerConfig,
    calib: CalibConfig | str | None = None,
    engine: EngineOptions | str | None = None,
) -> LayerReport:
    """Remove ``config.remove`` whole decoder layers chosen by a criterion, in place; ``calib`` None
    is the papers' 128 × 2048 tokens of wikitext2 (the CLI's default). See ``secateurs.depth``."""
    return _prune_layers(loaded, config, as_calib(calib) or CalibConfig(), as_engine(engine))


def experts(
    loaded: LoadedModel,
    config: ExpertConfig,
    calib: CalibConfig | str | None = None,
    engine: EngineOptions | str | None = None,
) -> ExpertReport:
    """Remove the lowest-scoring routed experts of every MoE layer (REAP, frequency or EAN), in place;
    ``calib`` None is 128 × 2048 tokens of wikitext2 (the CLI's default). See ``secateurs.moe``."""
    return prune_experts(loaded, config, as_calib(calib) or CalibConfig(), as_engine(engine))


def recover(
    loaded: LoadedModel,
    config: RecoverConfig | None = None,
    engine: EngineOptions | str | None = None,
    *,
    device: str | None = None,
) -> RecoverReport:
    """Fine-tune LoRA adapters on language-modelling text and merge them, in place; every pruned
    (zero) weight of a sparse model stays exactly zero (masked adapters). See ``secateurs.recover``.
    ``device`` is the older spelling of ``engine``."""
    return recover_lora(loaded, config or RecoverConfig(), as_engine(device or engine).torch_device())


def loraprune(
    loaded: LoadedModel,
    config: LoRAPruneConfig | None = None,
    train: RecoverConfig | None = None,
    engine: EngineOptions | str | None = None,
    *,
    device: str | None = None,
) -> RecoverReport:
    """LoRAPrune: prune progressively while LoRA fine-tunes, scored by the adapters; in place.

    ``train`` None is ``config.train_config()``: LoRAPrune's paper learning rate (3e-4), as the CLI;
    build your own with ``config.train_config(steps=...)`` to keep it."""
    config = config or LoRAPruneConfig()
    return _loraprune(loaded, config, train or config.train_config(), as_engine(device or engine).torch_device())


def prune_iterative(
    loaded: LoadedModel,
    config: PruneConfig,
    rounds: int,
    recover_config: RecoverConfig,
    calib: CalibConfig | str | None = None,
    engine: EngineOptions | str | None = None,
) -> IterativeReport:
    """Reach ``config``'s sparsity in ``rounds`` one-shot prunes, each followed by a LoRA recovery."""
    return _prune_iterative(loaded, config, rounds, recover_config, as_calib(calib), as_engine(engine))


def shear(loaded: LoadedModel, config: ShearConfig, engine: EngineOptions | str | None = None) -> ShearReport:
    """Prune to the target shape with learned L0 masks (LLM-Shearing), in place, then continue
    pretraining with dynamic batch loading; see ``secateurs.structured.shearing``."""
    return _shear(loaded, config, as_engine(engine))


def evaluate_perplexity(
    loaded: LoadedModel,
    datasets: list[str],
    seq_len: int = 2048,
    limit_windows: int | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    batch_size: int = 1,
) -> dict[str, Perplexity | str]:
    """Perplexity per dataset; a dataset that cannot be read maps to the reason, the rest still run."""
    torch_device = resolve_device(device)
    home = next(loaded.model.parameters()).device
    loaded.model.to(torch_device)
    results: dict[str, Perplexity | str] = {}
    try:
        for name in datasets:
            try:
                ids = tokenize(loaded.tokenizer, load_text(name, "test", data_dir))
            except SecateursError as exc:
                results[name] = str(exc)
                continue
            results[name] = perplexity(loaded.model, ids, seq_len, limit_windows, torch_device, batch_size)
    finally:
        loaded.model.to(home)
    return results


def report_files(report: Any) -> dict[str, bytes]:
    """Files a stage's report adds to its output folder: a depth prune's layer-score plot."""
    if isinstance(report, LayerReport):
        method = report.config.method
        return {"layer_scores.png": score_plot({method: report.first_scores()}, {method: report.removed}, report.n_layers_before)}
    return {}


def save(
    loaded: LoadedModel,
    out: str | Path,
    stages: list[StageRecord | dict | Any],
    results: dict | None = None,
    overwrite: bool = False,
    extras: dict[str, bytes] | None = None,
    save_format: str = "hf",
) -> Path:
    """Save as an HF folder with ``secateurs.json`` (earlier stages of the input are kept) and ``extras``.

    A stage is its record (a :class:`~secateurs.record.StageRecord`, or a dict as read from an
    earlier ``secateurs.json``) or a verb's report: a report is recorded with ``stage_record()``
    and adds its files (:func:`report_files`, e.g. the layer-score plot), as the CLI's outputs have.
    ``save_format="deci"`` writes per-layer widths in the ``block_configs`` layout vLLM and llama.cpp
    run (falling back, with a note, to our own per-layer folder where it cannot hold the model)."""
    files = dict(extras or {})
    records = []
    for stage in stages:
        if isinstance(stage, (StageRecord, dict)):
            records.append(stage)
        else:
            records.append(stage.stage_record())
            files.update(report_files(stage))
    record = build_record(loaded.source, previous_stages(loaded.local_path) + records, results)
    return save_model(loaded, out, record, overwrite, files or None, save_format)


def export_sparse(loaded: LoadedModel, min_sparsity: float = 0.5) -> ExportStage:
    """Swap the pruned linears for SparseLinear (2:4, 4:8, 8:16, banded or bitmap: ``choose_format``) in place;
    returns the stage to record, so that ``save`` writes the compressed-tensors layout (``sparse-24-bitmask`` /
    ``sparse-bitmask``, kernels/compressed.py) and ``load_model`` brings it back onto the kernels."""
    from .kernels import export_compressed

    return export_compressed(loaded.model, loaded.spec, min_sparsity)


def bench(
    model: str,
    baseline: str | None = None,
    sparse: bool = True,
    min_sparsity: float = 0.5,
    device: str = "auto",
    dtype: str = "auto",
    config: Any = None,
) -> dict:
    """Speed and memory of MODEL (and of its sparse-kernel form) beside a dense ``baseline``, in one run."""
    from .evaluate.bench import compare
    from .evaluate.speed import SpeedConfig

    return compare(model, baseline, sparse, min_sparsity, resolve_device(device), dtype, config or SpeedConfig())


def generate(
    loaded: LoadedModel,
    prompt: str,
    max_new_tokens: int = 256,
    *,
    chat: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    method: str = "auto",
    stream: Callable[[str], None] | None = None,
) -> Generation:
    """Continue ``prompt`` (with ``chat``: answer it through the tokenizer's chat template) on the fastest
    decode path, the one ``bench`` times: static KV cache and a CUDA graph on CUDA (``method="compile"``
    adds ``torch.compile``), the eager reference path on the CPU; sparse layers of a ``--export sparse``
    folder run on their kernels. Greedy unless ``temperature`` > 0 (seeded by ``seed``). Each piece of
    text goes to ``stream`` as soon as it is known; the result holds the text, the ids, prefill and
    decode tokens/s and the path taken. The model is moved to ``device`` and left there."""
    if loaded.tokenizer is None:
        raise UsageError(f"{loaded.source} has no tokenizer, so a prompt cannot become tokens; copy the tokenizer "
                         "files of the model it came from into it")
    ids = prompt_ids(loaded.tokenizer, prompt, chat, loaded.source)
    return _generate(loaded.model, loaded.tokenizer, ids, max_new_tokens, resolve_device(device), method,
                     temperature, top_p, seed, stream)
