"""The pinned perplexity protocol and the sparsity report."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model

from hf_prune import MagnitudeConfig, Pruner
from hf_prune.evaluation import perplexity, perplexity_record, perplexity_windows, sparsity_report


def test_perplexity_matches_a_hand_computation(tokenizer, heldout):
    model = make_model("llama", vocab=len(tokenizer)).eval()
    texts = heldout[:40]
    seq = 32
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    n = len(ids) // seq
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor([ids[w * seq:(w + 1) * seq]])
            logits = model(input_ids=x).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += seq - 1
    expected = math.exp(nll / count)
    assert perplexity(model, tokenizer, texts, seq_len=seq, batch_size=3) == pytest.approx(expected, rel=1e-5)
    windows, record = perplexity_windows(tokenizer, texts, seq_len=seq)
    assert windows.shape == (n, seq) and record["windows"] == n and record["joiner"] == "\\n\\n"
    assert perplexity(model, tokenizer, texts, seq_len=seq, max_windows=2) > 1


def test_perplexity_rises_when_pruned(tokenizer, heldout):
    model = make_model("llama", vocab=len(tokenizer))
    before = perplexity(model, tokenizer, "builtin:python-docs", seq_len=64, max_windows=8)
    Pruner(model, tokenizer).prune(MagnitudeConfig(sparsity=0.9), progress=False)
    assert perplexity(model, tokenizer, "builtin:python-docs", seq_len=64, max_windows=8) != before


def test_perplexity_errors(tokenizer):
    model = make_model("llama", vocab=len(tokenizer))
    with pytest.raises(ValueError, match="fewer than seq_len=256"):  # 256: the tiny model's whole context
        perplexity(model, tokenizer, ["short text"], seq_len=256)
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity(model, tokenizer, ["short text"], batch_size=0)
    bert = make_model("bert", vocab=len(tokenizer))
    with pytest.raises(ValueError, match="needs a causal language model"):
        perplexity(bert, tokenizer, "builtin:python-docs", seq_len=16, max_windows=1)


def test_sparsity_report_counts_zeros(tokenizer):
    model = make_model("opt", vocab=len(tokenizer))
    before = sparsity_report(model)
    Pruner(model, tokenizer).prune(MagnitudeConfig(sparsity=0.25, target_modules=["fc1"]), progress=False)
    after = sparsity_report(model)
    fc1 = after["per_module"]["model.decoder.layers.0.fc1"]
    assert fc1["zeros"] == fc1["numel"] // 4
    added = after["overall"]["zeros"] - before["overall"]["zeros"]
    assert added == 2 * fc1["numel"] // 4
    assert after["model_totals"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(sparsity_report(model, "fc1")["per_module"]) == {"model.decoder.layers.0.fc1", "model.decoder.layers.1.fc1"}


def test_a_local_evaluation_file_is_published_by_name_and_hash(tokenizer, heldout, tmp_path):
    import hashlib
    import re

    import yaml

    path = tmp_path / "secret-folder" / "eval.txt"
    path.parent.mkdir()
    path.write_text("\n".join(heldout[:60]))
    model = make_model("llama", vocab=len(tokenizer))
    dense = perplexity(model, tokenizer, str(path), seq_len=32, max_windows=2)
    pruner = Pruner(model, tokenizer)
    pruner.prune(MagnitudeConfig(sparsity=0.5), progress=False)
    record = perplexity_record(model, tokenizer, str(path), seq_len=32, max_windows=2, dense=dense)
    assert record["dataset"] == "eval.txt" and record["split"] is None and record["local"] is True
    assert record["protocol"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    folder = pruner.save_pretrained(tmp_path / "out", evaluations=[record])
    text = open(f"{folder}/README.md", encoding="utf-8").read()
    assert "secret-folder" not in text and str(tmp_path) not in text
    meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", text, flags=re.S).group(1))
    dataset = meta["model-index"][0]["results"][0]["dataset"]
    assert dataset["name"] == dataset["type"] == "eval.txt" and "split" not in dataset
    assert f"| perplexity | eval.txt (local) | - | 32 | 2 | {dense:.4f} | {record['value']:.4f} |" in text
