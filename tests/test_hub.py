"""Model cards and push_to_hub, against a real HTTP server on 127.0.0.1 (tests/fakehub.py): what arrived, the
card's YAML and body, a stock from_pretrained of the pushed repo, and one-line errors without a Hub."""

from __future__ import annotations

import json
import re
import socket

import pytest
import torch
import transformers as T
import yaml
from conftest import make_model

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, PrunerConfig, WandaConfig
from hf_prune.artifacts.cards import CardSection
from hf_prune.artifacts.hub import push_folder
from hf_prune.cli import main
from hf_prune.errors import HubError
from hf_prune.evaluation import perplexity, perplexity_record

CAL = CalibrationConfig(num_samples=4, seq_len=32)
PNG = b"\x89PNG\r\n\x1a\n"


def _card(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, flags=re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def pruned(tokenizer):
    """A tiny LLaMA pruned with Wanda 2:4, with a dense-vs-pruned perplexity record (tests only read them)."""
    model = make_model("llama", vocab=len(tokenizer))
    dense = perplexity(model, tokenizer, "builtin:python-docs", seq_len=32, max_windows=3)
    pruner = Pruner(model, tokenizer)
    pruner.prune(WandaConfig(pattern="2:4", calibration=CAL), calibration_dataset="builtin:python-docs",
                 progress=False)
    record = perplexity_record(model, tokenizer, "builtin:python-docs", seq_len=32, max_windows=3, dense=dense)
    return pruner, record


def test_card_yaml_body_and_picture(pruned, tmp_path):
    pruner, record = pruned
    assert record["dense"] < record["value"] and record["windows"] == 3 and record["split"] == "test"
    out = tmp_path / "out"
    pruner.save_pretrained(out, evaluations=[record], sections=[CardSection("Notes", "Pruned for a **test**.")])
    assert (out / "sparsity_per_layer.png").read_bytes()[:8] == PNG
    meta, body = _card((out / "README.md").read_text())
    # stock transformers loads it: the Hub's "use this model" snippet is transformers'; hf_prune is a tag
    assert meta["library_name"] == "transformers" and "hf_prune" in meta["tags"]
    assert "base_model" not in meta  # a local model has no Hub id
    assert meta["tags"] == ["hf_prune", "pruned", "wanda", "sparsity-2of4"]
    assert meta["pipeline_tag"] == "text-generation"
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"] == {"name": "builtin:python-docs", "type": "builtin:python-docs", "split": "test",
                                 "args": {"seq_len": 32, "windows": 3}}
    assert result["metrics"] == [{"type": "perplexity", "value": record["value"]}]
    config = json.loads(re.search(r"```json\n(.*?)```", body, flags=re.S).group(1))
    assert config == pruner.last_result.config.to_dict()
    assert "| `self_attn.q_proj` | 2 | 0.5000 |" in body and "| **overall** | 14 | 0.5000 |" in body
    assert "![Achieved sparsity per layer](sparsity_per_layer.png)" in body
    assert "| seed | `0` |" in body and "| source | `builtin:python-docs` |" in body  # calibration provenance
    assert f"| {record['dense']} | {record['value']} |" in body  # dense vs pruned
    assert "window_rule: non-overlapping, exactly seq_len tokens" in body and "windows: the first 3 of" in body
    assert "## Notes\n\nPruned for a **test**." in body
    assert "semi-structured sparse kernels" in body and "speed on stock kernels are those of the dense" in body
    for package in ("hf_prune", "torch", "transformers", "peft", "huggingface_hub"):
        assert f"- {package}: " in body
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["card"]["evaluations"][0]["value"] == record["value"]


def test_card_names_hub_base_model_and_skips_picture_without_matplotlib(tokenizer, tmp_path, monkeypatch):
    import hf_prune.artifacts.plots

    model = make_model("opt", vocab=len(tokenizer))
    model.config._name_or_path = model.name_or_path = "facebook/opt-125m"
    pruner = Pruner(model, tokenizer)
    pruner.prune(MagnitudeConfig(sparsity=0.25), progress=False)
    monkeypatch.setattr(hf_prune.artifacts.plots, "have_matplotlib", lambda: False)
    pruner.save_pretrained(tmp_path / "out", repo_id="me/opt-magnitude")
    assert not (tmp_path / "out" / "sparsity_per_layer.png").exists()
    meta, body = _card((tmp_path / "out" / "README.md").read_text())
    assert meta["base_model"] == "facebook/opt-125m" and "model-index" not in meta
    assert "unstructured-sparsity" in meta["tags"] and "magnitude" in meta["tags"]
    assert "This is [facebook/opt-125m](https://huggingface.co/facebook/opt-125m)" in body
    assert "picture was not drawn because matplotlib is not installed (pip install 'hf-prune[plot]'" in body
    assert 'OPTForCausalLM.from_pretrained("me/opt-magnitude")' in body
    assert "Calibration: none (the method is data-free)" in body


