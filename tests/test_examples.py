"""Every script in examples/ runs to the end with small arguments (so none of them rots), offline: the model is
the examples' default, the shared trained decoder ../shared/models/pylm with its own text (or, where that folder is
absent, hf_prune.toy's tiny LLaMA from the session's cache), and the Hub is the loopback fake of tests/fakehub.py.

The scripts run as ``__main__`` inside this process (``runpy``), with their own ``sys.argv`` and their folder
on ``sys.path`` exactly as ``python examples/x.py`` has it: a subprocess per script would pay the imports of
torch/transformers and the corpus build again each time, several seconds of the suite's budget on 2 cores."""

from __future__ import annotations

import os
import runpy
import shlex
import sys

import pytest

from hf_prune.atomic import OUTPUT_MANIFEST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "examples")
HELPERS = {"example_utils.py"}

# (script, small arguments). Adding an example is one line here.
EXAMPLES = [
    ("magnitude.py", "--pattern 2:4 --eval-windows 4"),
    ("wanda.py", "--num-samples 8 --eval-windows 4 --push-to me/example-wanda"),
    ("sparsegpt.py", "--pattern 4:8 --num-samples 8 --eval-windows 4"),
    ("ria.py", "--sparsity 0.6 --num-samples 8 --eval-windows 4"),
    ("ecoflap.py", "--num-samples 8 --num-score-samples 4 --eval-windows 4"),
    ("modhifi.py", "--num-samples 8 --eval-windows 4"),
    ("spp.py", "--num-samples 8 --eval-windows 4"),
    ("input_compensation.py", "--num-samples 8 --eval-windows 4 --steps 2 --train-windows 16 --seq-len 32"),
    ("recovery_finetune.py", "--steps 2 --seq-len 32 --eval-windows 4"),
]


def run_example(script: str, arguments: list[str], monkeypatch) -> None:
    """``python examples/<script> <arguments>``, in this process."""
    monkeypatch.setattr(sys, "argv", [os.path.join(EXAMPLES_DIR, script), *arguments])
    monkeypatch.syspath_prepend(EXAMPLES_DIR)
    monkeypatch.delitem(sys.modules, "example_utils", raising=False)
    runpy.run_path(os.path.join(EXAMPLES_DIR, script), run_name="__main__")


@pytest.mark.parametrize("script,arguments", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs(script, arguments, toy_cache, fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_PRUNE_CACHE", os.path.dirname(toy_cache))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = shlex.split(arguments)
    run_example(script, [*args, "--output", str(out)], monkeypatch)
    printed = capsys.readouterr().out
    assert "perplexity" in printed and f"saved to {out}" in printed
    assert {"README.md", "model.safetensors", "pruning_report.json"} <= set(os.listdir(out))
    if "--push-to" in args:
        repo = args[args.index("--push-to") + 1]
        assert set(fake_hub.repos[repo].files) | {OUTPUT_MANIFEST} == set(os.listdir(out))  # all but the manifest


def test_every_example_is_tested_and_linked_from_the_readme():
    scripts = {f for f in os.listdir(EXAMPLES_DIR) if f.endswith(".py")} - HELPERS
    assert scripts == {e[0] for e in EXAMPLES}, "add the new example to EXAMPLES above"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for script in scripts:
        assert f"(examples/{script})" in readme, f"README.md does not link examples/{script}"
