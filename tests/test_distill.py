"""Distillation from the dense model as a recovery loss (issue 31): the loss is the KL divergence it
claims to be, a teacher-free run is bit-identical to the code before distillation, LoRA keeps the
masks exactly while distilling, a distilling run resumes to the same weights, a top-k cache at
k = vocab gives the on-the-fly loss, and every bad input is one line before any training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_model

from secateurs.api import PruneConfig, prune, save
from secateurs.errors import UsageError
from secateurs.model.linear import weight_matrix
from secateurs.model.load import load_model
from secateurs.recover.lora import CHECKPOINT, TEACHER_CACHE, RecoverConfig, recover_lora
from secateurs.structured.shearing import ShearConfig, ShearTarget, shear
from secateurs.training import distill as distill_module
from secateurs.training.config import DistillConfig, parse_tokens
from secateurs.training.distill import Distillation, kd_loss, load_teacher, topk_kd_loss
from secateurs.training.loop import SeededWindows, TrainHook

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def config(text_file: Path, **overrides) -> RecoverConfig:
    settings = dict(steps=4, lr=1e-2, seq_len=32, batch_size=2, data=str(text_file), warmup_steps=0)
    return RecoverConfig(**{**settings, **overrides})


def linears(loaded) -> list[torch.Tensor]:
    return [weight_matrix(m) for m in loaded.spec.named_linears(loaded.model).values()]


@pytest.fixture()
def pruned_folder(tmp_path) -> Path:
    """A dense tiny model saved, and a magnitude-pruned copy saved from it (its secateurs.json names the dense)."""
    dense = tiny_model("llama")
    dense.model.save_pretrained(tmp_path / "dense")
    dense.tokenizer.save_pretrained(tmp_path / "dense")
    student = load_model(str(tmp_path / "dense"))
    report = prune(student, PruneConfig("magnitude", 0.5, options={"per": "row"}))
    save(student, tmp_path / "pruned", [report])
    return tmp_path / "pruned"


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_loss_is_the_kl_divergence(temperature):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 40, generator=generator), torch.randn(2, 5, 40, generator=generator) * 3
    direct = F.kl_div(F.log_softmax(student / temperature, -1).flatten(0, 1),
                      F.log_softmax(teacher / temperature, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean") * temperature**2
    torch.testing.assert_close(kd_loss(student, teacher, temperature), direct)
    top = teacher.topk(40, dim=-1)
    torch.testing.assert_close(topk_kd_loss(student, top.values, top.indices, temperature), direct)
    assert kd_loss(teacher, teacher, temperature).abs() < 1e-6


def test_a_teacher_free_run_is_unchanged(text_file):
    """Hashes of these runs' weights, recorded with the code before distillation existed."""
    loaded = tiny_model("llama")
    prune(loaded, PruneConfig("magnitude", 0.5, options={"per": "row"}))
    report = recover_lora(loaded, config(text_file), CPU)
    assert weights_hash(loaded.model) == "ae0354d4e46b6b8e"
    assert report.log.lm_losses is None and report.stage_record().teacher is None
    sheared = tiny_model("llama")
    shear(sheared, ShearConfig(ShearTarget(layers=2, hidden=48, heads=2, intermediate=64), datasets=[str(text_file)],
                               steps=3, continue_steps=2, batch_size=2, seq_len=16, eval_windows=1, lr=1e-3))
    assert weights_hash(sheared.model) == "5d9aa14df79d946e"


def test_lora_keeps_masks_exactly_while_distilling_from_the_recorded_teacher(pruned_folder, text_file):
    student = load_model(str(pruned_folder))
    zeros = [w == 0 for w in linears(student)]
    before = [w.clone() for w in linears(student)]
    report = recover_lora(student, config(text_file, steps=6, distill=DistillConfig("kl+lm", temperature=2.0),
                                          eval_data="self", eval_every=3, eval_windows=2), CPU)
    assert report.zeros_kept and report.extra["teacher"] == str(pruned_folder.parent / "dense")
    assert len(report.log.lm_losses) == 6 and report.log.losses != report.log.lm_losses
    assert [point[0] for point in report.extra["held_out"]] == [0, 3 * 64, 6 * 64]
    for weight, zero, old in zip(linears(student), zeros, before):
        assert bool((weight[zero] == 0).all()) and not torch.equal(weight, old)


def test_data_free_distillation_trains_on_text_the_teacher_writes(pruned_folder):
    student = load_model(str(pruned_folder))
    report = recover_lora(student, RecoverConfig(steps=1, seq_len=16, batch_size=2, data="self", tokens="64",
                                                 distill=DistillConfig("kl")), CPU)
    assert report.log.steps == 2 and report.zeros_kept  # 64 tokens ÷ 32 per step