def test_bad_card_inputs_fail_before_writing(pruned, tmp_path):
    pruner, _ = pruned
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"evaluations\[0\]\['value'\] must be a number"):
        pruner.save_pretrained(out, evaluations=[{"metric": "perplexity", "value": "low"}])
    with pytest.raises(TypeError, match="a card section must be a CardSection"):
        pruner.save_pretrained(out, sections=["just text"])
    assert not out.exists()


def test_push_pruner_then_stock_reload_from_the_hub(pruned, fake_hub, tmp_path):
    pruner, record = pruned
    info = pruner.push_to_hub("me/tiny-llama-wanda", private=True, token="hf_secret", evaluations=[record],
                              commit_message="prune with wanda")
    repo = fake_hub.repos["me/tiny-llama-wanda"]
    assert repo.private is True
    assert set(repo.files) == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                               "tokenizer.json", "tokenizer_config.json", "pruning_config.json",
                               "pruning_report.json", "sparsity_per_layer.png"}
    assert repo.files["sparsity_per_layer.png"][:8] == PNG
    assert [c["summary"] for c in repo.commits] == ["prune with wanda"] and info.oid == repo.heads["main"]
    assert all(r.headers.get("authorization") == "Bearer hf_secret" for r in fake_hub.requests
               if r.path.startswith("/api/repos") or "/commit/" in r.path)
    meta, body = fake_hub.card("me/tiny-llama-wanda")  # OUR card, not transformers' default one
    assert meta["library_name"] == "transformers" and {"hf_prune", "wanda"} <= set(meta["tags"])
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == record["value"]
    assert 'LlamaForCausalLM.from_pretrained("me/tiny-llama-wanda")' in body
    # what arrived is a checkpoint the stock class loads from the Hub, with identical outputs
    reloaded = T.LlamaForCausalLM.from_pretrained("me/tiny-llama-wanda", cache_dir=str(tmp_path / "cache"))
    ids = torch.randint(6, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruner.model(ids).logits)
    assert PrunerConfig.from_pretrained("me/tiny-llama-wanda") == pruner.last_result.config


def test_push_to_a_branch_and_as_a_pull_request(pruned, fake_hub):
    pruner, _ = pruned
    pruner.push_to_hub("me/tiny", revision="experiment")
    repo = fake_hub.repos["me/tiny"]
    assert "model.safetensors" in repo.branches["experiment"] and repo.files == {}
    info = pruner.push_to_hub("me/tiny", create_pr=True)
    assert info.pr_url.endswith("/me/tiny/discussions/1")
    assert "README.md" in repo.branches["refs/pr/1"] and repo.files == {}


def test_config_push_uploads_only_the_config(fake_hub):
    config = WandaConfig(sparsity=0.6, calibration=CAL)
    config.push_to_hub("me/recipes")
    assert set(fake_hub.repos["me/recipes"].files) == {"pruning_config.json"}
    assert PrunerConfig.from_pretrained("me/recipes") == config


