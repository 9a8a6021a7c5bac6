"""One clear line for every bad file or value: the CLI prints one ``hf-prune: error: ...`` line and exits 2 (no
traceback), the API raises a named hf_prune error, each naming the file and line or the field and the fix, before
any weight changes; regexes from files are matched with a time bound."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
import torch
import transformers as T
from conftest import make_batches, make_model, snapshot, unchanged

from hf_prune import CalibrationConfig, MagnitudeConfig, Pruner, PrunerConfig, WandaConfig
from hf_prune.calibration.config import DEFAULT_SEQ_LEN
from hf_prune.cli import main
from hf_prune.errors import (
    CalibrationDataError,
    ConfigFileError,
    DeviceError,
    ModelLoadError,
    RegexTimeoutError,
    SequenceLengthError,
)
from hf_prune.evaluation import perplexity
from hf_prune.models import text_context


def _one_line(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI in-process: exit status 2, exactly one ``hf-prune: error:`` line on stderr holding ``words``."""
    capsys.readouterr()  # what the test printed before (progress bars of its own saves)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("hf-prune: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def _model_dir(path, tokenizer, family: str = "llama", **config):
    model = make_model(family, vocab=len(tokenizer))
    for key, value in config.items():
        setattr(model.config, key, value)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    return _model_dir(tmp_path / "tiny-llama", tokenizer)


def _prune_args(model_dir, out, *extra: str) -> list[str]:
    return ["prune", str(model_dir), "--method", "wanda", "--output", str(out), "--num-samples", "4",
            "--seq-len", "16", "--no-progress", *extra]


CAL = CalibrationConfig(num_samples=4, seq_len=16)


# ------------------------------------------------------------------------------------------- calibration files

BAD_FILES = [
    ("data.jsonl", b'{"text": "one two three"}\n\n{"body": "four five"}\n', "data.jsonl:3 has no text column 'text'"),
    ("data.jsonl", b'{"text": "one two three"}\n["not", "an", "object"]\n',
     "data.jsonl:2 is a JSON list, not an object"),
    ("data.txt", b"first line\nsecond line\nbad \xff byte\n", "data.txt:3 is not valid UTF-8 (byte 0xff)"),
    ("data.json", b'[{"text": "a"},\n {"text": }]', "data.json:2 is not valid JSON"),
    ("data.csv", b"text,label\nhello,1\n", "data.csv:2 has no text column 'body'"),
]


