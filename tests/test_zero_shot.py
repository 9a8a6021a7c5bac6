"""Zero-shot tasks through lm-evaluation-harness on the model in memory: the offline task in tests/data gives on the
shared trained decoder exactly the accuracy of a direct count of its choices' log-likelihoods; dense and pruned
records land in the card and its model-index; an offloaded model evaluates to the same numbers; bad arguments fail
before the model runs."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import yaml

from hf_prune import MagnitudeConfig, Pruner
from hf_prune.evaluation import zero_shot

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = os.path.join(HERE, "data", "lm_eval_tasks")
TASK = "pycode_choice"
# the shared trained decoder lives next to the checkout (../shared/models/), on every machine and in CI
PYLM = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "models", "pylm"))
needs_pylm = pytest.mark.skipif(not os.path.isfile(os.path.join(PYLM, "model.safetensors")),
                                reason=f"the shared trained decoder is not at {PYLM}")


def _docs() -> list[dict]:
    with open(os.path.join(TASKS, "pycode_choice.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@torch.no_grad()
def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenised as the harness documents it: trailing spaces of the context move
    to the continuation, the pair is encoded whole and split after the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(n_context, len(whole))))


def _direct_accuracy(model, tokenizer) -> tuple[float, float]:
    """(acc, acc_norm) counted here: the choice of highest log-likelihood (normalised by its length in characters
    for acc_norm) is the gold one."""
    hits = hits_norm = 0
    docs = _docs()
    for doc in docs:
        scores = [_loglikelihood(model, tokenizer, doc["context"], c) for c in doc["choices"]]
        hits += max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["gold"]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        hits_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == doc["gold"]
    return hits / len(docs), hits_norm / len(docs)


@pytest.fixture(scope="module")
def pylm():
    if not os.path.isfile(os.path.join(PYLM, "model.safetensors")):
        pytest.skip(f"the shared trained decoder is not at {PYLM}")
    return Pruner.from_pretrained(PYLM, dtype=torch.float32)


def _by_metric(records: list[dict]) -> dict:
    return {r["metric"]: r for r in records}


@needs_pylm
def test_local_task_accuracy_equals_a_direct_count(pylm):
    records = zero_shot(pylm.model, pylm.tokenizer, [TASK], include_path=TASKS)
    acc, acc_norm = _direct_accuracy(pylm.model, pylm.tokenizer)
    got = _by_metric(records)
    assert set(got) == {"acc", "acc_norm"}
    assert got["acc"]["value"] == pytest.approx(acc, abs=1e-4)
    assert got["acc_norm"]["value"] == pytest.approx(acc_norm, abs=1e-4)
    assert acc >= 0.5  # a trained model of Python beats the 0.25 of chance by far on idiomatic endings
    n = len(_docs())
    assert got["acc"]["stderr"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5, abs=1e-3)
    record = got["acc"]
    assert record["n"] == n and record["lm_eval_task"] == TASK and record["dataset"] == TASK
    assert record["local"] is True and record["split"] is None  # a local file: no Hub split, no local path
    assert record["protocol"]["harness"].startswith("lm-evaluation-harness 0.4")
    assert record["protocol"]["task_version"] == 1.0 and record["protocol"]["num_fewshot"] == 0
    assert not pylm.model.training


@needs_pylm
def test_dense_and_pruned_records_land_in_the_card(tmp_path):
    pruner = Pruner.from_pretrained(PYLM, dtype=torch.float32)
    dense = zero_shot(pruner.model, pruner.tokenizer, TASK, include_path=TASKS, limit=20)
    pruner.prune(MagnitudeConfig(sparsity=0.7), progress=False)
    pruned = zero_shot(pruner.model, pruner.tokenizer, TASK, include_path=TASKS, limit=20, dense=dense)
    acc = _by_metric(pruned)["acc"]
    assert acc["dense"] == _by_metric(dense)["acc"]["value"] and acc["n"] == 20
    assert acc["protocol"]["limit"] == 20 and acc["protocol"]["examples"] == "20 of 40"
    folder = pruner.save_pretrained(tmp_path / "out", evaluations=pruned)
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, flags=re.S).group(1))
    results = meta["model-index"][0]["results"]
    accs = [r for r in results if r["metrics"][0]["type"] == "acc"]
    assert len(accs) == 1 and accs[0]["dataset"]["name"] == TASK and accs[0]["metrics"][0]["value"] == acc["value"]
    assert "split" not in accs[0]["dataset"]  # a local task has no Hub split
    assert str(tmp_path) not in text and HERE not in text  # no local path anywhere in the card
    row = next(line for line in text.splitlines() if line.startswith(f"| acc | {TASK}"))
    assert f"{acc['dense']:.4f}" in row and f"{acc['value']:.4f}" in row and "20" in row
    assert "lm-evaluation-harness 0.4" in text and "num_fewshot: 0" in text


@needs_pylm
def test_offloaded_model_gives_the_same_records(pylm, tmp_path):
    from accelerate import cpu_offload

    expected = zero_shot(pylm.model, pylm.tokenizer, TASK, include_path=TASKS, limit=12)
    model = Pruner.from_pretrained(PYLM, dtype=torch.float32).model
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())
    got = zero_shot(model, pylm.tokenizer, TASK, include_path=TASKS, limit=12)
    assert [(r["metric"], r["value"]) for r in got] == [(r["metric"], r["value"]) for r in expected]


def test_bad_arguments_fail_before_the_model_runs(tokenizer):
    from conftest import make_model

    model = make_model("llama", vocab=len(tokenizer))
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"tasks=\[\] must name lm-evaluation-harness tasks"):
        zero_shot(model, tokenizer, [])
    with pytest.raises(ValueError, match="limit=0 must be a number of examples"):
        zero_shot(model, tokenizer, TASK, limit=0, include_path=TASKS)
    with pytest.raises(ValueError, match="num_fewshot=-1"):
        zero_shot(model, tokenizer, TASK, num_fewshot=-1, include_path=TASKS)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        zero_shot(model, None, TASK, include_path=TASKS)
    with pytest.raises(ValueError, match="include_path '/no/such/tasks' does not exist"):
        zero_shot(model, tokenizer, TASK, include_path="/no/such/tasks")
    assert calls == []
