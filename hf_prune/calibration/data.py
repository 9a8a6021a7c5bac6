"""Calibration data: any supported source -> a list of model-input batches plus a provenance record.

Sources: a list of strings; ``builtin:python-docs``; a local ``.txt`` (one text per non-empty line),
``.jsonl``/``.json``/``.csv`` file or a ``save_to_disk`` folder; a ``datasets.Dataset`` /
``DatasetDict``; a Hub dataset name (needs network); or ready model inputs (a ``DataLoader`` or a
list of dicts of tensors), used as given.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import DATA_EXTENSIONS, describe_object, looks_like_path
from ..errors import CalibrationDataError
from .config import CalibrationConfig, context_note
from .corpus import BUILTIN_PREFIX, builtin_provenance, builtin_texts


@dataclass
class CalibrationSet:
    batches: list[dict[str, torch.Tensor]]
    provenance: dict


# --------------------------------------------------------------------------------------------
# reading sources


def is_prepared(source: Any) -> bool:
    if isinstance(source, torch.utils.data.DataLoader):
        return True
    return isinstance(source, (list, tuple)) and len(source) > 0 and isinstance(source[0], Mapping)


class FileRows(list):
    """Rows read from a local file, remembering the line each one starts on, so that an error about a record can
    name ``path:line``."""

    def __init__(self, path: str, rows: list, lines: list[int] | None = None):
        super().__init__(rows)
        self.path = path
        self.lines = lines

    def where(self, index: int) -> str:
        return f"{self.path}:{self.lines[index]}" if self.lines is not None else f"{self.path} (record {index + 1})"


def describe_record(rows: list, index: int) -> str:
    """How an error names record ``index`` of ``rows``: ``path:line`` for a file, else its position."""
    return rows.where(index) if isinstance(rows, FileRows) else f"record {index + 1} of the calibration data"


def _utf8_error(path: str) -> CalibrationDataError:
    """The error for a file that is not valid UTF-8, naming the line of its first bad byte."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return CalibrationDataError(f"{path}:{line} is not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file "
                                    "as UTF-8.")
    return CalibrationDataError(f"{path} is not valid UTF-8; save the file as UTF-8.")  # pragma: no cover


def _rows_from_file(path: str) -> list[dict]:
    try:
        return _parse_file(path)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None


