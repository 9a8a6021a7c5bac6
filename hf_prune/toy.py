"""Small *trained* models for examples, tests and benchmarks that must run offline on a laptop CPU.

``toy_causal_lm()`` trains a byte-level BPE tokenizer and a small LLaMA (grouped-query attention) on the
``train`` split of ``builtin:python-docs`` and caches both in a folder, so the second call loads in a
second. Perplexity on the disjoint ``test`` split is then meaningful, which a random model's is not.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from .atomic import atomic_output_dir
from .calibration.corpus import builtin_texts

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>", "<image>"]


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (ids 0-5 are special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")


@dataclass(frozen=True)
class ToySpec:
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float = 3e-3
    seed: int = 0


SIZES = {
    "tiny": ToySpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, seq_len=64,
                    batch_size=16, steps=150, lr=3e-3),
    "small": ToySpec(),
}


def toy_llama(spec: ToySpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                         max_position_embeddings=max(256, spec.seq_len), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train_causal_lm(model, tokenizer, texts: list[str], *, steps: int, batch_size: int, seq_len: int,
                    lr: float, seed: int = 0) -> list[float]:
    """Plain next-token training on random windows of the joined texts (AdamW, cosine decay); returns losses."""
    ids = torch.tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"], dtype=torch.long)
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def default_cache_dir() -> str:
    base = os.environ.get("HF_PRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_prune")
    return os.path.join(base, "toy")


def toy_causal_lm(size: str = "small", cache_dir: str | None = None):
    """(model, tokenizer): a LLaMA trained on builtin:python-docs (train split), cached on disk."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = toy_folder(size, cache_dir)
    return LlamaForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def toy_folder(size: str = "small", cache_dir: str | None = None) -> str:
    """The folder holding the trained toy model and tokenizer (trained and saved on first use)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {sorted(SIZES)}.")
    spec = SIZES[size]
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    folder = os.path.join(cache_dir or default_cache_dir(), f"llama-{size}-{key}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    texts = list(builtin_texts("builtin:python-docs", "train"))
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    model = toy_llama(spec, tokenizer)
    torch.manual_seed(spec.seed)
    train_causal_lm(model, tokenizer, texts, steps=spec.steps, batch_size=spec.batch_size, seq_len=spec.seq_len,
                    lr=spec.lr, seed=spec.seed)
    with atomic_output_dir(folder, overwrite=True) as tmp:  # the cache's own folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
