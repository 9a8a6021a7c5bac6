"""The hf-prune command line: prune -> folder that stock from_pretrained loads, eval, report, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as T

from hf_prune.cli import main


def test_prune_eval_report(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", str(model_dir), "--method", "sparsegpt", "--pattern", "2:4", "--block-size", "32",
                 "--calibration", "builtin:python-docs", "--num-samples", "8", "--seq-len", "32", "--output", str(out),
                 "--eval-texts", "builtin:python-docs", "--eval-seq-len", "32", "--eval-max-windows", "4",
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "saved to" in printed and "dense" in printed
    config = json.loads((out / "pruning_config.json").read_text())
    assert config["method"] == "sparsegpt" and config["block_size"] == 32 and config["calibration"]["num_samples"] == 8
    card = (out / "README.md").read_text()
    assert "library_name: hf_prune" in card and "perplexity" in card and "2:4" in card
    model = T.LlamaForCausalLM.from_pretrained(out)
    assert abs(sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear)
                   and "layers" in str(m)) >= 0)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert int((q == 0).sum()) == q.numel() // 2

    assert main(["report", str(out), "--per-module"]) == 0
    printed = capsys.readouterr().out
    assert "match the report" in printed and "model.layers.1.mlp.down_proj" in printed
    assert main(["eval", str(out), "--texts", "builtin:python-docs", "--seq-len", "32", "--max-windows", "3",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


@pytest.mark.parametrize("args,words", [
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity=1.5 must be a number in [0.0, 1.0)"),
    (["--method", "wanda", "--pattern", "3:3"], "1 <= N < M"),
    (["--method", "wanda", "--target-modules", "nothing_here", "--calibration", "builtin:python-docs"],
     "matches no Linear layer"),
    (["--method", "wanda", "--calibration", "builtin:python-docs", "--num-samples", "100000"], "too short"),
    (["--method", "wanda"], "no calibration data was given"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, args, words):
    out = tmp_path / "out"
    code = main(["prune", str(model_dir), *args, "--output", str(out), "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hf-prune: error: ") and words in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_that_is_a_file_fails_before_loading(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code = main(["prune", str(tmp_path / "no-such-model"), "--method", "magnitude", "--output", str(target)])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_report_of_a_plain_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no pruning_report.json" in capsys.readouterr().err


def test_methods_and_help_method(capsys):
    assert main(["methods"]) == 0
    assert "sparsegpt" in capsys.readouterr().out
    assert main(["prune", "m", "--method", "sparsegpt", "--output", "o", "--help-method"]) == 0
    assert "--block-size" in capsys.readouterr().out


def test_console_script_is_installed(model_dir, tmp_path):
    exe = shutil.which("hf-prune") or os.path.join(os.path.dirname(sys.executable), "hf-prune")
    out = tmp_path / "o"
    proc = subprocess.run([exe, "prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.3",
                           "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([exe, "prune", str(model_dir), "--method", "magnitude", "--pattern", "x",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pattern='x' is not understood" in proc.stderr
