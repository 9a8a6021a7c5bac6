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
    assert "library_name: transformers" in card and "- hf_prune" in card  # stock transformers loads it
    assert "perplexity" in card and "2:4" in card
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
    # the README's form: no --output needed to read a method's options; defaults and allowed values shown
    for argv in (["prune", "m", "--method", "sparsegpt", "--help-method"], ["prune", "--method", "wanda",
                                                                           "--help-method"]):
        assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help at the terminal's width
    assert "--block-size BLOCK_SIZE" in out and "default: 128; allowed: an integer >= 1" in out
    assert "default: None, i.e. 0.5; allowed: a number in [0.0, 1.0)" in out  # sparsity: the effective default
    assert "allowed: one of 'row', 'matrix'" in out  # wanda's scope


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_prune_help_lists_every_option_with_default_and_allowed_values(capsys):
    import dataclasses

    from hf_prune import CalibrationConfig
    from hf_prune.cli import _CALIBRATION_FLAGS, oneshot_methods
    from hf_prune.registry import get_method

    text = " ".join(_help(["prune", "--help"], capsys).split())
    for flag in _CALIBRATION_FLAGS.values():
        assert flag in text
    assert "default: 'auto'; allowed: one of 'auto', 'concat', 'pad'" in text  # --packing
    for name in oneshot_methods():
        block = text.split(f"--method {name} (")[1].split("--method ")[0]
        for f in dataclasses.fields(get_method(name).config_class):
            if f.name != "calibration":
                assert f"--{f.name.replace('_', '-')}" in block, (name, f.name)
    assert "input_compensation" not in text.split("trained methods")[0]  # not offered as a --method choice
    assert len(dataclasses.fields(CalibrationConfig)) == len(_CALIBRATION_FLAGS)
    # with --method, its options are options of prune itself
    text = " ".join(_help(["prune", "--method", "sparsegpt", "--help"], capsys).split())
    assert "SparseGPTConfig options (--method sparsegpt)" in text and "--damp DAMP" in text
    assert "allowed: a number in (0.0, 1.0]" in text


def test_methods_listing_is_aligned_and_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.split("\n\n")[0].splitlines()
    start = lines[0].index("description")
    rows, current = [], None
    for line in lines[1:]:
        if line[:start].strip():  # a method's first line: its name, kind and config in columns
            current = [line[start:]]
            rows.append(current)
            assert line[start - 2:start] == "  " and line[start] != " "
        else:  # a wrapped description continues in the same column
            assert line[:start] == " " * start
            current.append(line[start:])
    assert len(rows) == len(__import__("hf_prune").registry.available_methods())
    for row in rows:
        assert " ".join(row).rstrip().endswith("."), row  # whole sentences, never cut


def test_a_trained_method_is_refused_with_how_to_run_it(capsys, tmp_path):
    assert main(["prune", str(tmp_path / "no-model"), "--method", "input_compensation", "--pool-size", "4",
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-prune: error: input_compensation is not run by `hf-prune prune`: ")
    assert "InputCompensatedModel" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert main(["prune", "--method", "input_compensation", "--help-method"]) == 0  # its options, and how to run it
    out = " ".join(capsys.readouterr().out.split())
    assert "input_compensation is trained, not run by `hf-prune prune`" in out and "--pool-size" in out


def test_prune_without_output_says_so(capsys):
    assert main(["prune", "m", "--method", "magnitude"]) == 2
    assert "prune needs --output FOLDER" in capsys.readouterr().err


TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lm_eval_tasks")


def test_eval_tasks_and_prune_eval_tasks_dense_vs_pruned(model_dir, tmp_path, capsys):
    assert main(["eval", str(model_dir), "--tasks", "pycode_choice", "--include-path", TASKS, "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "pycode_choice" in out and "acc_norm" in out and "0-shot, limit 8" in out
    target = tmp_path / "pruned"
    assert main(["prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(target),
                 "--eval-tasks", "pycode_choice", "--eval-include-path", TASKS, "--eval-limit", "8",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "acc (pycode_choice, 8 examples, 0-shot): dense " in out and "-> pruned" in out
    report = json.loads((target / "pruning_report.json").read_text())
    records = report["card"]["evaluations"]
    assert {r["metric"] for r in records} == {"acc", "acc_norm"}
    assert all(r["dense"] is not None and r["n"] == 8 for r in records)
    card = (target / "README.md").read_text()
    assert "| acc | pycode_choice (local) |" in card and "lm-evaluation-harness 0.4" in card
    assert main(["eval", str(model_dir)]) == 2
    assert "eval needs --texts" in capsys.readouterr().err


def test_console_script_is_installed(model_dir, tmp_path):
    exe = shutil.which("hf-prune") or os.path.join(os.path.dirname(sys.executable), "hf-prune")
    out = tmp_path / "o"
    proc = subprocess.run([exe, "prune", str(model_dir), "--method", "magnitude", "--sparsity", "0.3",
                           "--output", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([exe, "prune", str(model_dir), "--method", "magnitude", "--pattern", "x",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "pattern='x' is not understood" in proc.stderr