def test_cli_push_rerenders_the_card_for_the_repo(pruned, fake_hub, tmp_path, capsys):
    pruner, record = pruned
    out = tmp_path / "saved"
    pruner.save_pretrained(out, evaluations=[record])
    assert main(["push", str(out), "me/from-cli", "--commit-message", "from the CLI"]) == 0
    printed = capsys.readouterr().out
    assert "pushed 9 files to" in printed and "/me/from-cli/commit/" in printed
    repo = fake_hub.repos["me/from-cli"]
    for name in ("model.safetensors", "pruning_report.json", "sparsity_per_layer.png"):
        assert repo.files[name] == (out / name).read_bytes()
    meta, body = fake_hub.card("me/from-cli")
    local_meta, local_body = _card((out / "README.md").read_text())
    assert meta == local_meta  # the same card ...
    assert body == local_body.replace("path/to/this/folder", "me/from-cli")  # ... loading from the repo


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_without_a_hub_the_error_is_one_clear_line(pruned, fake_hub, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    pruner, _ = pruned
    dead = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(HubError) as info:
        pruner.push_to_hub("me/unreachable")
    message = str(info.value)
    assert message.startswith(f"cannot reach the Hugging Face Hub at {dead} to create the repo 'me/unreachable' "
                              "(ConnectError") and "HF_ENDPOINT" in message and "\n" not in message
    saved = pruner.save_pretrained(tmp_path / "saved")
    capsys.readouterr()
    assert main(["push", saved, "me/unreachable"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-prune: error: cannot reach the Hugging Face Hub at {dead}")
    assert len(err.strip().splitlines()) == 1

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\); unset it"):
        WandaConfig().push_to_hub("me/offline")


def test_refused_token_and_bad_arguments(pruned, fake_hub):
    pruner, _ = pruned
    fake_hub.deny_token = "hf_bad"
    with pytest.raises(HubError, match=r"refused to create the repo 'me/x' \(HTTP 401: Invalid credentials.*"
                                       r"pass token="):
        pruner.push_to_hub("me/x", token="hf_bad")
    before = len(fake_hub.requests)
    with pytest.raises(ValueError, match="repo_id='me/x/y' is not a valid Hub repository id"):
        pruner.push_to_hub("me/x/y")
    with pytest.raises(TypeError, match="private must be True, False or None"):
        push_folder(".", "me/x", private="yes")
    with pytest.raises(ValueError, match="nothing was pruned yet"):
        Pruner(make_model("llama", vocab=512)).push_to_hub("me/x")
    assert len(fake_hub.requests) == before  # nothing reached the server


# ------------------------------------------------------------------------------------------------ loading by Hub id


def _folder_files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _repo_requests(fake_hub, repo_id: str) -> list:
    return [r for r in fake_hub.requests if f"/{repo_id}/" in r.path or r.path.endswith(f"/{repo_id}")]


def test_pruner_from_a_hub_id_passes_revision_and_token_and_records_the_id(model_dir, fake_hub, tmp_path):
    files = _folder_files(model_dir)
    broken = dict(files, **{"tokenizer.json": b"{not json"})
    fake_hub.add_repo("me/tiny", broken)  # main: a tokenizer that cannot load
    oid = fake_hub.add_repo("me/tiny", files, branch="v2")
    start = len(fake_hub.requests)
    pruner = Pruner.from_pretrained("me/tiny", revision="v2", token="hf_reader", dtype=torch.float32)
    assert pruner.tokenizer is not None and len(pruner.tokenizer) == len(T.AutoTokenizer.from_pretrained(model_dir))
    sent = [r for r in fake_hub.requests[start:] if r.path != "/api/agent-harnesses"]
    # every download and hf_prune's own listing carry the token (transformers 5.24 lists a repo's files once
    # for its tokenizer without the token: that one request is its own, and harmless here)
    downloads = [r for r in sent if "/resolve/" in r.path]
    assert downloads and all(r.headers.get("authorization") == "Bearer hf_reader" for r in downloads)
    assert any("/tree/v2" in r.path and r.headers.get("authorization") == "Bearer hf_reader" for r in sent)
    downloads = [r.path for r in sent if "/resolve/" in r.path]
    assert downloads and all(f"/resolve/{oid}/" in p or "/resolve/v2/" in p for p in downloads)
    assert any(p.endswith("/model.safetensors") for p in downloads)
    pruner.prune(MagnitudeConfig(sparsity=0.5), progress=False)
    folder = pruner.save_pretrained(tmp_path / "out")
    report = json.loads(open(f"{folder}/pruning_report.json").read())
    assert report["model"]["name_or_path"] == "me/tiny" and report["model"]["revision"] == "v2"
    meta, body = _card(open(f"{folder}/README.md").read())
    assert meta["base_model"] == "me/tiny" and "[me/tiny](https://huggingface.co/me/tiny)" in body


def test_a_broken_tokenizer_on_the_hub_is_an_error_before_the_weights_download(model_dir, fake_hub):
    from hf_prune.errors import ModelLoadError

    fake_hub.add_repo("me/broken", dict(_folder_files(model_dir), **{"tokenizer.json": b"{not json"}))
    with pytest.raises(ModelLoadError, match=r"'me/broken' ships a tokenizer \(tokenizer.json, tokenizer_config.json"
                                             r"\) that fails to load \(.*\); fix or re-download"):
        Pruner.from_pretrained("me/broken")
    assert not any(r.path.endswith("model.safetensors") for r in fake_hub.requests)


def test_a_model_without_tokenizer_files_loads_with_a_warning(model_dir, fake_hub):
    files = {k: v for k, v in _folder_files(model_dir).items() if not k.startswith(("tokenizer", "special"))}
    fake_hub.add_repo("me/no-tokenizer", files)
    with pytest.warns(UserWarning, match=r"'me/no-tokenizer' ships no tokenizer or processor .* Pruner\(model, "
                                         r"tokenizer=\.\.\.\)"):
        pruner = Pruner.from_pretrained("me/no-tokenizer")
    assert pruner.tokenizer is None and pruner.processor is None


def test_a_broken_local_tokenizer_is_an_error_too(model_dir):
    from hf_prune.errors import ModelLoadError

    (model_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="ships a tokenizer .* that fails to load"):
        Pruner.from_pretrained(model_dir)


def test_config_from_a_revision_with_a_token(fake_hub):
    config = WandaConfig(sparsity=0.3)
    config.push_to_hub("me/recipes", revision="v2", token="hf_writer")
    assert "pruning_config.json" not in fake_hub.repos["me/recipes"].files  # only on the branch
    start = len(fake_hub.requests)
    assert PrunerConfig.from_pretrained("me/recipes", revision="v2", token="hf_reader") == config
    sent = [r for r in fake_hub.requests[start:] if "/resolve/" in r.path]
    assert sent and all("/resolve/v2/" in r.path and r.headers.get("authorization") == "Bearer hf_reader"
                        for r in sent)
    with pytest.raises(HubError, match="download pruning_config.json from 'me/recipes'"):
        PrunerConfig.from_pretrained("me/recipes")  # main has none
