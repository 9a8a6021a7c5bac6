"""Contracts of the family registry (``hf_prune.models``): every registered family has a tiny model in the suite
and its spec holds on it (stages, MLP and attention specs, token counts, causal-LM flag, pipeline tags), and no
code outside ``hf_prune/models/`` branches on a family's or a stage's name."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import transformers as T
from conftest import NOT_LAYERWISE, TINY_MODELS, make_batches, make_model

from hf_prune.artifacts.cards import pipeline_tag
from hf_prune.engine.targets import linear_candidates
from hf_prune.models import get_family, is_causal_lm, registered_families

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hf_prune"
REGISTERED = [family.name for family in registered_families()]
# the Hub pipeline tag of each family's tiny model (what its cards say)
PIPELINE_TAGS = {"llama": "text-generation", "opt": "text-generation", "bert": "feature-extraction",
                 "vit": "image-classification", "clip": "zero-shot-image-classification", "blip-2": "image-to-text",
                 "resnet": "image-classification"}


@pytest.fixture(scope="module")
def tiny(tokenizer, corpus):
    """family name -> (its tiny model, one batch for it), built once."""
    out = {}
    for name, key in TINY_MODELS.items():
        model = make_model(key, vocab=len(tokenizer)).eval()
        out[name] = model, make_batches(key, tokenizer, corpus, n=4)[0]
    return out


# ------------------------------------------------------------------------------------- every family has a tiny model


def test_every_registered_family_has_a_tiny_model():
    missing = sorted(set(REGISTERED) - set(TINY_MODELS))
    assert not missing, f"registered families without a tiny model in tests/conftest.py TINY_MODELS: {missing}"
    assert sorted(TINY_MODELS) == sorted(REGISTERED), "TINY_MODELS names a family that is not registered"
    assert set(NOT_LAYERWISE) <= set(REGISTERED) and set(PIPELINE_TAGS) == set(REGISTERED)


@pytest.mark.parametrize("name", REGISTERED)
def test_the_tiny_model_belongs_to_its_family(name, tiny):
    model, _ = tiny[name]
    family = get_family(model)
    assert family.name == name and model.config.model_type in family.model_types


@pytest.mark.parametrize("name", REGISTERED)
def test_stages_resolve_and_run_reaches_their_first_block(name, tiny):
    model, batch = tiny[name]
    stages = get_family(model).stages(model)
    assert stages and len({s.path for s in stages}) == len(stages)
    for stage in stages:
        blocks = stage.blocks(model)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0, stage.name
        assert set(stage.requires) <= set(batch), (stage.name, stage.requires, sorted(batch))
        assert stage.mask_key is None or stage.mask_key in batch, stage.name
        assert stage.config(model) is not None
        for seq_len in (1, 24):
            tokens = stage.tokens_per_sample(model, seq_len)
            assert isinstance(tokens, int) and tokens >= 1, (stage.name, tokens)
        reached = []
        hook = blocks[0].register_forward_pre_hook(lambda module, args: reached.append(True))
        try:
            with torch.no_grad():
                stage.run(model, {k: batch[k] for k in batch if k in (*stage.requires, stage.mask_key)})
        finally:
            hook.remove()
        assert reached, f"the {stage.name} stage's run does not reach {stage.path}.0"


@pytest.mark.parametrize("name", REGISTERED)
def test_mlp_and_attention_specs_name_linears_of_the_configured_widths(name, tiny):
    model, _ = tiny[name]
    for stage in get_family(model).stages(model):
        block, config = stage.blocks(model)[0], stage.config(model)
        if stage.mlp is not None:
            width = getattr(config, stage.mlp.width_key)
            for path in stage.mlp.inputs:
                assert block.get_submodule(path).out_features == width, (stage.name, path)
            assert block.get_submodule(stage.mlp.output).in_features == width, (stage.name, stage.mlp.output)
        if stage.attention is not None:
            spec = stage.attention
            for path in (spec.q, spec.k, spec.v, spec.o):
                assert isinstance(block.get_submodule(path), torch.nn.Linear), (stage.name, path)
            assert hasattr(block.get_submodule(spec.module), spec.head_dim_attr), (stage.name, spec.module)
            assert getattr(config, spec.heads_key) > 0


@pytest.mark.parametrize("name", REGISTERED)
def test_the_layerwise_matrix_leaves_out_only_families_without_linears_in_their_blocks(name, tiny):
    model, _ = tiny[name]
    linears = linear_candidates(model, get_family(model).stages(model))
    assert bool(linears) == (name not in NOT_LAYERWISE), NOT_LAYERWISE.get(name, "has Linears in its blocks")


@pytest.mark.parametrize("name", REGISTERED)
def test_causal_lm_flag_agrees_with_the_model(name, tiny):
    model, _ = tiny[name]
    assert is_causal_lm(model) == get_family(model).causal_lm


@pytest.mark.parametrize("name", REGISTERED)
def test_pipeline_tags(name, tiny):
    model, _ = tiny[name]
    family = get_family(model)
    assert pipeline_tag(type(model).__name__, model.config.model_type) == PIPELINE_TAGS[name]
    for suffix, tag in family.pipeline_tags.items():  # a family's own tags name real transformers classes
        assert hasattr(T, suffix), suffix
        assert pipeline_tag(suffix, family.model_types[0]) == tag


def test_family_losses_name_their_kind_and_what_they_need(tiny):
    declared = {f.name: f.loss for f in registered_families() if f.loss is not None}
    assert declared, "no family declares its own loss"
    kinds = [loss.kind for loss in declared.values()]
    assert len(set(kinds)) == len(kinds) and all(loss.description for loss in declared.values())
    for name, loss in declared.items():
        model, batch = tiny[name]
        assert set(loss.requires) <= set(batch), (name, loss.requires)


# ------------------------------------------------------------------------------ no family branches outside models/


def _names_a_stage_or_family(node: ast.AST) -> bool:
    """``stage.name``, ``family.name``, ``config.model_type``, a variable called ``stage_name`` and the like."""
    text = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return text in ("name", "model_type") or "stage" in text or "family" in text


def _strings(node: ast.AST) -> set[str]:
    """The string constant(s) of ``node``: one string, or a tuple / list / set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts)) if node.elts else set()
    return set()


