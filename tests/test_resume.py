"""Resumable runs: a CLI run killed (SIGKILL) after k block checkpoints leaves no output folder, and --resume ends
with every tensor equal to an uninterrupted run; another config, no checkpoint, or a method that cannot resume is
refused before anything changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from hf_prune import Pruner, WandaConfig
from hf_prune.cli import main
from hf_prune.engine.checkpoint import KILL_AFTER_ENV, RunCheckpoint
from hf_prune.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIBRATION = ["--calibration", "builtin:python-docs", "--num-samples", "6", "--seq-len", "32", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A 4-block LLaMA (GQA), so a kill after 2 blocks leaves work on both sides."""
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=3))
    path = tmp_path_factory.mktemp("llama4")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _killed_run(args: list[str], after: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{KILL_AFTER_ENV: str(after)},
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "hf_prune.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def _checkpoint_of(out) -> str:
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.checkpoint")


@pytest.mark.parametrize("method_args,after", [
    (["--method", "sparsegpt", "--sparsity", "0.5", "--block-size", "32"], 2),
    (["--method", "wanda", "--pattern", "2:4", "--channel-permutation"], 2),  # permuted MLPs restored as saved
    (["--method", "ecoflap", "--sparsity", "0.5", "--num-score-samples", "4", "--granularity", "layer"], 3),
])
def test_killed_run_resumes_bit_identical(method_args, after, model_dir, tmp_path):
    full, out = str(tmp_path / "full"), str(tmp_path / "out")
    assert main(["prune", str(model_dir), *method_args, *CALIBRATION, "--output", full]) == 0
    assert not os.path.exists(_checkpoint_of(full))  # a finished run removes its checkpoint

    proc = _killed_run(["prune", str(model_dir), *method_args, *CALIBRATION, "--output", out], after)
    assert proc.returncode == -9, proc.stderr  # SIGKILL after `after` block checkpoints
    assert not os.path.exists(out)  # nothing that looks like a result
    ckpt = _checkpoint_of(out)
    state = json.loads(open(os.path.join(ckpt, "state.json")).read())
    assert state["position"]["block"] == after - 1 and not state["complete"]
    assert len(state["blocks"]) == after and os.path.isfile(os.path.join(ckpt, state["inputs"]))
    if "ecoflap" in method_args:
        assert state["extras"]["allocation"]["module_sparsity"]  # stage 1 is not redone on resume

    assert main(["prune", str(model_dir), *method_args, *CALIBRATION, "--output", out, "--resume"]) == 0
    want, got = _tensors(full), _tensors(out)
    assert sorted(want) == sorted(got)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    report = json.loads(open(os.path.join(out, "pruning_report.json")).read())
    assert report["run"]["checkpoint"]["resumed_after"]["block"] == after - 1
    assert report["sparsity"]["overall"]["modules"] == 28
    assert not os.path.exists(ckpt)


def test_resume_refuses_another_config_and_missing_checkpoint(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["prune", str(model_dir), "--method", "wanda", *CALIBRATION, "--output", out]
    assert _killed_run([*args, "--sparsity", "0.5"], 1).returncode == -9
    ckpt = _checkpoint_of(out)
    before = {n: open(os.path.join(ckpt, n), "rb").read() for n in ("state.json", "blocks/00-0000.safetensors")}

    assert main([*args, "--sparsity", "0.6", "--resume"]) == 2
    assert "another config (sparsity: 0.5 in the checkpoint, 0.6 now)" in capsys.readouterr().err
    assert main([*args, "--sparsity", "0.5", "--resume", "--num-samples", "5"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main([*args, "--sparsity", "0.5"]) == 2  # a fresh run does not overwrite a checkpoint
    assert "resume it with resume=True (--resume)" in capsys.readouterr().err
    assert {n: open(os.path.join(ckpt, n), "rb").read() for n in before} == before
    assert not os.path.exists(out)

    assert main(["prune", str(model_dir), "--method", "wanda", *CALIBRATION, "--output", str(tmp_path / "new"),
                 "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
    assert main(["prune", str(model_dir), "--method", "modhifi", *CALIBRATION, "--output", str(tmp_path / "m"),
                 "--resume"]) == 2
    assert "modhifi cannot checkpoint or resume; resumable methods: ecoflap, magnitude, ria, sparsegpt, wanda" \
        in capsys.readouterr().err


def test_api_resume_refuses_another_model_and_data(model_dir, tokenizer, corpus, tmp_path):
    folder, texts = tmp_path / "ckpt", tmp_path / "calibration.txt"
    texts.write_text("\n".join(t.replace("\n", " ") for t in corpus[:100]))
    config = WandaConfig(sparsity=0.5)
    config.calibration.num_samples, config.calibration.seq_len = 4, 32
    first = Pruner.from_pretrained(model_dir, dtype=torch.float32)
    first.prune(config, calibration_dataset=str(texts), checkpoint_dir=folder, progress=False)
    assert json.loads((folder / "state.json").read_text())["complete"]

    other = T.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        other.model.layers[3].mlp.up_proj.weight[0, 0] += 1.0
    with pytest.raises(CheckpointError, match="belongs to another model"):
        Pruner(other, tokenizer).prune(config, calibration_dataset=str(texts), checkpoint_dir=folder, resume=True)
    fresh = Pruner.from_pretrained(model_dir, dtype=torch.float32)
    dense = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="another config .calibration.dataset"):
        fresh.prune(config, calibration_dataset=corpus[:100], checkpoint_dir=folder, resume=True)
    texts.write_text("\n".join(t.replace("\n", " ") for t in corpus[100:200]))  # same path, other contents
    with pytest.raises(CheckpointError, match="other calibration data"):
        fresh.prune(config, calibration_dataset=str(texts), checkpoint_dir=folder, resume=True)
    assert all(torch.equal(v, dense[k]) for k, v in fresh.model.state_dict().items())
    # resuming a finished run restores every block and walks nothing
    texts.write_text("\n".join(t.replace("\n", " ") for t in corpus[:100]))
    result = fresh.prune(config, calibration_dataset=str(texts), checkpoint_dir=folder, resume=True, progress=False)
    assert all(torch.equal(v, first.model.state_dict()[k]) for k, v in fresh.model.state_dict().items())
    assert result.report["sparsity"]["overall"]["achieved"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        fresh.prune(config, resume=True)
    with pytest.raises(CheckpointError, match="is a file"):
        RunCheckpoint(folder / "state.json")
