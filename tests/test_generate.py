"""``secateurs generate`` and ``secateurs.generate`` on the CPU reference path (mechanics and tokens; the
timings are printed, never asserted)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import prune_2of4, tiny_model
from typer.testing import CliRunner

import secateurs
from secateurs import load_model, save
from secateurs.api import export_sparse
from secateurs.cli import app
from secateurs.kernels import sparse_layers
from secateurs.model.drop_layers import drop_layers
from secateurs.model.slice import apply_widths
from secateurs.structured.base import model_groups

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A dense tiny Llama, its 2:4 twin stored dense, and the twin exported sparse, all with a tokenizer."""
    root = tmp_path_factory.mktemp("generate")
    loaded = tiny_model("llama")
    dense = save(loaded, root / "dense", stages=[])
    prune_2of4(loaded)
    pruned = save(loaded, root / "pruned", stages=[])
    sparse = save(loaded, root / "sparse", stages=[export_sparse(loaded)])
    return {"dense": dense, "pruned": pruned, "sparse": sparse}


def transformers_greedy(folder, prompt: str, new_tokens: int) -> list[int]:
    """What plain ``transformers`` decodes greedily from the dense-stored model."""
    loaded = load_model(str(folder))
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    out = loaded.model.generate(ids, do_sample=False, max_new_tokens=new_tokens)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("model, reference", [("dense", "dense"), ("sparse", "pruned")])
def test_greedy_tokens_are_transformers_greedy_tokens(folders, model, reference):
    loaded = load_model(str(folders[model]))
    assert bool(sparse_layers(loaded.model)) == (model == "sparse")  # the export runs on the kernels' CPU reference
    done = secateurs.generate(loaded, PROMPT, 16, device="cpu")
    print(done.path, f"prefill {done.prefill_tokens_per_s:.1f} tok/s, decode {done.decode_tokens_per_s} tok/s")
    assert done.tokens == transformers_greedy(folders[reference], PROMPT, 16)
    assert done.method == "eager" and done.prompt_tokens == 4
    assert ("2:4 × 21 on sparse kernels" in done.path) == (model == "sparse")


def _per_layer_widths(loaded) -> None:
    """Each block keeps a different number of heads and channels (our per-layer class when saved)."""
    keep = [{kind: torch.arange(groups.count - 1 - index % 2) for kind, groups in per.items()}
            for index, per in enumerate(model_groups(loaded, ("heads", "channels")))]
    apply_widths(loaded.model, loaded.spec, keep)


@pytest.mark.parametrize("prune", [_per_layer_widths, lambda loaded: drop_layers(loaded.model, loaded.spec, [1])],
                         ids=["width", "depth"])
def test_width_and_depth_pruned_outputs_generate_like_transformers(tmp_path, prune):
    loaded = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=8)
    prune(loaded)
    folder = save(loaded, tmp_path / "out", stages=[])
    done = secateurs.generate(load_model(str(folder)), PROMPT, 12, device="cpu")
    assert done.tokens == transformers_greedy(folder, PROMPT, 12)


def test_text_is_streamed_piece_by_piece(folders):
    pieces: list[str] = []
    done = secateurs.generate(load_model(str(folders["dense"])), PROMPT, 12, device="cpu", stream=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == done.text and done.text


def test_seeded_sampling_is_deterministic(folders):
    loaded = load_model(str(folders["dense"]))
    runs = [secateurs.generate(loaded, PROMPT, 12, temperature=1.0, top_p=0.9, seed=seed, device="cpu").tokens
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert runs[0] != secateurs.generate(loaded, PROMPT, 12, device="cpu").tokens


def test_cli_streams_the_text_then_the_timings_and_the_path(folders):
    expected = secateurs.generate(load_model(str(folders["sparse"])), PROMPT, 10, device="cpu").text
    done = CliRunner().invoke(app, ["generate", str(folders["sparse"]), "--prompt", PROMPT, "--max-new-tokens", "10"])
    assert done.exit_code == 0, done.output
    print(done.stdout)
    assert done.stdout.startswith(expected + "\n")
    for row in ("decode (tok/s)", "prefill (tok/s)", "2:4 × 21 on sparse kernels", "(reference path)"):
        assert row in done.stdout
    assert done.stderr.count("reference path") == 1 and "no CUDA device" not in done.stderr  # one note


@pytest.fixture()
def no_load(monkeypatch):
    """Any attempt to load the weights fails the test: bad input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("secateurs.model.load.load_model", refuse)


@pytest.mark.parametrize("args, message", [
    ([], "give the prompt once"),
    (["--prompt", "a", "--prompt-file", "p.txt"], "not both"),
    (["--prompt-file", "missing.txt"], "cannot be read"),
    (["--prompt", "the " * 300], "longer than the model's context of 256"),
    (["--prompt", PROMPT, "--max-new-tokens", "300"], "use --max-new-tokens 252 or less"),
    (["--prompt", PROMPT, "--chat"], "no chat template"),
    (["--prompt", PROMPT, "--top-p", "0.5"], "needs a --temperature"),
    (["--prompt", PROMPT, "--decode-method", "fast"], "--decode-method 'fast'"),
])
def test_bad_input_is_one_line_before_the_model_loads(folders, no_load, args, message):
    done = CliRunner().invoke(app, ["generate", str(folders["dense"]), *args])
    assert done.exit_code == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_model_without_tokenizer_is_one_line(folders, tmp_path, no_load):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in folders["dense"].iterdir():
        if "token" not in file.name and file.name not in ("vocab.json", "merges.txt"):
            (bare / file.name).write_bytes(file.read_bytes())
    done = CliRunner().invoke(app, ["generate", str(bare), "--prompt", PROMPT])
    assert done.exit_code == 2 and "has no tokenizer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_smollm2_chat_answers_with_transformers_greedy_tokens(smollm2_folder):
    loaded = load_model(str(smollm2_folder))
    done = secateurs.generate(loaded, "What is the capital of France?", 12, chat=True, device="cpu")
    print(repr(done.text), done.path)
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(ids["input_ids"], do_sample=False, max_new_tokens=12)
    assert done.tokens == out[0, ids["input_ids"].shape[1]:].tolist()
    assert "Paris" in done.text
