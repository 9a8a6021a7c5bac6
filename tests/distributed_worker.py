"""Worker for tests/test_distributed.py, run by ``python -m torch.distributed.run --nproc_per_node 2`` (two CPU
processes, gloo on loopback). Phases:

- ``prune OUT``: ``hf-prune prune`` (Wanda) on a tiny LLaMA folder, initialising the process group itself; then
  every one-shot method of ``one_shot()`` prunes the same tiny LLaMA with data-parallel calibration;
  each rank dumps its pruned weights and report; rank 0's ``save_pretrained`` folder is the only one written; then
  Input Compensation and a recovery run (SparsityPreservingCallback, then LoRA + merge) train under DDP, and a
  mask-keeping run is resumed from its Trainer checkpoint; last, a checkpointed Wanda run whose rank 0 is killed after its first checkpoint (the launch then fails).
- ``resume OUT``: the killed run resumed with two processes; each rank dumps its weights.

The builders (model, batches, configs, training runs) are imported by the test to compute the single-process
reference with the same global batch.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VOCAB = 256
SEQ = 16


def make_llama(seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                            pad_token_id=3)).eval()


def calibration_batches(n: int = 6, batch: int = 2) -> list[dict]:
    """``n`` model-input batches of random tokens; the last rows carry right padding (padding must not count)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(6, VOCAB, (batch, SEQ), generator=g)
        mask = torch.ones(batch, SEQ, dtype=torch.long)
        mask[-1, SEQ - 3 - i % 3:] = 0
        ids[mask == 0] = 3
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def one_shot() -> dict:
    from hf_prune import ECoFLaPConfig, ModHiFiConfig, RIAConfig, SparseGPTConfig, SPPConfig, WandaConfig

    return {
        "wanda": WandaConfig(sparsity=0.5),
        "wanda64": WandaConfig(sparsity=0.5, accum_dtype="float64"),  # statistics summed in float64
        "ria": RIAConfig(sparsity=0.5),
        "sparsegpt": SparseGPTConfig(pattern="2:4"),
        "ecoflap": ECoFLaPConfig(sparsity=0.5, score="zeroth_order", zo_num_noise=1, num_score_samples=4,
                                 zo_stop_tol=0.5, zo_round_samples=2),  # early stopping: rounds of 1 batch
        "modhifi": ModHiFiConfig(sparsity=0.25),
        "spp": SPPConfig(sparsity=0.5, training_free=True),
    }


def train_rows(n: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": row, "labels": row} for row in torch.randint(6, VOCAB, (n, SEQ), generator=g)]


def training_args(folder: str, *, per_device: int, steps: int, lr: float, **extra):
    import transformers as T

    return T.TrainingArguments(output_dir=folder, max_steps=steps, per_device_train_batch_size=per_device,
                               learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=1.0, report_to="none",
                               save_strategy=extra.pop("save_strategy", "no"), use_cpu=True, disable_tqdm=True,
                               seed=0, data_seed=0, train_sampling_strategy="sequential", logging_steps=2, **extra)


def pruned_llama():
    """The tiny LLaMA pruned 2:4 with Magnitude (data-free: the same on every rank), and its dense copy."""
    from hf_prune import MagnitudeConfig, Pruner

    model = make_llama()
    dense = copy.deepcopy(model)
    Pruner(model).prune(MagnitudeConfig(pattern="2:4"), progress=False)
    return model, dense


def train_ic(folder: str, per_device: int) -> dict[str, torch.Tensor]:
    """Input Compensation's pool after 6 steps (global batch 8)."""
    import transformers as T

    from hf_prune import InputCompensatedModel, InputCompensationConfig
    from hf_prune.callbacks import InputCompensationCallback

    model, dense = pruned_llama()
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=8, loss="kd_kl"), teacher=dense)
    trainer = T.Trainer(model=ic, args=training_args(folder, per_device=per_device, steps=6, lr=1e-2,
                                                     save_strategy="steps", save_steps=6),
                        train_dataset=train_rows(), callbacks=[InputCompensationCallback()])
    trainer.train()
    return {k: v.detach().clone() for k, v in ic.state_dict().items()}