class StopAt(TrainHook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_backward(self, step: int) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("top_k", [None, 8])
def test_a_distilling_run_resumes_to_the_same_weights(pruned_folder, text_file, tmp_path, top_k):
    cfg = config(text_file, steps=5, save_every=2, checkpoint_dir=str(tmp_path / "ckpt"),
                 distill=DistillConfig("kl", top_k=top_k))
    with pytest.raises(KeyboardInterrupt):
        recover_lora(load_model(str(pruned_folder)), cfg, CPU, hook=StopAt(3))
    assert (tmp_path / "ckpt" / CHECKPOINT).is_file()
    assert (tmp_path / "ckpt" / TEACHER_CACHE).is_file() == (top_k is not None)
    resumed = load_model(str(pruned_folder))
    report = recover_lora(resumed, cfg, CPU)
    straight = load_model(str(pruned_folder))
    reference = recover_lora(straight, RecoverConfig(**{**cfg.__dict__, "checkpoint_dir": str(tmp_path / "other")}), CPU)
    assert report.log.resumed_from == 2 and report.log.losses == reference.log.losses
    for a, b in zip(linears(resumed), linears(straight)):
        assert torch.equal(a, b)


def test_a_top_k_cache_at_full_vocabulary_gives_the_on_the_fly_loss(pruned_folder, tmp_path):
    student = load_model(str(pruned_folder))
    teacher = load_teacher(student, DistillConfig("kl"), CPU)
    ids = torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(1))
    batches = SeededWindows(ids, batch_size=2, seq_len=16, seed=0, name="random")
    cached = Distillation(teacher, DistillConfig("kl", temperature=2.0, top_k=VOCAB), student.spec,
                          tmp_path / "cache.safetensors")
    live = Distillation(teacher, DistillConfig("kl", temperature=2.0), student.spec)
    cached.start(student.model, batches, 3, CPU)
    live.start(student.model, batches, 3, CPU)
    with torch.random.fork_rng():
        for index in range(3):
            batch = batches.next(index)
            logits = student.model(input_ids=batch).logits
            lm = torch.tensor(0.0)
            torch.testing.assert_close(cached.loss(batch, logits, lm, index), live.loss(batch, logits, lm, index),
                                       rtol=1e-3, atol=1e-4)
    cached.finish()
    live.finish()


def _one_line(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_bad_inputs_are_one_line_each_before_training(pruned_folder, text_file, tmp_path, monkeypatch):
    student = load_model(str(pruned_folder))
    other = tiny_model("llama", vocab_size=VOCAB - 20)
    other.model.save_pretrained(tmp_path / "other")
    other.tokenizer.save_pretrained(tmp_path / "other")
    with pytest.raises(UsageError) as excinfo:
        recover_lora(student, config(text_file, distill=DistillConfig("kl", teacher=str(tmp_path / "other"))), CPU)
    _one_line(excinfo, "vocabulary")

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["lorem ipsum dolor sit amet"] * 4, vocab_size=VOCAB - 8, min_frequency=1,
                            show_progress=False, special_tokens=["<s>", "</s>"])
    renamed = tmp_path / "renamed"
    tiny_model("llama").model.save_pretrained(renamed)
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(renamed)
    with pytest.raises(UsageError) as excinfo:
        recover_lora(student, config(text_file, distill=DistillConfig("kl", teacher=str(renamed))), CPU)
    _one_line(excinfo, "tokenizer differs")

    monkeypatch.setattr(distill_module, "available_bytes", lambda device: 1000)
    with pytest.raises(UsageError) as excinfo:
        recover_lora(student, config(text_file, distill=DistillConfig("kl")), CPU)
    _one_line(excinfo, "does not fit", "--distill-top-k")
    monkeypatch.undo()

    with pytest.raises(UsageError) as excinfo:
        recover_lora(student, config(text_file, tokens="2M"), CPU)
    _one_line(excinfo, "--epochs")
    assert config(text_file, tokens="9k", epochs=4).training_steps(3000) == 141  # 9,000 tokens ÷ 64 per step

    held_out = tmp_path / "held.txt"
    held_out.write_text("some words first " + text_file.read_text()[2000:4000])
    with pytest.raises(UsageError) as excinfo:
        recover_lora(student, config(text_file, eval_data=str(held_out)), CPU)
    _one_line(excinfo, "overlaps")

    for bad, words in [(dict(data="self"), ("--data self", "--distill")),
                       (dict(distill=DistillConfig(teacher="x")), ("--teacher needs",)),
                       (dict(distill=DistillConfig("kl", temperature=0)), ("--temperature",))]:
        with pytest.raises(UsageError) as excinfo:
            config(text_file, **bad).validate()
        _one_line(excinfo, *words)
    assert all(torch.equal(w, w0) for w, w0 in zip(linears(student), linears(load_model(str(pruned_folder)))))


def test_token_budgets_are_written_as_people_write_them():
    assert parse_tokens("2M") == 2_000_000 and parse_tokens("1.5k") == 1500 and parse_tokens("300") == 300
    with pytest.raises(UsageError, match="token count"):
        parse_tokens("lots")


def test_cli_recover_distills_from_the_recorded_teacher(pruned_folder, text_file, tmp_path):
    from typer.testing import CliRunner

    from secateurs.cli import app

    runner = CliRunner()
    base = ["recover", str(pruned_folder), "--steps", "2", "--seq-len", "32", "--batch-size", "2",
            "--data", str(text_file), "--device", "cpu"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "kd"), "--distill", "kl", "--temperature", "2"])
    assert result.exit_code == 0, result.output
    stage = json.loads((tmp_path / "kd" / "secateurs.json").read_text())["stages"][-1]
    assert stage["teacher"] == str(pruned_folder.parent / "dense") and stage["config"]["distill"]["temperature"] == 2.0
    orphan = runner.invoke(app, [*base, "--out", str(tmp_path / "o"), "--teacher", str(pruned_folder)])
    assert orphan.exit_code == 2 and "--teacher needs --distill" in orphan.output
