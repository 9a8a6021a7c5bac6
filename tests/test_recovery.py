"""Recovery fine-tuning of a pruned LM: Trainer + SparsityPreservingCallback keeps every pruned weight exactly
zero (N:M intact) through AdamW with weight decay; LoRA with PEFT merges back without losing the sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

from hf_prune import MagnitudeConfig, Pruner
from hf_prune.callbacks import SparsityPreservingCallback
from hf_prune.evaluation import perplexity
from hf_prune.patterns import nm_violations
from hf_prune.toy import toy_causal_lm
from hf_prune.training.lora import merge_lora_keep_sparsity
from hf_prune.training.weight_masks import WeightMasks

SEQ = 32


def _windows(tokenizer, texts: list[str], n: int) -> list[dict]:
    """``n`` random windows of ``SEQ`` tokens of the joined texts (seeded)."""
    ids = torch.tensor(tokenizer("\n\n".join(texts))["input_ids"])
    ids = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[:n]]
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, steps: int, lr: float, weight_decay: float = 0.1) -> T.TrainingArguments:
    return T.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=8,
                               learning_rate=lr, lr_scheduler_type="constant", weight_decay=weight_decay,
                               max_grad_norm=1.0, logging_steps=5, save_strategy="no", report_to="none",
                               use_cpu=True, seed=0, disable_tqdm=True)


def _ppl(model, tokenizer, heldout) -> float:
    return perplexity(model, tokenizer, heldout[:200], seq_len=SEQ, max_windows=24)


class GradProbe(T.TrainerCallback):
    """Placed before SparsityPreservingCallback: sees the gradients after clipping, before our own masking."""

    def __init__(self, masks: WeightMasks):
        self.masks, self.pruned_grad_nonzero, self.kept_grad_nonzero = masks, 0, 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for param, mask in self.masks.bind(model):
            self.pruned_grad_nonzero += int((param.grad[~mask] != 0).sum())
            self.kept_grad_nonzero += int((param.grad[mask] != 0).sum())


@pytest.fixture()
def pruned_toy(toy_cache):
    model, tokenizer = toy_causal_lm("tiny", cache_dir=toy_cache)
    return model, tokenizer


def test_trainer_keeps_nm_exact_and_recovers(pruned_toy, corpus, heldout, tmp_path):
    model, tokenizer = pruned_toy
    pruner = Pruner(model, tokenizer)
    pruner.prune(MagnitudeConfig(pattern="1:4"), progress=False)  # keep 1 of every 4: enough damage to recover
    masks = WeightMasks.from_model(model)
    assert len(masks.masks) == 14
    pruned_ppl = _ppl(model, tokenizer, heldout)

    probe, keeper = GradProbe(masks), SparsityPreservingCallback()
    trainer = T.Trainer(model=model, args=_args(tmp_path, 12, 3e-3), train_dataset=_windows(tokenizer, corpus, 96),
                        callbacks=[probe, keeper])
    trainer.train()
    tuned_ppl = _ppl(model, tokenizer, heldout)
    assert tuned_ppl < 0.9 * pruned_ppl, (pruned_ppl, tuned_ppl)  # 68.4 -> 56.0 (dense 53.7)
    for name, mask in masks.masks.items():
        weight = model.get_parameter(name)
        assert torch.equal(weight != 0, mask), name  # exactly the pruned zeros, and only them
        assert nm_violations(weight, 1, 4) == 0
    assert probe.pruned_grad_nonzero == 0 and probe.kept_grad_nonzero > 0  # masked before clipping
    summary = keeper.summary()
    assert summary["steps"] == 12 and summary["masked_modules"] == 14 and summary["masked_modules_trained"] == 14
    assert summary["pruned_weights_nonzero_after_training"] == 0
    assert summary["pruned_weights_kept_zero"] == sum(int((~m).sum()) for m in masks.masks.values())
    assert summary["weight_decay"] == 0.1 and summary["last_logged_loss"] < summary["first_logged_loss"]

    out = pruner.save_pretrained(tmp_path / "out", finetuning=summary)
    card = open(f"{out}/README.md").read()
    assert "recovery-finetuned" in card and "## Recovery fine-tuning" in card
    assert "| pruned_weights_nonzero_after_training | `0` |" in card and "| steps | `12` |" in card


def test_without_the_callback_adamw_revives_pruned_weights_and_the_card_says_so(pruned_toy, corpus, tmp_path):
    model, tokenizer = pruned_toy
    pruner = Pruner(model, tokenizer)
    pruner.prune(MagnitudeConfig(pattern="2:4"), progress=False)
    masks = WeightMasks.from_model(model)
    T.Trainer(model=model, args=_args(tmp_path, 3, 2e-3), train_dataset=_windows(tokenizer, corpus, 24)).train()
    assert masks.violations(model) > 0
    with pytest.warns(UserWarning, match="14 pruned modules .* no longer hold the zeros the pruning left"):
        out = pruner.save_pretrained(tmp_path / "out")
    assert "**Note:** the weights of 14 pruned modules" in open(f"{out}/README.md").read()


def test_lora_merge_keeps_the_sparsity_pattern(pruned_toy, corpus, heldout, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = pruned_toy
    pruner = Pruner(model, tokenizer)
    pruner.prune(MagnitudeConfig(sparsity=0.8), progress=False)
    masks = WeightMasks.from_model(model)
    pruned_ppl = _ppl(model, tokenizer, heldout)

    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    keeper = SparsityPreservingCallback()  # takes the masks of the frozen base through PEFT's wrapping
    T.Trainer(model=lora, args=_args(tmp_path, 10, 5e-3, weight_decay=0.0),
              train_dataset=_windows(tokenizer, corpus, 80), callbacks=[keeper]).train()
    assert keeper.summary()["masked_modules"] == 14 and keeper.summary()["masked_modules_trained"] == 0
    adapter_ppl = _ppl(lora, tokenizer, heldout)
    assert adapter_ppl < 0.95 * pruned_ppl

    naive = copy.deepcopy(lora).merge_and_unload()  # what PEFT alone does: the dense update fills the zeros
    assert masks.violations(naive) > 0.9 * sum(int((~m).sum()) for m in masks.masks.values())

    merge = merge_lora_keep_sparsity(lora)
    assert merge.model is pruner.model and not any("lora" in n for n, _ in merge.model.named_modules())
    for name, mask in masks.masks.items():
        assert torch.equal(merge.model.get_parameter(name) != 0, mask), name
    # at 80% sparsity about 80% of the LoRA update falls on pruned positions and is dropped: that is the cost
    assert merge.masked_modules == 14 and 0.7 < merge.dropped_fraction < 0.9
    merged_ppl = _ppl(merge.model, tokenizer, heldout)
    assert adapter_ppl < merged_ppl < pruned_ppl, (pruned_ppl, adapter_ppl, merged_ppl)


def test_callback_and_merge_errors(toy_cache):
    from peft import LoraConfig, get_peft_model

    dense, _ = toy_causal_lm("tiny", cache_dir=toy_cache)
    callback = SparsityPreservingCallback()
    with pytest.raises(ValueError, match="the model holds no pruned weights"):
        callback.on_train_begin(None, T.TrainerState(), T.TrainerControl(), model=dense)
    with pytest.raises(ValueError, match="available after trainer.train"):
        callback.summary()
    with pytest.raises(TypeError, match="masks must be a hf_prune.masks.WeightMasks"):
        SparsityPreservingCallback(masks={"a": torch.ones(2)})
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        merge_lora_keep_sparsity(dense)
    with pytest.raises(ValueError, match="holds no pruned weights; use peft_model.merge_and_unload"):
        merge_lora_keep_sparsity(get_peft_model(dense, LoraConfig(r=2, target_modules=["q_proj"])))
