"""ModHiFi-U: forget one class of a classifier by editing the components that carry it (no training).

Statistics come from samples of the class to forget (the paper); the targets are, per block, the layers
whose inputs are components: the MLP output Linear of transformer blocks (component = hidden neuron) and
every Conv2d of conv-net blocks (component = input channel, i.e. one kernel slice per output; the Gram is
that of the unfolded patches). For each output ``c`` the ``unlearn_fraction`` of components with the
highest score (singleton fidelity by default) form its HiFi set for the forget class, and their weights are
edited: zeroed in BatchNorm nets, negated in LayerNorm + residual nets (``unlearn_edit="auto"`` picks by
the architecture). Blocks are walked in order, the edited outputs feeding later blocks. Nothing is
trained and no parameter is removed.

Ours, and documented as such:
- the Gram is uncentred (the paper centres BatchNorm nets with the BN running means, which are not
  available per component; centring on the forget samples' own mean removes the very class signal sought);
- with ``remain_data``, a pair is ranked by its selectivity (``ops.selectivity``: the share of the output's
  energy it carries on the forget class over its share on the remaining classes) instead of its forget-only
  score, which spares components the other classes rely on;
- ``unlearn_layers`` restricts the edit to the last layers (the paper edits the last 12 conv layers of
  VGG-19 and does not state the scope for the other nets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...calibration.data import column, is_prepared, load_rows, pad_batch, text_tokenizer
from ...engine.report import RunMeter, module_entry
from ...engine.run import changed_in_place, prepare
from ...engine.stats import LinearStats
from ...engine.walker import model_device, to_device
from ...errors import CalibrationDataError
from ...models import Family, Stage
from . import ops
from .config import ModHiFiConfig
from .result import ModHiFiResult

_LABEL_KEYS = ("labels", "label")


# ---------------------------------------------------------------------------------------------- data


def labelled_batches(source: Any, config: ModHiFiConfig, *, tokenizer: Any, processor: Any, needs: set[str],
                     purpose: str) -> tuple[list[dict], list[torch.Tensor | None], dict]:
    """Model-input batches, their labels (or None) and provenance from ``source``: ready batches (a
    ``DataLoader`` or a list of dicts of tensors, labels under ``labels``/``label``/``label_column``), or
    records (a ``datasets.Dataset``, a list of dicts, a file) with a text or image column and a label column."""
    cal = config.calibration
    label_keys = (*_LABEL_KEYS, config.label_column)
    if is_prepared(source):
        batches, labels = [], []
        for batch in source:
            if not isinstance(batch, Mapping):
                raise CalibrationDataError(f"{purpose} batches must be dicts of tensors, got {type(batch).__name__}.")
            label = next((batch[k] for k in label_keys if k in batch and torch.is_tensor(batch[k])), None)
            inputs = {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in label_keys}
            if not inputs:
                raise CalibrationDataError(f"a {purpose} batch holds no input tensors (keys: {sorted(batch)}).")
            batches.append(inputs)
            labels.append(None if label is None else label.detach().long().cpu().flatten())
        if not batches:
            raise CalibrationDataError(f"the {purpose} data is empty.")
        return batches, labels, {"source": "<prepared model-input batches>",
                                 "samples": sum(next(iter(b.values())).shape[0] for b in batches)}
    rows, provenance = load_rows(source, split=cal.split, dataset_config=cal.dataset_config, purpose=purpose)
    if not rows or not isinstance(rows[0], Mapping):
        raise CalibrationDataError(f"the {purpose} data must be records with an input column and a "
                                   f"{config.label_column!r} column (or ready model-input batches).")
    values = column(rows, config.label_column, "label") if config.label_column in rows[0] else None
    chunks = [list(range(i, min(i + cal.batch_size, len(rows)))) for i in range(0, len(rows), cal.batch_size)]
    if "pixel_values" in needs:
        if processor is None:
            raise CalibrationDataError(f"image {purpose} data needs an image processor: create the Pruner with "
                                       "processor=... or load it with Pruner.from_pretrained.")
        images = column(rows, cal.image_column, "image")
        image_processor = getattr(processor, "image_processor", processor)
        batches = [{k: v for k, v in image_processor(images=[images[j] for j in chunk], return_tensors="pt").items()
                    if torch.is_tensor(v)} for chunk in chunks]
    else:
        tok = tokenizer if tokenizer is not None else processor
        if tok is None:
            raise CalibrationDataError(f"text {purpose} data needs a tokenizer: create the Pruner with tokenizer=...")
        texts = column(rows, cal.text_column)
        tok = text_tokenizer(tok)
        encoded = tok(list(texts), truncation=True, max_length=cal.seq_len, verbose=False)["input_ids"]
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        batches = [pad_batch([encoded[j] for j in chunk], pad_id) for chunk in chunks]
    labels = [None if values is None else torch.tensor([int(values[j]) for j in chunk], dtype=torch.long)
              for chunk in chunks]
    return batches, labels, {**provenance, "samples": len(rows)}


@torch.no_grad()
def predict(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """The classifier's predicted class for every sample of ``batches``."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        preds = []
        for batch in batches:
            out = model(**to_device(batch, device))
            logits = getattr(out, "logits", None)
            if logits is None or logits.dim() != 2:
                raise ValueError(f"ModHiFi unlearning needs a classifier that returns logits [batch, classes]; "
                                 f"{type(model).__name__} does not.")
            preds.append(logits.argmax(-1).cpu())
        return torch.cat(preds)
    finally:
        model.train(was_training)


