"""Resumable runs: a CLI run killed (SIGKILL) after k block checkpoints leaves no output folder, and --resume ends
with every tensor equal to an uninterrupted run; another config, no checkpoint, or a method that cannot resume is
refused before anything changes."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from hf_prune import ECoFLaPConfig, Pruner, WandaConfig
from hf_prune.cli import main
from hf_prune.engine.checkpoint import KILL_AFTER_ENV, KILL_SIGNAL_ENV, RunCheckpoint
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


def _killed_run(args: list[str], after: int, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env, **{KILL_AFTER_ENV: str(after)},
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
    assert json.loads(open(os.path.join(ckpt, "lock.json")).read())["pid"] == state["owner"]["pid"]  # a dead run's
    if "ecoflap" in method_args:
        assert state["extras"]["allocation"]["module_sparsity"]  # stage 1 is not redone on resume

    assert main(["prune", str(model_dir), *method_args, *CALIBRATION, "--output", out, "--resume"]) == 0  # lock too
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


# ------------------------------------------------------------------------ runs that recover (issue 14, item 2)


def _files(root) -> list[str]:
    """Every file and folder under ``root``, relative, sorted: what a failed run must leave unchanged."""
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_run_that_fails_before_its_first_block_leaves_no_checkpoint(model_dir, tokenizer, tmp_path, capsys):
    """A failure inside the first block (an overflow) or before the walk (a NaN embedding) leaves neither the
    checkpoint nor its folder, so the corrected command runs; a --checkpoint-dir the user made keeps its files."""
    overflow = T.LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():  # finite weights whose block-0 statistics overflow: found after the run began
        overflow.model.layers[0].input_layernorm.weight.fill_(3e38)
    nan = T.LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        nan.model.embed_tokens.weight[7, 3] = float("nan")
    bad = {"overflow": _save(overflow, tokenizer, tmp_path / "overflow"), "nan": _save(nan, tokenizer, tmp_path / "nan")}
    work = tmp_path / "work"
    work.mkdir()
    out, mine = str(work / "out"), work / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    method = ["--method", "sparsegpt", "--sparsity", "0.5", "--block-size", "32", *CALIBRATION, "--output", out]
    capsys.readouterr()  # the loading bars of the models made above
    for flags in ([], ["--checkpoint-dir", str(mine)]):
        before = _files(work)
        assert main(["prune", bad["overflow"], *method, *flags]) == 2
        assert _one_line(capsys.readouterr().err) == (
            "hf-prune: error: NaN/inf in the input Gram/Hessian of model.layers.0.self_attn.q_proj: the activations "
            "reaching it (torch.float32) overflow or are NaN. Check the calibration inputs.")
        assert _files(work) == before
        assert main(["prune", bad["nan"], *method, *flags]) == 2
        assert _one_line(capsys.readouterr().err) == (
            "hf-prune: error: model.embed_tokens.weight (torch.float32) holds 1 NaN/inf of its 32768 values; the "
            "checkpoint is corrupt or overflowed when loaded. Nothing was changed.")
        assert _files(work) == before
    assert (mine / "notes.txt").read_text() == "keep me"
    assert main(["prune", str(model_dir), *method]) == 0  # the corrected command is not refused
    assert _files(work) == ["mine", "mine/notes.txt", "out", *[f"out/{n}" for n in sorted(os.listdir(out))]]


def test_a_bad_device_leaves_no_checkpoint_but_ecoflap_keeps_its_allocation(model_dir, corpus, tmp_path,
                                                                            monkeypatch):
    """A device that does not exist is refused before the run begins: nothing is kept, the model is unchanged and the
    corrected run is not refused. A failure after ECoFLaP's stage 1 keeps its allocation (progress worth keeping),
    and the resume reuses it."""
    from hf_prune.errors import CalibrationDataError, DeviceError

    config = WandaConfig(sparsity=0.5)
    config.calibration.num_samples, config.calibration.seq_len = 4, 32
    folder = tmp_path / "ckpt"
    pruner = Pruner.from_pretrained(model_dir, dtype=torch.float32)
    dense = {k: v.clone() for k, v in pruner.model.state_dict().items()}
    with pytest.raises(DeviceError):  # torch without CUDA, or no 100th GPU
        pruner.prune(config, calibration_dataset=corpus[:100], checkpoint_dir=folder, device="cuda:99", progress=False)
    assert not folder.exists()
    assert all(torch.equal(v, dense[k]) for k, v in pruner.model.state_dict().items())
    pruner.prune(config, calibration_dataset=corpus[:100], checkpoint_dir=folder, device="cpu", progress=False)
    assert json.loads((folder / "state.json").read_text())["complete"] and not (folder / "lock.json").exists()

    eco = ECoFLaPConfig(sparsity=0.5, num_score_samples=4, granularity="layer")
    eco.calibration.num_samples, eco.calibration.seq_len = 4, 32
    pruner, folder = Pruner.from_pretrained(model_dir, dtype=torch.float32), tmp_path / "eco"
    with pytest.raises(DeviceError):
        pruner.prune(eco, calibration_dataset=corpus[:100], checkpoint_dir=folder, device="cuda:99", progress=False)
    assert not folder.exists()

    def stage_two_fails(*args, **kwargs):
        raise CalibrationDataError("stage 2 failed before its first block")

    with monkeypatch.context() as patch:
        patch.setattr("hf_prune.methods.ecoflap.run.run_layerwise", stage_two_fails)
        with pytest.raises(CalibrationDataError):
            pruner.prune(eco, calibration_dataset=corpus[:100], checkpoint_dir=folder, device="cpu", progress=False)
    assert all(torch.equal(v, dense[k]) for k, v in pruner.model.state_dict().items())
    state = json.loads((folder / "state.json").read_text())
    assert state["extras"]["allocation"]["module_sparsity"] and state["blocks"] == [] and state["position"] is None
    assert sorted(os.listdir(folder)) == ["state.json"]  # no lock: the failed run released it

    def rescored(*args, **kwargs):
        raise AssertionError("stage 1 ran again")

    monkeypatch.setattr("hf_prune.methods.ecoflap.run.allocate", rescored)
    result = Pruner.from_pretrained(model_dir, dtype=torch.float32).prune(
        eco, calibration_dataset=corpus[:100], checkpoint_dir=folder, resume=True, device="cpu", progress=False)
    assert result.allocation.module_sparsity == state["extras"]["allocation"]["module_sparsity"]


def _lock(folder, pid: int, **fields) -> dict:
    record = {"pid": pid, "host": socket.gethostname(), "started": "2024-05-01T10:00:00+02:00",
              "command": "hf-prune prune model --method wanda --output out", **fields}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock.json"), "w") as fh:
        json.dump(record, fh)
    return record


def test_a_live_run_owns_its_checkpoint(model_dir, tmp_path, capsys):
    """While another live process holds the lock, every run into that output is refused with its pid, start time
    and command, and nothing is touched; once it is gone (or its pid belongs to another process now), the lock
    is taken over."""
    out = str(tmp_path / "out")
    ckpt = _checkpoint_of(out)
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", *CALIBRATION, "--output", out]
    owner = subprocess.Popen(["sleep", "120"])
    try:
        _lock(ckpt, owner.pid)
        lock = open(os.path.join(ckpt, "lock.json")).read()
        for flags in ([], ["--resume"], ["--restart"]):
            assert main([*args, *flags]) == 2
            assert _one_line(capsys.readouterr().err) == (
                f"hf-prune: error: {ckpt!r} is in use by a run that is still going (pid {owner.pid}, started "
                "2024-05-01T10:00:00+02:00, command: hf-prune prune model --method wanda --output out); wait for it "
                "to finish or stop it, or write to another --output / checkpoint_dir.")
            assert open(os.path.join(ckpt, "lock.json")).read() == lock and os.listdir(ckpt) == ["lock.json"]
            assert not os.path.exists(out)
    finally:
        owner.kill()
        owner.wait()
    assert main(args) == 0  # its owner is dead and it left no checkpoint: taken over, then released
    assert not os.path.exists(ckpt) and os.path.isdir(out)

    if sys.platform == "linux":  # a live pid whose process started at another time is not the owner any more
        out = str(tmp_path / "reused")
        _lock(_checkpoint_of(out), os.getpid(), process_start="1")
        assert main([*args[:-1], out]) == 0
        assert not os.path.exists(_checkpoint_of(out))


def test_a_dead_runs_checkpoint_is_named_and_restart_discards_it(model_dir, tmp_path, capsys):
    full, out = str(tmp_path / "full"), str(tmp_path / "out")
    args = ["prune", str(model_dir), "--method", "wanda", "--sparsity", "0.5", *CALIBRATION]
    assert main([*args, "--output", full]) == 0
    killed = _killed_run([*args, "--output", out], 1)
    assert killed.returncode == -9, killed.stderr
    ckpt = _checkpoint_of(out)
    owner = json.loads(open(os.path.join(ckpt, "lock.json")).read())  # the dead run's lock is still there
    assert owner["command"].endswith(shlex.join([*args, "--output", out])) and owner["pid"] != os.getpid()
    assert json.loads(open(os.path.join(ckpt, "state.json")).read())["owner"] == owner

    assert main([*args, "--output", out]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"hf-prune: error: {ckpt!r} already holds the checkpoint of a run that is no longer running (pid "
        f"{owner['pid']}, started {owner['started']}, command: {owner['command']}); resume it with resume=True "
        "(--resume) or discard it with restart=True (--restart).")
    assert main([*args, "--output", out, "--resume", "--restart"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "hf-prune: error: resume (--resume) continues the checkpoint and restart (--restart) deletes it; they "
        "contradict each other: drop one.")
    assert main([*args, "--output", out, "--restart", "--no-checkpoint"]) == 2
    assert "--restart and --no-checkpoint contradict each other" in capsys.readouterr().err
    assert main(["prune", str(model_dir), "--method", "modhifi", *CALIBRATION, "--output", out, "--restart"]) == 2
    assert "modhifi cannot checkpoint or resume" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(ckpt, "state.json")) and not os.path.exists(out)

    with open(os.path.join(ckpt, "notes.txt"), "w") as fh:  # a file hf_prune did not write is never deleted
        fh.write("mine")
    for stray in (".state.json.partial-99-ab12cd34", "blocks/.00-0003.safetensors.partial-99-ab12cd34"):
        open(os.path.join(ckpt, stray), "w").close()  # what a kill during a write leaves: discarded with the rest
    assert main([*args, "--output", out, "--restart"]) == 0
    assert os.listdir(ckpt) == ["notes.txt"]
    want, got = _tensors(full), _tensors(out)
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_ctrl_c_ends_with_one_line_and_the_resume_is_bit_identical(model_dir, tmp_path):
    full, out = str(tmp_path / "full"), str(tmp_path / "out")
    args = ["prune", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--block-size", "32", *CALIBRATION]
    assert main([*args, "--output", full]) == 0
    env = {KILL_SIGNAL_ENV: "SIGINT"}  # a real SIGINT, delivered to the process right after block 2's checkpoint
    proc = _killed_run([*args, "--output", out], 2, **env)
    assert proc.returncode == 130
    assert _one_line(proc.stderr) == ("hf-prune: interrupted after block 2 of 4; resume with: "
                                      f"{shlex.join(['hf-prune', *args, '--output', out, '--resume'])}")
    ckpt = _checkpoint_of(out)
    assert sorted(os.listdir(ckpt)) == ["blocks", "inputs-00-0001.safetensors", "state.json"]  # the lock released
    assert not os.path.exists(out) and sorted(os.listdir(tmp_path)) == [".out.checkpoint", "full"]

    assert main([*args, "--output", out, "--resume"]) == 0
    want, got = _tensors(full), _tensors(out)
    assert sorted(want) == sorted(got) and [k for k in want if not torch.equal(want[k], got[k])] == []
    assert not os.path.exists(ckpt)


def test_ctrl_c_before_the_first_block_and_in_the_api(model_dir, corpus, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the model loads: one line, exit 130, the lock and the folder it made are gone. In the API the
    KeyboardInterrupt passes unchanged, after the lock is released; the checkpoint resumes."""
    out = str(tmp_path / "out")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pruner, "from_pretrained", interrupted)
    assert main(["prune", str(model_dir), "--method", "wanda", *CALIBRATION, "--output", out]) == 130
    assert _one_line(capsys.readouterr().err) == ("hf-prune: interrupted before a block was done; nothing was kept: "
                                                  "run the same command again to start over.")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    config = WandaConfig(sparsity=0.5)
    config.calibration.num_samples, config.calibration.seq_len = 4, 32
    folder = tmp_path / "ckpt"
    monkeypatch.setenv(KILL_AFTER_ENV, "1")
    monkeypatch.setenv(KILL_SIGNAL_ENV, "SIGINT")
    with pytest.raises(KeyboardInterrupt):
        Pruner.from_pretrained(model_dir).prune(config, calibration_dataset=corpus[:100], checkpoint_dir=folder,
                                                progress=False)
    assert sorted(os.listdir(folder)) == ["blocks", "inputs-00-0000.safetensors", "state.json"]
    with RunCheckpoint(folder, resume=True) as checkpoint:
        assert checkpoint.progress() == (1, 4)
    assert not (folder / "lock.json").exists()
    monkeypatch.delenv(KILL_AFTER_ENV)
    resumed = Pruner.from_pretrained(model_dir)
    resumed.prune(config, calibration_dataset=corpus[:100], checkpoint_dir=folder, resume=True, progress=False)
    whole = Pruner.from_pretrained(model_dir)
    whole.prune(config, calibration_dataset=corpus[:100], progress=False)
    assert all(torch.equal(v, whole.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