def _parse_file(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as fh:
        if ext in (".txt", ".text", ".md", ""):
            return [{"text": line.rstrip("\n")} for line in fh if line.strip()]
        if ext == ".jsonl":
            rows, lines = [], []
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CalibrationDataError(f"{path}:{number} is not valid JSON ({exc.msg}).") from None
                    if not isinstance(record, dict):
                        raise CalibrationDataError(
                            f"{path}:{number} is a JSON {type(record).__name__}, not an object; every line of a "
                            '.jsonl file must be one record such as {"text": "..."}.')
                    rows.append(record)
                    lines.append(number)
            return FileRows(path, rows, lines)
        if ext == ".json":
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg}).") from None
            if isinstance(data, dict):  # {"text": [...], ...} columns
                keys = list(data)
                return [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
            if isinstance(data, list):
                return FileRows(path, [r if isinstance(r, dict) else {"text": r} for r in data])
            raise CalibrationDataError(f"{path} must hold a list of records or a dict of columns.")
        if ext == ".csv":
            reader = csv.DictReader(fh)
            rows, lines = [], []
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
            return FileRows(path, rows, lines)
    raise CalibrationDataError(f"{path}: unsupported file type {ext!r}; use .txt, .jsonl, .json or .csv.")


def local_file_provenance(path: str) -> dict:
    """How a local file is recorded wherever it may be published (reports, cards, ``model-index``): its file name
    and the SHA-256 of its content, never the machine's path."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"source": os.path.basename(path), "sha256": digest.hexdigest(), "local": True}


def load_rows(source: Any, *, split: str = "train", dataset_config: str | None = None,
              purpose: str = "calibration") -> tuple[list, dict]:
    """Rows (dicts, or plain strings) of a source, and where they came from."""
    if source is None:
        raise CalibrationDataError(
            f"no {purpose} data was given: pass calibration_dataset=... (a list of texts, a datasets.Dataset, a "
            "local file, or 'builtin:python-docs', which works offline) or set CalibrationConfig(dataset=...).")
    if isinstance(source, (list, tuple)) and all(isinstance(t, str) for t in source):
        return list(source), {"source": describe_object(list(source))}
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if source.startswith(BUILTIN_PREFIX):
            return list(builtin_texts(source, split)), {"source": source, **builtin_provenance(source, split)}
        if source.startswith("<in-memory"):
            raise CalibrationDataError(
                f"the calibration source was an in-memory object ({source}) and cannot be reloaded from a "
                "config file; pass it again as calibration_dataset=...")
        if os.path.isfile(source):
            return _rows_from_file(source), local_file_provenance(source)
        if not os.path.exists(source) and looks_like_path(source, DATA_EXTENSIONS):
            raise CalibrationDataError(f"no such file: {source!r} (a local path, so it was not looked up as a Hub "
                                       "dataset); check the path.")
        if os.path.isdir(source):
            import datasets

            try:
                loaded = datasets.load_from_disk(source)
            except Exception:  # not a save_to_disk folder: let datasets infer the builder
                loaded = datasets.load_dataset(source, dataset_config, split=split)
            return load_rows(loaded, split=split, purpose=purpose)[0], {
                "source": f"local folder {os.path.basename(os.path.abspath(source))}", "local": True, "split": split}
        return _rows_from_hub(source, split, dataset_config)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a hard dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise CalibrationDataError(f"the DatasetDict has splits {list(source)}, not {split!r}; "
                                       "set CalibrationConfig(split=...).")
        return load_rows(source[split], split=split, purpose=purpose)
    if datasets is not None and isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return list(source), {"source": describe_object(source)}
    raise CalibrationDataError(
        f"unsupported {purpose} source of type {type(source).__name__}; use a list of strings, a "
        "datasets.Dataset, a local .txt/.jsonl/.json/.csv path, 'builtin:python-docs', a Hub dataset name, or "
        "a DataLoader / list of dicts of model inputs.")


def _rows_from_hub(name: str, split: str, dataset_config: str | None) -> tuple[list, dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, dataset_config, split=split)
    except Exception as exc:  # network errors, unknown names, missing splits
        raise CalibrationDataError(
            f"could not load dataset {name!r} (config={dataset_config!r}, split={split!r}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Without network access pass a "
            "local file, a list of texts or 'builtin:python-docs'.") from None
    return list(loaded), {"source": name, "dataset_config": dataset_config, "split": split}


def column(rows: list, name: str, what: str = "text") -> list:
    """One column of the rows; plain-string rows are a text column. A record without it is an error that names the
    record (``path:line`` for a local file) and the fix."""
    if not rows:
        raise CalibrationDataError("the calibration data is empty.")
    if isinstance(rows[0], str):
        if what != "text":
            raise CalibrationDataError(f"the calibration data is a list of texts but the model needs {what}s.")
        return rows
    field = "text_column" if what == "text" else "image_column"
    for index, row in enumerate(rows):
        if isinstance(row, Mapping) and name in row:
            continue
        subject = "the calibration data" if index == 0 and not isinstance(rows, FileRows) else describe_record(rows, index)
        if not isinstance(row, Mapping):
            raise CalibrationDataError(f"{subject} is a {type(row).__name__}, not a record with a {what} column "
                                       f"{name!r}; make every record an object with that column.")
        if index == 0:
            raise CalibrationDataError(
                f"{subject} has no {what} column {name!r} (its columns: {sorted(row)}); set "
                f"CalibrationConfig({field}=...) to the right one.")
        raise CalibrationDataError(f"{subject} has no {what} column {name!r} (its keys: {sorted(row)}), unlike the "
                                   "first record; add it to that record or remove the record.")
    return [r[name] for r in rows]


def load_texts(source: Any, *, text_column: str = "text", split: str = "train",
               dataset_config: str | None = None, purpose: str = "calibration") -> tuple[list[str], dict]:
    rows, provenance = load_rows(source, split=split, dataset_config=dataset_config, purpose=purpose)
    texts = [t for t in column(rows, text_column) if isinstance(t, str)]
    return texts, provenance


# --------------------------------------------------------------------------------------------
# tokenisation


def text_tokenizer(tokenizer: Any) -> Any:
    return getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps one


def pad_batch(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def concat_windows(texts: list[str], tokenizer: Any, cfg: CalibrationConfig) -> tuple[list[dict], dict]:
    """Texts (in a seeded order) joined by blank lines, tokenised once, cut into non-overlapping windows."""
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(texts), generator=generator).tolist()
    budget = 8 * cfg.num_samples * cfg.seq_len  # characters: ~2x the tokens needed, so sampling stays random
    chosen, size = [], 0
    for i in order:
        chosen.append(texts[i])
        size += len(texts[i]) + 2
        if size >= budget:
            break
    ids = text_tokenizer(tokenizer)("\n\n".join(chosen), verbose=False)["input_ids"]
    windows = len(ids) // cfg.seq_len
    if windows < cfg.num_samples:
        raise CalibrationDataError(
            f"the calibration text is too short: {len(ids)} tokens make {windows} windows of seq_len={cfg.seq_len}, "
            f"fewer than num_samples={cfg.num_samples}. Give more text, or lower num_samples or seq_len.")
    picks = torch.randperm(windows, generator=generator)[: cfg.num_samples].tolist()
    data = torch.tensor(ids[: windows * cfg.seq_len], dtype=torch.long).view(windows, cfg.seq_len)[picks]
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
               for chunk in data.split(cfg.batch_size)]
    return batches, {"texts_used": len(chosen), "tokens_available": len(ids), "windows_available": windows,
                     "real_tokens": cfg.num_samples * cfg.seq_len}


def padded_texts(texts: list[str], tokenizer: Any, cfg: CalibrationConfig) -> tuple[list[dict], dict]:
    """Each text its own sample, truncated to seq_len and right-padded (padding excluded from statistics)."""
    if len(texts) < cfg.num_samples:
        raise CalibrationDataError(
            f"the calibration data has {len(texts)} non-empty texts, fewer than num_samples={cfg.num_samples}; "
            "give more texts or lower num_samples.")
    tok = text_tokenizer(tokenizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    picks = torch.randperm(len(texts), generator=generator)[: cfg.num_samples].tolist()
    encoded = tok([texts[i] for i in picks], truncation=True, max_length=cfg.seq_len, verbose=False)["input_ids"]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches = [pad_batch(chunk, pad_id) for chunk in _chunks(encoded, cfg.batch_size)]
    return batches, {"texts_used": cfg.num_samples, "real_tokens": sum(len(e) for e in encoded)}


def _prepared(source: Any, cfg: CalibrationConfig) -> tuple[list[dict], dict]:
    batches, rows = [], 0
    for batch in source:
        if not isinstance(batch, Mapping) or not batch:
            raise CalibrationDataError("prepared calibration batches must be non-empty dicts of tensors.")
        tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        if not tensors:
            raise CalibrationDataError(f"a calibration batch holds no tensors (keys: {sorted(batch)}).")
        size = next(iter(tensors.values())).shape[0]
        take = min(size, cfg.num_samples - rows)
        batches.append({k: v[:take] if v.dim() > 0 and v.shape[0] == size else v for k, v in tensors.items()})
        rows += take
        if rows >= cfg.num_samples:
            break
    if not batches:
        raise CalibrationDataError("the calibration data is empty.")
    return batches, {"source": "<prepared model-input batches>", "samples": rows}


# --------------------------------------------------------------------------------------------


def build_calibration(cfg: CalibrationConfig, source: Any = None, *, tokenizer: Any = None, processor: Any = None,
                      needs: set[str] | frozenset = frozenset({"input_ids"}), causal_lm: bool = False,
                      context: int | None = None) -> CalibrationSet:
    """Turn ``source`` (or ``cfg.dataset``) into batches of the model inputs ``needs`` names.

    ``context``: the most tokens the model reads per sequence (None: no limit known); an unset ``cfg.seq_len``
    becomes it when it is shorter than the default, which the record says, and a longer explicit one is refused.
    Prepared batches are used as given (their ``seq_len`` is only recorded)."""
    source = cfg.dataset if source is None else source
    prepared = is_prepared(source)
    cfg = cfg.fit_seq_len(None if prepared or "input_ids" not in needs else context)
    record = {"packing": None, "num_samples": cfg.num_samples, "seq_len": cfg.seq_len, "seed": cfg.seed,
              "batch_size": cfg.batch_size}
    if prepared:
        batches, info = _prepared(source, cfg)
        record.update(info, packing="prepared")
        return CalibrationSet(batches, record)
    note = context_note(cfg.seq_len, context) if "input_ids" in needs else None
    if note:
        record["seq_len_note"] = note

    rows, provenance = load_rows(source, split=cfg.split, dataset_config=cfg.dataset_config)
    record.update(provenance)
    if not rows:
        raise CalibrationDataError("the calibration data is empty.")
    wants_text, wants_image = "input_ids" in needs, "pixel_values" in needs
    if wants_image:
        batches, info = _image_batches(rows, cfg, processor or tokenizer, with_text=wants_text)
        record.update(info, packing="images+text" if wants_text else "images")
        return CalibrationSet(batches, record)

    tok = tokenizer if tokenizer is not None else processor
    if tok is None:
        raise CalibrationDataError("text calibration needs a tokenizer: create the Pruner with tokenizer=... "
                                   "or load it with Pruner.from_pretrained.")
    texts = [t for t in column(rows, cfg.text_column) if isinstance(t, str) and t.strip()]
    if not texts:
        raise CalibrationDataError(f"the calibration data holds no non-empty text in column {cfg.text_column!r}.")
    packing = cfg.packing if cfg.packing != "auto" else ("concat" if causal_lm else "pad")
    if packing == "concat":
        batches, info = concat_windows(texts, tok, cfg)
    else:
        batches, info = padded_texts(texts, tok, cfg)
    record.update(info, packing=packing, texts_available=len(texts), text_column=cfg.text_column)
    return CalibrationSet(batches, record)


def _image_batches(rows: list, cfg: CalibrationConfig, processor: Any, *, with_text: bool) -> tuple[list[dict], dict]:
    if processor is None:
        raise CalibrationDataError("image calibration needs an image processor: create the Pruner with "
                                   "processor=... or load it with Pruner.from_pretrained.")
    images = column(rows, cfg.image_column, "image")
    texts = column(rows, cfg.text_column) if with_text else None
    if len(images) < cfg.num_samples:
        raise CalibrationDataError(f"the calibration data has {len(images)} images, fewer than "
                                   f"num_samples={cfg.num_samples}; give more or lower num_samples.")
    generator = torch.Generator().manual_seed(cfg.seed)
    picks = torch.randperm(len(images), generator=generator)[: cfg.num_samples].tolist()
    batches = []
    for chunk in _chunks(picks, cfg.batch_size):
        imgs = [images[i] for i in chunk]
        if with_text:
            enc = processor(images=imgs, text=[texts[i] for i in chunk], padding=True, truncation=True,
                            max_length=cfg.seq_len, return_tensors="pt")
        else:
            image_processor = getattr(processor, "image_processor", processor)
            enc = image_processor(images=imgs, return_tensors="pt")
        batches.append({k: v for k, v in enc.items() if torch.is_tensor(v)})
    return batches, {"images_available": len(images), "image_column": cfg.image_column}