def _accuracy(preds: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    return None if labels is None or labels.numel() == 0 else float((preds == labels).double().mean())


def _cat_labels(labels: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(lab is None for lab in labels) else torch.cat(labels)


# ---------------------------------------------------------------------------------------------- targets


def unlearn_targets(model: nn.Module, stages: list[Stage]) -> list[tuple[str, str, nn.Module]]:
    """(block, module name, module) of every layer whose inputs are components, in walk order: the MLP
    output Linear of transformer blocks, every Conv2d of conv-net blocks."""
    found = []
    for stage in stages:
        for block_name, block in zip(stage.block_names(model), stage.blocks(model)):
            if stage.mlp is not None:
                name = f"{block_name}.{stage.mlp.output}"
                found.append((block_name, name, model.get_submodule(name)))
            else:
                found.extend((block_name, f"{block_name}.{sub}", m) for sub, m in block.named_modules()
                             if isinstance(m, nn.Conv2d))
    return found


class UnlearnProcessor:
    """With ``edit=None``: records the Gram of every target's inputs (the remaining classes' pass). Otherwise:
    scores every (output, component) pair on the forget data and edits each output's top pairs."""

    def __init__(self, config: ModHiFiConfig, targets: list[tuple[str, str, nn.Module]], *, edit: str | None,
                 remain_grams: dict[str, torch.Tensor] | None = None):
        self.config, self.edit = config, edit
        self.by_block: dict[str, list[tuple[str, nn.Module]]] = {}
        for block, name, module in targets:
            self.by_block.setdefault(block, []).append((name, module))
        self.remain_grams = remain_grams or {}
        self.grams: dict[str, torch.Tensor] = {}
        self.layers: dict[str, dict] = {}

    def statistics(self, block_name: str, block: nn.Module) -> dict[str, tuple[nn.Module, frozenset]]:
        return {name: (module, frozenset({"gram"})) for name, module in self.by_block.get(block_name, [])}

    def process(self, block_name: str, block: nn.Module, stats: dict[str, LinearStats]) -> None:
        for name, module in self.by_block.get(block_name, []):
            G = stats[name].gram.to(torch.float64)
            if self.edit is None:
                self.grams[name] = G.cpu()
                continue
            weight = module.weight
            if name in self.remain_grams:
                scores = ops.selectivity(weight.detach(), G, self.remain_grams[name].to(G.device))
            else:
                scores = ops.per_output_scores(self.config.score, weight.detach(), G)
            d, m = scores.shape
            k = max(1, math.ceil(self.config.unlearn_fraction * m))
            chosen = torch.zeros(d, m, dtype=torch.bool, device=scores.device)
            chosen.scatter_(1, torch.topk(scores, k, dim=1).indices, True)
            mask = chosen.reshape(d, m, *([1] * (weight.dim() - 2))).to(weight.device).expand_as(weight)
            with torch.no_grad():
                if self.edit == "zero":
                    weight.masked_fill_(mask, 0)
                else:
                    weight.copy_(torch.where(mask, -weight, weight))
            self.layers[name] = {"block": block_name, "outputs": d, "components": m, "edited_per_output": k,
                                 "edited": int(chosen.sum()), "tokens": stats[name].tokens}


# ---------------------------------------------------------------------------------------------- run


def _choose_edit(config: ModHiFiConfig, family: Family) -> str:
    if config.unlearn_edit != "auto":
        return config.unlearn_edit
    return "zero" if family.normalization == "batch" else "negate"


def run_unlearn(pruner: Any, config: ModHiFiConfig, *, device: str | torch.device | None = None,
                progress: bool = True) -> ModHiFiResult:
    model = pruner.model
    run = prepare(model, device)
    targets = unlearn_targets(model, run.stages)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no layer ModHiFi can edit (MLP output Linears or Conv2d "
                         "layers inside its blocks).")
    if config.unlearn_layers is not None:
        if config.unlearn_layers > len(targets):
            raise ValueError(f"ModHiFiConfig.unlearn_layers={config.unlearn_layers} exceeds the {len(targets)} "
                             f"editable layers of {type(model).__name__}; use at most {len(targets)} "
                             "(or None for all).")
        targets = targets[-config.unlearn_layers:]
    edit = _choose_edit(config, run.family)
    with RunMeter() as meter:
        with meter.phase("data"):
            forget, forget_labels, forget_prov = labelled_batches(
                config.forget_data, config, tokenizer=pruner.tokenizer, processor=pruner.processor, needs=run.needs,
                purpose="forget")
            remain, remain_labels, remain_prov = (None, None, None)
            if config.remain_data is not None:
                remain, remain_labels, remain_prov = labelled_batches(
                    config.remain_data, config, tokenizer=pruner.tokenizer, processor=pruner.processor,
                    needs=run.needs, purpose="remain")
        with meter.phase("evaluate_before"):
            forget_pred = predict(model, forget)
            remain_pred = predict(model, remain) if remain is not None else None
        flat_forget_labels = _cat_labels(forget_labels)
        forget_class = _forget_class(model, config, flat_forget_labels, forget_pred)
        forget_truth = torch.full_like(forget_pred, forget_class)
        remain_truth = _cat_labels(remain_labels) if remain is not None else None
        before = {"forget_accuracy": _accuracy(forget_pred, forget_truth),
                  "remain_accuracy": _accuracy(remain_pred, remain_truth) if remain is not None else None}
        with meter.phase("unlearn"):
            remain_grams = None
            if remain is not None:
                recorder = UnlearnProcessor(config, targets, edit=None)
                run.walk(remain, recorder, progress=progress, desc="modhifi remain")
                remain_grams = recorder.grams
            processor = UnlearnProcessor(config, targets, edit=edit, remain_grams=remain_grams)
            with changed_in_place(lambda: len(processor.layers), "{n} layers were already edited"):
                run.walk(forget, processor, progress=progress, desc="modhifi unlearn")
        with meter.phase("evaluate_after"):
            after = {"forget_accuracy": _accuracy(predict(model, forget), forget_truth),
                     "remain_accuracy": _accuracy(predict(model, remain), remain_truth) if remain is not None else None}
    unlearn_seconds = meter.phases["unlearn"]
    entries = {name: module_entry(module.weight.detach(), None, None) for _, name, module in targets}
    block_of = {name: block for block, name, _ in targets}
    edited = sum(layer["edited"] for layer in processor.layers.values())
    unlearning = {"forget_class": forget_class, "edit": edit, "score": config.score,
                  "selection": "selectivity (forget vs remain energy share)" if remain is not None else
                  f"per-output HiFi sets ({config.score})",
                  "unlearn_fraction": config.unlearn_fraction, "before": before, "after": after,
                  "forget_samples": int(forget_pred.numel()),
                  "remain_samples": int(remain_pred.numel()) if remain_pred is not None else 0,
                  "edited_components": edited, "time_s": round(unlearn_seconds, 4), "layers": processor.layers}
    note = (f"ModHiFi-U unlearned class {forget_class}: {edited:,} (output, component) weights "
            f"{'zeroed' if edit == 'zero' else 'negated'} in {len(processor.layers)} layers in "
            f"{unlearn_seconds:.1f} s, "
            f"no training and no parameter removed (the model has its original size and speed). Forget-class "
            f"accuracy {_pct(before['forget_accuracy'])} -> {_pct(after['forget_accuracy'])}"
            + (f", remaining classes {_pct(before['remain_accuracy'])} -> {_pct(after['remain_accuracy'])}"
               if before["remain_accuracy"] is not None else "") + " on the samples given.")
    report = run.report(config, mode="unlearn", pattern=f"unlearn-{edit}", entries=entries, block_of=block_of,
                        calibration={"forget": forget_prov, "remain": remain_prov}, meter=meter,
                        sections={"unlearning": unlearning, "structured_note": note})
    return ModHiFiResult(config=config, report=report, model=model)


def _forget_class(model: nn.Module, config: ModHiFiConfig, labels: torch.Tensor | None, preds: torch.Tensor) -> int:
    if config.forget_class is not None:
        chosen = config.forget_class
    else:
        chosen = int(torch.mode(labels if labels is not None else preds).values)
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if classes is not None and not 0 <= chosen < classes:
        raise ValueError(f"forget_class={chosen} is not a class of this {classes}-class model; use 0..{classes - 1}.")
    if labels is not None and bool((labels != chosen).any()):
        raise ValueError(f"forget_data holds samples labelled {sorted(set(labels.tolist()))}, but it must hold only "
                         f"the class to forget ({chosen}); pass the other classes as remain_data.")
    return chosen


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