def family_branches(source: str, families: set[str], stages: set[str]) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``, ``is``) against a family name or model_type, or against a
    stage name on the other side of ``stage.name``-like expressions; and dict tables keyed by family names.
    Docstrings and comments are not code, so they are never flagged; a plain string is not a branch."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for left, right in zip(operands, operands[1:]):
                for const, other in ((left, right), (right, left)):
                    words = _strings(const)
                    if words & families or (words & stages and _names_a_stage_or_family(other)):
                        found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            keys = set().union(*(_strings(k) for k in node.keys if k is not None))
            if keys & families:
                found.append(f"line {node.lineno}: a table keyed by family names {sorted(keys & families)}")
    return sorted(set(found))


@pytest.fixture(scope="module")
def known_names(tiny) -> tuple[set[str], set[str]]:
    """(family names and model_types, stage names of every tiny model and of CLIP's standalone towers)."""
    families = {n for f in registered_families() for n in (f.name, *f.model_types)}
    models = [model for model, _ in tiny.values()]
    clip = tiny["clip"][0]
    models += [T.CLIPVisionModel(clip.config.vision_config), T.CLIPTextModel(clip.config.text_config)]
    stages = {s.name for m in models for s in get_family(m).stages(m)}
    return families, stages


def test_the_branch_finder_flags_family_and_stage_branches_and_nothing_else(known_names):
    families, stages = known_names
    assert {"clip", "blip-2", "llama", "mistral"} <= families and {"vision", "qformer", "decoder"} <= stages
    branches = '''
if family.name == "clip":
    pass
if model_type_of(model) in ("llama", "mistral"):
    pass
vision = getattr(config, "vision_config", None) if stage.name != "decoder" else None
if "qformer" == stage_name:
    pass
tag = {"blip-2": "image-to-text"}[family.name]
'''
    assert len(family_branches(branches, families, stages)) == 5, family_branches(branches, families, stages)
    innocent = '''
def column(rows, what="text"):
    """When family.name == "clip" the towers are two (a docstring, not code)."""
    if what != "text":  # a column kind; stage.name == "vision" in a comment is not code either
        return "clip"
    return [r for r in rows if r.kind in ("encoder", "vision")]
'''
    assert family_branches(innocent, families, stages) == []


def test_no_family_or_stage_name_branch_outside_models(known_names):
    families, stages = known_names
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "models") in path.parents:
            continue
        hits = family_branches(path.read_text(encoding="utf-8"), families, stages)
        if hits:
            found[str(path.relative_to(PACKAGE.parent))] = hits
    assert not found, ("family knowledge outside hf_prune/models/ (give the Family or Stage a field or function "
                       f"instead): {found}")