def train_recovery(folder: str, per_device: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Recovery fine-tuning of the pruned LLaMA with SparsityPreservingCallback (AdamW, weight decay) for 4 steps,
    then LoRA for 4 steps and the sparsity-keeping merge; the merged weights and what the runs report."""
    import transformers as T
    from peft import LoraConfig, get_peft_model

    from hf_prune.callbacks import SparsityPreservingCallback
    from hf_prune.training.lora import merge_lora_keep_sparsity
    from hf_prune.training.weight_masks import WeightMasks

    model, _ = pruned_llama()
    masks = WeightMasks.from_model(model)
    keeper = SparsityPreservingCallback()
    T.Trainer(model=model, args=training_args(os.path.join(folder, "full"), per_device=per_device, steps=4, lr=1e-3,
                                              weight_decay=0.1),
              train_dataset=train_rows(), callbacks=[keeper]).train()
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]))
    T.Trainer(model=lora, args=training_args(os.path.join(folder, "lora"), per_device=per_device, steps=4, lr=5e-3),
              train_dataset=train_rows(), callbacks=[SparsityPreservingCallback()]).train()
    merge = merge_lora_keep_sparsity(lora, masks)
    info = {"violations": masks.violations(merge.model), "dropped": merge.dropped_fraction,
            "summary": keeper.summary()}
    return {k: v.detach().clone() for k, v in merge.model.state_dict().items()}, info


def train_resumed(folder: str, per_device: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mask-keeping fine-tuning for 4 steps with a Trainer checkpoint at step 2, and the same run resumed from that
    checkpoint in a new Trainer: both final weights."""
    import transformers as T

    from hf_prune.callbacks import SparsityPreservingCallback

    def trainer(model, name):
        args = training_args(os.path.join(folder, name), per_device=per_device, steps=4, lr=1e-3, weight_decay=0.1,
                             save_strategy="steps", save_steps=2)
        return T.Trainer(model=model, args=args, train_dataset=train_rows(), callbacks=[SparsityPreservingCallback()])

    whole, _ = pruned_llama()
    trainer(whole, "whole").train()
    resumed, _ = pruned_llama()
    trainer(resumed, "resumed").train(resume_from_checkpoint=os.path.join(folder, "whole", "checkpoint-2"))
    return ({k: v.detach().clone() for k, v in whole.state_dict().items()},
            {k: v.detach().clone() for k, v in resumed.state_dict().items()})


def _save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def _cli(out: str) -> None:
    """``hf-prune prune`` as launched by torchrun: it initialises the process group itself (no group exists yet)."""
    import torch.distributed as dist

    from hf_prune.calibration import builtin_texts
    from hf_prune.cli import main as cli
    from hf_prune.toy import train_tokenizer

    folder = os.path.join(out, f"model_rank{os.environ['RANK']}")  # each rank its own copy: no group to wait on yet
    make_llama().save_pretrained(folder)
    train_tokenizer(list(builtin_texts("builtin:python-docs", "train"))[:200], vocab_size=VOCAB).save_pretrained(
        folder)
    assert not dist.is_initialized()
    code = cli(["prune", folder, "--method", "wanda", "--output", os.path.join(out, "cli"), "--no-progress",
                "--calibration", "builtin:python-docs", "--num-samples", "4", "--seq-len", "32", "--batch-size", "1"])
    assert code == 0 and dist.is_initialized() and dist.get_world_size() == 2


def _prune(out: str, rank: int) -> None:
    from hf_prune import Pruner, WandaConfig
    from hf_prune.engine.checkpoint import KILL_AFTER_ENV

    batches = calibration_batches()
    for name, config in one_shot().items():
        pruner = Pruner(make_llama())
        result = pruner.prune(config, calibration_dataset=batches, progress=False)
        _save(os.path.join(out, f"{name}_rank{rank}.safetensors"), pruner.model.state_dict())
        with open(os.path.join(out, f"{name}_rank{rank}.json"), "w") as fh:
            json.dump({"run": result.report["run"], "allocation": (result.report.get("allocation") or {}).get(
                "provenance")}, fh, default=str)
        if name == "wanda":
            pruner.save_pretrained(os.path.join(out, "saved"))  # rank 0 writes, rank 1 gets the path
    _save(os.path.join(out, f"ic_rank{rank}.safetensors"), train_ic(os.path.join(out, "ic"), per_device=4))
    merged, info = train_recovery(os.path.join(out, "recovery"), per_device=4)
    _save(os.path.join(out, f"recovery_rank{rank}.safetensors"), merged)
    with open(os.path.join(out, f"recovery_rank{rank}.json"), "w") as fh:
        json.dump(info, fh)
    whole, resumed = train_resumed(os.path.join(out, "resume"), per_device=4)
    _save(os.path.join(out, f"trained_whole_rank{rank}.safetensors"), whole)
    _save(os.path.join(out, f"trained_resumed_rank{rank}.safetensors"), resumed)
    with open(os.path.join(out, f"done_rank{rank}"), "w") as fh:
        fh.write("ok")
    if rank == 0:  # the main process, the checkpoint's writer, dies after the first block's checkpoint
        os.environ[KILL_AFTER_ENV] = "1"
    Pruner(make_llama()).prune(WandaConfig(sparsity=0.5), calibration_dataset=batches, progress=False,
                               checkpoint_dir=os.path.join(out, "checkpoint"))


def _resume(out: str, rank: int) -> None:
    from hf_prune import Pruner, WandaConfig

    pruner = Pruner(make_llama())
    result = pruner.prune(WandaConfig(sparsity=0.5), calibration_dataset=calibration_batches(), progress=False,
                          checkpoint_dir=os.path.join(out, "checkpoint"), resume=True)
    _save(os.path.join(out, f"resumed_rank{rank}.safetensors"), pruner.model.state_dict())
    with open(os.path.join(out, f"resumed_rank{rank}.json"), "w") as fh:
        json.dump(result.report["run"], fh, default=str)


def main() -> None:
    import torch.distributed as dist

    phase, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if phase == "prune":
        _cli(out)  # the CLI initialises the process group from torchrun's environment
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        (_prune if phase == "prune" else _resume)(out, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
