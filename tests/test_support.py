"""The README's table of families x methods is what the registered methods' ``serves`` capabilities say about the
suite's tiny model of every family, and ``Pruner.prune`` refuses the cells it marks "-" with the same reason."""

from __future__ import annotations

import pathlib

import pytest
from conftest import DISCOVERED, TINY_MODELS, make_model

from hf_prune import Pruner
from hf_prune.errors import UnsupportedModelError
from hf_prune.support import one_shot_methods, support_rows, support_table

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"


def tiny_models(vocab: int) -> dict:
    """Every family's tiny model of the suite, file families first (tests/conftest.py)."""
    names = list(dict.fromkeys([*TINY_MODELS.values(), *DISCOVERED.values()]))
    return {name: make_model(name, vocab=vocab) for name in names}


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_models(len(tokenizer))


def test_the_readme_table_is_the_generated_one(models):
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, "README.md lost its family table markers"
    table = text.split(START, 1)[1].split(END, 1)[0].strip() + "\n"
    assert table == support_table(models), ("README.md's family table is stale; regenerate it with "
                                            "`python benchmarks/families.py --readme`")


def test_refused_cells_are_refused_by_prune_with_the_same_reason(models, tokenizer):
    rows = {row["label"]: row for row in support_rows(models)}
    refused = [(label, spec) for label in rows for spec in one_shot_methods()
               if rows[label]["methods"][spec.display_name] is not None]
    assert {label for label, _ in refused} >= {"gpt2", "resnet", "mixtral"}  # Conv1D / no Linear / experts
    for label, spec in refused:
        model = models[label]
        reason = rows[label]["methods"][spec.display_name]
        with pytest.raises(UnsupportedModelError) as info:
            Pruner(model, tokenizer).prune(spec.config_class(), progress=False)
        assert str(info.value).startswith(reason.rstrip(".")), (label, spec.name, str(info.value))
