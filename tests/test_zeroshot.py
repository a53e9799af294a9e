"""Zero-shot tasks through lm-eval on local data: same documents, same prompts, same accuracy.

The reference here is written from lm-eval's published task definitions (prompt templates,
" " target delimiter, acc = argmax of summed log-likelihood, acc_norm = argmax per character),
computed by hand with the tiny model, so it fails if the local documents, the prompts or the
wiring into lm-eval differ.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from tiny_models import tiny_model

pytest.importorskip("lm_eval")

from secateurs.errors import UsageError  # noqa: E402
from secateurs.evaluate.tasks import HELLASWAG_ACTIVITYNET_ITEMS, LOCAL_TASKS, local_docs  # noqa: E402
from secateurs.evaluate.zeroshot import zero_shot  # noqa: E402

LIMIT = 4
TASKS = ["piqa", "hellaswag", "winogrande", "arc_easy", "boolq"]


@pytest.fixture(scope="module")
def partial_data(data_dir, tmp_path_factory):
    """A data folder with every task of TASKS except BoolQ, which must then be reported unavailable."""
    folder = tmp_path_factory.mktemp("data")
    for task in TASKS[:-1]:
        for relpath in LOCAL_TASKS[task].files:
            (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(data_dir / relpath, folder / relpath)
    return folder


@pytest.fixture(scope="module")
def run(partial_data):
    loaded = tiny_model("llama")
    return loaded, zero_shot(loaded, TASKS, limit=LIMIT, data_dir=partial_data, device="cpu")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _requests(task: str, doc: dict) -> tuple[list[tuple[str, str]], int]:
    """(context, continuation) per choice and the gold index, per lm-eval's task configs."""
    if task == "piqa":
        q = f"Question: {doc['goal']}\nAnswer:"
        return [(q, " " + doc["sol1"]), (q, " " + doc["sol2"])], doc["label"]
    if task == "hellaswag":
        q = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        return [(q, " " + _hellaswag_clean(e)) for e in doc["endings"]], int(doc["label"])
    if task == "winogrande":
        cut = doc["sentence"].index("_")
        rest = " " + doc["sentence"][cut + 1:].strip()
        return [(doc["sentence"][:cut] + o, rest) for o in (doc["option1"], doc["option2"])], int(doc["answer"]) - 1
    if task == "arc_easy":
        q = f"Question: {doc['question']}\nAnswer:"
        return [(q, " " + t) for t in doc["choices"]["text"]], doc["choices"]["label"].index(doc["answerKey"])
    raise AssertionError(task)


@torch.no_grad()
def _loglikelihood(loaded, context: str, continuation: str) -> float:
    tok = loaded.tokenizer
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(loaded.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logprobs[n_context - 1:].gather(1, targets[n_context - 1:, None]).sum().item()


def _by_hand(loaded, task: str, docs: list[dict]) -> tuple[float, float]:
    acc = acc_norm = 0
    for doc in docs:
        requests, gold = _requests(task, doc)
        lls = [_loglikelihood(loaded, c, x) for c, x in requests]
        norm = [ll / len(x[1:]) for ll, (_, x) in zip(lls, requests)]  # lm-eval: per character of the choice
        acc += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    return acc / len(docs), acc_norm / len(docs)


@pytest.mark.parametrize("task", TASKS[:-1])
def test_local_path_matches_lm_eval_by_hand(run, data_dir, task):
    loaded, scores = run
    result = scores.results[task]
    assert result.source == "local" and result.samples == LIMIT
    acc, acc_norm = _by_hand(loaded, task, local_docs(task, data_dir)[:LIMIT])
    assert result.acc == pytest.approx(acc)
    if task != "winogrande":  # lm-eval's winogrande defines acc only
        assert result.acc_norm == pytest.approx(acc_norm)
    else:
        assert result.acc_norm is None


def test_task_without_local_data_is_reported_and_others_run(run, partial_data):
    _, scores = run
    assert set(scores.results) == set(TASKS[:-1])
    assert "boolq" in scores.unavailable and "no local copy" in scores.unavailable["boolq"]
    assert str(partial_data) in scores.unavailable["boolq"]
    assert scores.mean_acc == pytest.approx(sum(r.acc for r in scores.results.values()) / 4)


def test_local_documents_have_hub_schema_and_counts(data_dir):
    expected = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                "arc_challenge": 1172, "openbookqa": 500}
    for task, count in expected.items():
        assert len(local_docs(task, data_dir)) == count, task
    boolq = local_docs("boolq", data_dir)
    assert sum(d["label"] for d in boolq) == 2033  # PROVENANCE: 2,033 true / 1,237 false
    for doc in local_docs("arc_challenge", data_dir):
        assert doc["answerKey"] in doc["choices"]["label"]
    assert all(len(d["choices"]["text"]) == 4 for d in local_docs("openbookqa", data_dir))


def test_hellaswag_context_split(data_dir):
    docs = local_docs("hellaswag", data_dir)
    # Item 0 as in the upstream README's example item.
    assert (docs[0]["activity_label"], docs[0]["ctx_a"], docs[0]["ctx_b"]) == (
        "Roof shingle removal", "A man is sitting on a roof.", "he")
    assert docs[0]["label"] == "3" and len(docs[0]["endings"]) == 4
    for doc in docs[:HELLASWAG_ACTIVITYNET_ITEMS]:
        assert doc["ctx_b"] and doc["ctx_a"] + " " + doc["ctx_b"] == doc["ctx"]
        assert not doc["ctx_b"][0].isupper()
    assert all(d["ctx_b"] == "" and d["ctx_a"] == d["ctx"] for d in docs[HELLASWAG_ACTIVITYNET_ITEMS:])


def test_bad_requests_are_usage_errors(data_dir):
    loaded = tiny_model("llama")
    with pytest.raises(UsageError, match="--limit"):
        zero_shot(loaded, ["piqa"], limit=0, data_dir=data_dir)
    loaded.tokenizer = None
    with pytest.raises(UsageError, match="tokenizer"):
        zero_shot(loaded, ["piqa"], limit=1, data_dir=data_dir)


def test_eval_command_tasks(data_dir, tmp_path):
    from typer.testing import CliRunner

    from secateurs.api import save
    from secateurs.cli import app

    folder = save(tiny_model("llama"), tmp_path / "tiny", [])
    out = tmp_path / "eval.json"
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(folder), "--tasks", "winogrande", "--limit", "2",
                                 "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert document["perplexity"] == {}  # --tasks alone measures no perplexity
    assert document["zeroshot"]["tasks"]["winogrande"]["samples"] == 2
    empty = runner.invoke(app, ["eval", str(folder), "--tasks", ","])
    assert empty.exit_code == 2 and "--tasks" in empty.output
