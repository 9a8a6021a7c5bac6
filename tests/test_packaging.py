"""The wheel carries every hf_prune package and the card templates (setup.py finds the packages itself; a package
left out would only fail for users who pip install without -e)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_every_package_and_template(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), ROOT], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for folder, _, files in os.walk(os.path.join(ROOT, "hf_prune")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)
                assert rel in names, f"{rel} is missing from the wheel: does setup.py still find every package?"
    templates = [f for f in os.listdir(os.path.join(ROOT, "model_cards")) if f.endswith(".j2")]
    assert templates and all(f"hf_prune/model_cards/{t}" in names for t in templates)
