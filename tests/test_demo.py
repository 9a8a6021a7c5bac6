"""The README's main job (hf-prune demo) stays runnable and keeps telling the truth."""

from __future__ import annotations

import pytest

from hf_prune.demo import run_demo


def test_demo_quick(minilm_path):
    lines = []
    records = run_demo(quick=True, progress=False, print_fn=lines.append)
    assert len(records) == 8 and all(r["sparsity"] == pytest.approx(0.5) for r in records)
    by = {(r["method"], r["pattern"]): r["mean_cosine"] for r in records}
    for pattern in ("unstructured", "2:4"):
        assert by[("sparsegpt", pattern)] > by[("wanda", pattern)] > by[("magnitude", pattern)]
    table = "\n".join(lines)
    assert "mean cosine to dense" in table and "sparsegpt" in table