@pytest.mark.parametrize("name,content,words", BAD_FILES, ids=["no-column", "not-object", "utf8", "json", "csv"])
def test_bad_calibration_file_is_one_line_naming_file_and_line(name, content, words, tokenizer, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    config = WandaConfig(calibration=CalibrationConfig(num_samples=4, seq_len=16,
                                                       text_column="body" if name.endswith(".csv") else "text"))
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    with pytest.raises(CalibrationDataError) as info:
        Pruner(model, tokenizer).prune(config, calibration_dataset=str(path), progress=False)
    assert words in str(info.value) and str(path) in str(info.value)
    assert unchanged(model, snap)

    out = tmp_path / "out"
    extra = ["--text-column", "body"] if name.endswith(".csv") else []
    _one_line(capsys, _prune_args(_model_dir(tmp_path / "m", tokenizer), out, "--calibration", str(path), *extra),
              words)
    assert not out.exists()


@pytest.mark.parametrize("source", ["nosuch.jsonl", "data/nosuch.txt", "./corpus", "/no/such/dir/data"])
def test_missing_local_calibration_file_is_no_such_file_at_once(source, tokenizer, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path was looked up on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    start = time.monotonic()
    with pytest.raises(CalibrationDataError, match=f"no such file: '{source}'.*check the path"):
        Pruner(model, tokenizer).prune(WandaConfig(calibration=CAL), calibration_dataset=source, progress=False)
    assert time.monotonic() - start < 1.0
    assert unchanged(model, snap)


def test_missing_calibration_file_from_the_cli(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _one_line(capsys, _prune_args(model_dir, out, "--calibration", "nosuch.jsonl"), "no such file: 'nosuch.jsonl'")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- model folders


def _damaged(tmp_path, tokenizer, how: str):
    folder = _model_dir(tmp_path / how, tokenizer)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":
        weights.write_bytes(data[:8] + b"x" * 40 + data[48:])  # the JSON header is garbage
    elif how == "pickle":
        from safetensors.torch import load_file

        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()
    return folder


@pytest.mark.parametrize("how,words", [
    ("truncated", "model.safetensors is truncated or corrupt (Error while deserializing header"),
    ("corrupt", "model.safetensors is truncated or corrupt (Error while deserializing header"),
    ("pickle", "holds its weights only as a pickle (pytorch_model.bin), which hf_prune never loads"),
])
def test_unloadable_model_folder_is_one_line(how, words, tokenizer, tmp_path, capsys):
    folder = _damaged(tmp_path, tokenizer, how)
    with pytest.raises(ModelLoadError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Pruner.from_pretrained(folder)
    out = tmp_path / "out"
    _one_line(capsys, ["prune", str(folder), "--method", "magnitude", "--output", str(out), "--no-progress"],
              str(folder), words)
    assert not out.exists()


def test_missing_model_folder_is_no_such_folder(tmp_path, capsys):
    missing = tmp_path / "models" / "nosuch"
    with pytest.raises(ModelLoadError, match=f"no such folder: '{missing}'"):
        Pruner.from_pretrained(missing)
    err = _one_line(capsys, ["eval", str(missing), "--texts", "builtin:python-docs"], f"no such folder: '{missing}'")
    assert "Repo id must be in the form" not in err


def test_unknown_hub_id_is_one_line_without_retries(tmp_path, capsys, caplog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _one_line(capsys, ["eval", "nosuch-org/nosuch-model", "--texts", "builtin:python-docs"],
              "'nosuch-org/nosuch-model' is not a local folder", "offline mode is on")

    with socket.socket() as sock:  # a port nothing listens on: the Hub is unreachable
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        _one_line(capsys, ["eval", "nosuch-org/nosuch-model", "--texts", "builtin:python-docs"],
                  f"the Hub at {endpoint} cannot be reached", "or give a local model folder")
    assert time.monotonic() - start < 5 and "Retry" not in caplog.text


# ------------------------------------------------------------------------------------------- device, seed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(model_dir, tokenizer, tmp_path, capsys):
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    with pytest.raises(DeviceError, match=r"device='cuda' is not present on this machine.*device='cpu'"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(), device="cuda", progress=False)
    assert unchanged(model, snap)
    out = tmp_path / "out"
    _one_line(capsys, ["prune", str(model_dir), "--method", "magnitude", "--device", "cuda", "--output", str(out),
                       "--no-checkpoint", "--no-progress"], "device='cuda' is not present on this machine")
    assert not out.exists()


def test_seed_out_of_range_is_refused_up_front(model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match=rf"CalibrationConfig.seed={2**64} must be an integer in \[0, {2**64 - 1}\]"):
        CalibrationConfig(seed=2**64)
    assert CalibrationConfig(seed=2**64 - 1).seed == 2**64 - 1
    _one_line(capsys, _prune_args(model_dir, tmp_path / "out", "--seed", str(2**64)), f"seed={2**64} must be")


# ------------------------------------------------------------------------------------------- seq_len and context


def test_text_context_of_every_family(tokenizer):
    expected = {"llama": 256, "opt": 256, "bert": 256, "clip": 64, "blip2": 256, "vit": None, "resnet": None}
    for family, context in expected.items():
        assert text_context(make_model(family, vocab=len(tokenizer))) == context, family


def test_default_seq_len_is_a_short_context_and_says_so(tokenizer, corpus, tmp_path):
    model = make_model("llama", vocab=len(tokenizer))
    model.config.max_position_embeddings = 48
    pruner = Pruner(model, tokenizer)
    result = pruner.prune(WandaConfig(calibration=CalibrationConfig(num_samples=4)), calibration_dataset=corpus[:300],
                          progress=False)
    assert result.config.calibration.seq_len == 48
    cal = result.report["calibration"]
    assert cal["seq_len"] == 48 and "the model's context (48 tokens" in cal["seq_len_note"]
    assert cal["real_tokens"] == 4 * 48  # four windows of the context's 48 tokens
    pruner.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "of up to 48 tokens" in card and "the model's context (48 tokens" in card
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["calibration"]["seq_len"] == 48

    # a model whose context is longer than the default keeps it, and says nothing
    long = make_model("llama", vocab=len(tokenizer))
    long.config.max_position_embeddings = 4096
    cfg = CalibrationConfig(num_samples=1, batch_size=1)
    result = Pruner(long, tokenizer).prune(WandaConfig(calibration=cfg), calibration_dataset=corpus, progress=False)
    assert result.report["calibration"]["seq_len"] == DEFAULT_SEQ_LEN
    assert "seq_len_note" not in result.report["calibration"]


def test_prepared_batches_keep_the_recorded_default(tokenizer, corpus):
    model = make_model("llama", vocab=len(tokenizer))
    result = Pruner(model, tokenizer).prune(WandaConfig(calibration=CalibrationConfig(num_samples=8)),
                                            calibration_dataset=make_batches("llama", tokenizer, corpus),
                                            progress=False)
    assert result.config.calibration.seq_len == DEFAULT_SEQ_LEN == result.report["calibration"]["seq_len"]
    assert "seq_len_note" not in result.report["calibration"]


@pytest.mark.parametrize("family", ["llama", "opt", "bert"])
def test_explicit_seq_len_past_the_context_is_refused(family, tokenizer, corpus):
    model = make_model(family, vocab=len(tokenizer))
    snap = snapshot(model)
    config = WandaConfig(calibration=CalibrationConfig(num_samples=4, seq_len=300))
    with pytest.raises(SequenceLengthError, match="seq_len=300 is longer than the model's context of 256 tokens"):
        Pruner(model, tokenizer).prune(config, calibration_dataset=corpus[:300], progress=False)
    assert unchanged(model, snap)


def test_seq_len_past_the_context_from_the_cli(tokenizer, tmp_path, capsys):
    folder = _model_dir(tmp_path / "opt", tokenizer, "opt")
    out = tmp_path / "out"
    _one_line(capsys, ["prune", str(folder), "--method", "wanda", "--calibration", "builtin:python-docs",
                       "--num-samples", "4", "--seq-len", "300", "--output", str(out), "--no-progress"],
              "seq_len=300 is longer than the model's context of 256 tokens")
    assert not out.exists()
    _one_line(capsys, ["eval", str(folder), "--texts", "builtin:python-docs", "--seq-len", "300", "--no-progress"],
              "seq_len=300 is longer than the model's context of 256 tokens")


def test_evaluation_defaults_to_a_short_context(tokenizer, tmp_path, capsys):
    folder = _model_dir(tmp_path / "short", tokenizer, max_position_embeddings=64)
    model = T.LlamaForCausalLM.from_pretrained(folder)
    texts = "builtin:python-docs"
    assert perplexity(model, tokenizer, texts, max_windows=2) == perplexity(model, tokenizer, texts, seq_len=64,
                                                                           max_windows=2)
    with pytest.raises(SequenceLengthError, match="seq_len=2048 is longer than the model's context of 64 tokens"):
        perplexity(model, tokenizer, texts, seq_len=2048)
    assert main(["eval", str(folder), "--texts", texts, "--max-windows", "2", "--no-progress"]) == 0
    assert "2 windows x 64 tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- config and report files


@pytest.mark.parametrize("content,words", [
    ('{"method": ["wanda", "magnitude"], "sparsity": 0.5}', "'method' must be one method name such as 'wanda'"),
    ('["wanda"]', "a pruning config is a JSON object"),
    ('{"method": "wanda",\n "sparsity": }', "pruning_config.json:2 is not valid JSON"),
])
def test_bad_pruning_config_names_the_file(content, words, tmp_path):
    path = tmp_path / "pruning_config.json"
    path.write_text(content)
    with pytest.raises(ConfigFileError) as info:
        PrunerConfig.from_pretrained(tmp_path)
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("pruned") / "out"
    pruner = Pruner(make_model("llama", vocab=len(tokenizer)), tokenizer)
    pruner.prune(MagnitudeConfig(sparsity=0.5), progress=False)
    pruner.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage,words", [
    (lambda r: r.pop("run"), "has no key report['run']"),
    (lambda r: r["sparsity"]["overall"].update(achieved="half"),
     "report['sparsity']['overall']['achieved'] is a str, not int or float"),
    (lambda r: r["sparsity"]["per_module"]["model.layers.0.mlp.up_proj"].pop("zeros"),
     "has no key report['sparsity']['per_module']['model.layers.0.mlp.up_proj']['zeros']"),
])
def test_damaged_report_is_one_line_for_report_and_push(damage, words, pruned_dir, tmp_path, capsys, fake_hub):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(pruned_dir, folder)
    report = json.loads((folder / "pruning_report.json").read_text())
    damage(report)
    (folder / "pruning_report.json").write_text(json.dumps(report))
    _one_line(capsys, ["report", str(folder)], "pruning_report.json", words)
    _one_line(capsys, ["push", str(folder), "someone/pruned"], words)
    assert fake_hub.repos == {}  # refused before the repo was created or anything uploaded
    (folder / "pruning_report.json").write_text("{\n  oops")
    _one_line(capsys, ["report", str(folder)], "pruning_report.json:2 is not valid JSON")


# ------------------------------------------------------------------------------------------- untrusted regexes


def test_hostile_regex_from_a_config_file_is_refused_within_a_second(tokenizer, tmp_path):
    path = tmp_path / "pruning_config.json"
    path.write_text(json.dumps({"method": "magnitude", "target_modules": ["(.*.*)*X$"]}))
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"target_modules regex '\(\.\*\.\*\)\*X\$' matches no Linear layer"):
        Pruner(model, tokenizer).prune(PrunerConfig.from_json_file(path), progress=False)
    assert time.monotonic() - start < 1.0
    assert unchanged(model, snap)


def test_backtracking_regex_times_out_with_a_named_error(tokenizer, model_dir, tmp_path, capsys):
    hostile = r"(.*)(.*)(.*)(.*)(.*)(.*)\6\5\4\3\2\1$"
    model = make_model("llama", vocab=len(tokenizer))
    snap = snapshot(model)
    start = time.monotonic()
    with pytest.raises(RegexTimeoutError, match=r"exclude_modules regex .* takes longer than 0.2s to match"):
        Pruner(model, tokenizer).prune(MagnitudeConfig(exclude_modules=[hostile]), progress=False)
    assert time.monotonic() - start < 1.0
    assert unchanged(model, snap)
    out = tmp_path / "out"
    _one_line(capsys, ["prune", str(model_dir), "--method", "magnitude", "--target-modules", hostile,
                       "--output", str(out), "--no-progress"], "target_modules regex", "catastrophic backtracking")
    assert not out.exists()
