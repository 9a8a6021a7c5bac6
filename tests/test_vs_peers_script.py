"""benchmarks/vs_peers.py's set-up and bookkeeping, without running a peer: the llm-compressor venv is created with
torch pinned (a dependency must not swap our CPU torch for another build), a venv with another torch is refused,
the random LLaMA has the real widths asked for, and a worker's repeats are summarised by their medians."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "models"))


@pytest.fixture()
def vs_peers(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)  # the script imports pylm_paths from its own folder
    spec = importlib.util.spec_from_file_location("vs_peers_under_test", os.path.join(BENCHMARKS, "vs_peers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(calls: list, torch_version: str):
    def run(cmd, **kwargs):
        calls.append(list(cmd))
        if cmd[-2:] == ["-c", "import torch; print(torch.__version__)"]:
            return types.SimpleNamespace(stdout=torch_version + "\n", returncode=0)
        if cmd[1:3] == ["-m", "venv"]:
            os.makedirs(os.path.join(cmd[3], "bin"), exist_ok=True)
            open(os.path.join(cmd[3], "bin", "python"), "w").close()
        return types.SimpleNamespace(stdout="", returncode=0)
    return run


def test_peer_venv_installs_everything_under_the_torch_pin(vs_peers, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(vs_peers, "HERE", str(tmp_path))
    monkeypatch.setattr(vs_peers.subprocess, "run", _fake_run(calls, "2.13.0+cpu"))
    python = vs_peers.peer_python(None)
    assert python == str(tmp_path / ".venv-llmcompressor" / "bin" / "python")
    installs = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert [c[c.index("-q") + 1] for c in installs] == ["torch==2.13.0", vs_peers.PEER_VERSION]  # torch first
    for cmd in installs:  # every install, the peer's included, runs under a constraints file pinning torch
        constraints = cmd[cmd.index("-c") + 1]
        assert open(constraints).read().split() == ["torch==2.13.0"]
    calls.clear()
    assert vs_peers.peer_python(None) == python  # an existing venv is reused, its torch checked, nothing installed
    assert all("install" not in c for c in calls) and len(calls) == 1
    assert os.path.exists(tmp_path / ".venv-llmcompressor" / "constraints.txt")  # kept for a later pip install -c


def test_peer_venv_with_another_torch_is_refused(vs_peers, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(vs_peers, "HERE", str(tmp_path))
    monkeypatch.setattr(vs_peers.subprocess, "run", _fake_run(calls, "2.9.1+cu128"))
    with pytest.raises(SystemExit, match=r"torch 2\.9\.1\+cu128, not torch==2\.13\.0.*Remove .*venv-llmcompressor"):
        vs_peers.peer_python(None)


def test_run_worker_reports_the_median_run_and_median_memory(vs_peers, monkeypatch, tmp_path):
    (tmp_path / "peers").mkdir()
    counter = tmp_path / "n"
    counter.write_text("0")
    # three runs: times 3, 1, 2 s; peaks 500, 700, 600 MiB above 400, 450, 500 MiB before the prune
    (tmp_path / "peers" / "fake.py").write_text(f"""
import json
n = int(open({str(counter)!r}).read())
open({str(counter)!r}, "w").write(str(n + 1))
print("noise")
print(json.dumps({{"prune_s": [3.0, 1.0, 2.0][n], "peak_rss_bytes": [500, 700, 600][n],
                  "rss_before_bytes": [400, 450, 500][n]}}))
""")
    monkeypatch.setattr(vs_peers, "HERE", str(tmp_path))
    result = vs_peers.run_worker(sys.executable, "fake.py", [], repeats=3)
    assert result["prune_s"] == 2.0 and sorted(result["times"]) == [1.0, 2.0, 3.0]
    assert result["peak_rss_bytes"] == 600  # the median peak, not the median-time run's (also 600 here by chance)
    assert result["extra_rss_bytes"] == 100  # median of 100, 250, 100


def test_run_worker_passes_on_why_a_worker_could_not_run(vs_peers, monkeypatch, tmp_path):
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "no_nm.py").write_text("import json; print(json.dumps({'error': 'no N:M mode'}))")
    (tmp_path / "peers" / "crash.py").write_text("raise ValueError('the peer broke')")
    monkeypatch.setattr(vs_peers, "HERE", str(tmp_path))
    assert vs_peers.run_worker(sys.executable, "no_nm.py", [], repeats=3) == {"error": "no N:M mode"}
    assert vs_peers.run_worker(sys.executable, "crash.py", [], repeats=3) == {"error": "ValueError: the peer broke"}


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "pylm")), reason="the shared trained decoder is absent")
def test_random_llama_has_real_widths_and_the_tokenizer(vs_peers, tmp_path):
    folder = vs_peers._random_llama(os.path.join(SHARED, "pylm"), 256, 1, str(tmp_path / "m"))
    config = json.load(open(os.path.join(folder, "config.json")))
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (256, 688, 1)
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 2  # heads of 128
    assert config["vocab_size"] == 4096 and os.path.exists(os.path.join(folder, "tokenizer.json"))
    with pytest.raises(SystemExit, match="multiple of 128"):
        vs_peers._random_llama(os.path.join(SHARED, "pylm"), 1000, 1, str(tmp_path / "bad"))


def test_the_script_parses_its_documented_commands():
    out = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "vs_peers.py"), "--help"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0 and "--random-llama" in out.stdout and "--structured-sparsities" in out.stdout


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, "pylm")), reason="the shared trained decoder is absent")
def test_our_worker_repeats_into_the_same_folder(vs_peers, tmp_path):
    """The repeats (and the next setting) save to one folder: the second save must replace the first, not stop on
    hf_prune's guard against overwriting a previous output (which once left the whole 'ours' column n/a)."""
    import torch

    torch.save(torch.randint(0, 4096, (2, 32)), tmp_path / "cal.pt")
    common = ["--model", os.path.join(SHARED, "pylm"), "--calibration", str(tmp_path / "cal.pt"),
              "--method", "magnitude", "--out", str(tmp_path / "ours")]
    result = vs_peers.run_worker(sys.executable, "hf_prune_worker.py", common, repeats=2)
    assert "error" not in result, result
    assert len(result["times"]) == 2 and result["extra_rss_bytes"] >= 0
    assert os.path.exists(tmp_path / "ours" / "model.safetensors")
