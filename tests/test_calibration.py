"""Calibration sources, packing, determinism and provenance."""

from __future__ import annotations

import hashlib
import json

import datasets
import pytest
import torch

from hf_prune import CalibrationConfig
from hf_prune.calibration import build_calibration, builtin_texts
from hf_prune.errors import CalibrationDataError


def test_builtin_corpus_splits_are_real_and_disjoint():
    train, test = builtin_texts("builtin:python-docs", "train"), builtin_texts("builtin:python-docs", "test")
    assert len(train) > 1000 and len(test) > 200
    assert not set(train) & set(test)
    assert all(len(t) >= 60 and ">>>" not in t for t in train[:200])
    with pytest.raises(CalibrationDataError, match="unknown built-in corpus"):
        builtin_texts("builtin:wikipedia")


def test_concat_windows_exact_and_seeded(tokenizer, corpus):
    cfg = CalibrationConfig(num_samples=10, seq_len=32, batch_size=4, packing="concat")
    a = build_calibration(cfg, corpus, tokenizer=tokenizer)
    b = build_calibration(cfg, corpus, tokenizer=tokenizer)
    c = build_calibration(CalibrationConfig(num_samples=10, seq_len=32, batch_size=4, packing="concat", seed=1),
                          corpus, tokenizer=tokenizer)
    ids = torch.cat([x["input_ids"] for x in a.batches])
    assert [x["input_ids"].shape[0] for x in a.batches] == [4, 4, 2] and ids.shape == (10, 32)
    assert torch.equal(ids, torch.cat([x["input_ids"] for x in b.batches]))
    assert not torch.equal(ids, torch.cat([x["input_ids"] for x in c.batches]))
    assert len({tuple(r.tolist()) for r in ids}) == 10  # distinct windows
    assert all(bool(x["attention_mask"].all()) for x in a.batches)
    assert a.provenance["packing"] == "concat" and a.provenance["real_tokens"] == 320


def test_pad_mode_keeps_texts_and_masks_padding(tokenizer, corpus):
    cfg = CalibrationConfig(num_samples=6, seq_len=20, batch_size=3, packing="pad")
    out = build_calibration(cfg, corpus[:50], tokenizer=tokenizer)
    mask = torch.cat([b["attention_mask"] for b in out.batches])
    assert mask.shape[0] == 6 and mask.shape[1] <= 20
    assert out.provenance["real_tokens"] == int(mask.sum())
    ids = torch.cat([b["input_ids"] for b in out.batches])
    assert bool((ids[mask == 0] == tokenizer.pad_token_id).all())


def test_auto_packing_follows_the_model_kind(tokenizer, corpus):
    cfg = CalibrationConfig(num_samples=2, seq_len=16)
    assert build_calibration(cfg, corpus, tokenizer=tokenizer, causal_lm=True).provenance["packing"] == "concat"
    assert build_calibration(cfg, corpus, tokenizer=tokenizer, causal_lm=False).provenance["packing"] == "pad"


def test_file_sources(tokenizer, corpus, tmp_path):
    cfg = CalibrationConfig(num_samples=3, seq_len=16, packing="pad")
    txt = tmp_path / "cal.txt"
    txt.write_text("\n".join(corpus[:5]) + "\n\n")
    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(corpus[:5])))
    js = tmp_path / "cal.json"
    js.write_text(json.dumps({"text": corpus[:5]}))
    csv = tmp_path / "cal.csv"
    csv.write_text("text\n" + "\n".join(f'"{t}"' for t in corpus[:5]))
    for path in (txt, jsonl, js, csv):
        out = build_calibration(cfg, str(path), tokenizer=tokenizer)
        # published in reports and cards: the file name and its content hash, never the machine's path
        assert out.provenance["source"] == path.name and out.provenance["texts_available"] == 5
        assert out.provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert str(tmp_path) not in json.dumps(out.provenance)
    bad = tmp_path / "cal.jsonl.broken.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(CalibrationDataError, match=r"cal.jsonl.broken.jsonl:2 is not valid JSON"):
        build_calibration(cfg, str(bad), tokenizer=tokenizer)
    with pytest.raises(CalibrationDataError, match="unsupported file type '.xml'"):
        (tmp_path / "c.xml").write_text("<a/>")
        build_calibration(cfg, str(tmp_path / "c.xml"), tokenizer=tokenizer)


def test_datasets_sources(tokenizer, corpus, tmp_path):
    cfg = CalibrationConfig(num_samples=4, seq_len=16, packing="pad", text_column="sentence", split="validation")
    ds = datasets.Dataset.from_dict({"sentence": corpus[:10], "label": list(range(10))})
    out = build_calibration(cfg, ds, tokenizer=tokenizer)
    assert out.provenance["source"].startswith("<datasets.Dataset of 10 rows, fingerprint:")
    dd = datasets.DatasetDict({"train": ds})
    with pytest.raises(CalibrationDataError, match=r"has splits \['train'\], not 'validation'"):
        build_calibration(cfg, dd, tokenizer=tokenizer)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert build_calibration(cfg, str(tmp_path / "saved"), tokenizer=tokenizer).provenance["texts_available"] == 10
    with pytest.raises(CalibrationDataError, match="could not load dataset 'someone/missing-dataset'.*builtin"):
        build_calibration(cfg, "someone/missing-dataset", tokenizer=tokenizer)


def test_prepared_batches_are_trimmed_to_num_samples():
    batches = [{"input_ids": torch.ones(4, 8, dtype=torch.long)}, {"input_ids": torch.ones(4, 8, dtype=torch.long)}]
    out = build_calibration(CalibrationConfig(num_samples=6), batches)
    assert [b["input_ids"].shape[0] for b in out.batches] == [4, 2]
    assert out.provenance["packing"] == "prepared" and out.provenance["samples"] == 6
    loader = torch.utils.data.DataLoader([{"input_ids": torch.ones(8, dtype=torch.long)}] * 5, batch_size=2)
    assert build_calibration(CalibrationConfig(num_samples=5), loader).provenance["samples"] == 5


def test_images_through_an_image_processor():
    from PIL import Image
    from transformers import ViTImageProcessor

    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 40, 3, generator=rng) * 255).byte().numpy()) for _ in range(6)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]})
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    out = build_calibration(CalibrationConfig(num_samples=5, batch_size=2), ds, processor=processor,
                            needs={"pixel_values"})
    assert [b["pixel_values"].shape for b in out.batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    with pytest.raises(CalibrationDataError, match=r"no image column 'img'.*image_column"):
        build_calibration(CalibrationConfig(num_samples=2, image_column="img"), ds, processor=processor,
                          needs={"pixel_values"})
    with pytest.raises(CalibrationDataError, match="needs an image processor"):
        build_calibration(CalibrationConfig(num_samples=2), ds, needs={"pixel_values"})
