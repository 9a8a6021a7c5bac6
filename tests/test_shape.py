"""The shape of the package: the import graph flows one way, the registry is a leaf, the engine imports no method
and no artifact writer, no method name is written outside its own package, and a method registered from outside
the package is picked up by the CLI, the planner, the report and the card with no other edit."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import hf_prune
from hf_prune.registry import available_methods, get_method, method_specs

PACKAGE = os.path.dirname(os.path.abspath(hf_prune.__file__))


# --------------------------------------------------------------------------------------------- the import graph


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = "hf_prune." + os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    """``{module: hf_prune modules it imports}``, counting imports inside functions too."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node.level, node.module)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
        graph[module] = {e for e in edges if e in modules and e != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "hf_prune.models" in graph["hf_prune.engine.walker"]  # the graph is real
    assert cycles(graph) == []


def test_engine_never_reaches_a_method_or_an_artifact_writer():
    graph = import_graph()
    engine = [m for m in graph if m.startswith("hf_prune.engine")]
    assert len(engine) >= 7
    for module in engine:
        bad = sorted(m for m in reachable(graph, module)
                     if m.startswith(("hf_prune.methods", "hf_prune.artifacts")))
        assert not bad, f"{module} imports {bad}"


def test_leaves_import_nothing_of_hf_prune():
    graph = import_graph()
    for leaf in ("hf_prune.registry", "hf_prune.checks", "hf_prune.patterns", "hf_prune.errors"):
        assert graph[leaf] == set(), f"{leaf} imports {graph[leaf]}"
    assert not any(m.startswith("hf_prune.methods") for m in reachable(graph, "hf_prune.models"))


# --------------------------------------------------------------------------------------------- names


def _string_literals(path: str) -> list[tuple[int, str]]:
    """(line, value) of the string constants of a file that are not docstrings."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def method_names_outside_their_package(names: list[str]) -> list[str]:
    found = []
    for module, path in _modules().items():
        for line, value in _string_literals(path):
            for name in names:
                if value == name and not module.startswith(f"hf_prune.methods.{name}"):
                    found.append(f"{os.path.relpath(path, PACKAGE)}:{line} {value!r}")
    return found


def test_no_method_name_is_written_outside_its_package(tmp_path):
    names = available_methods()
    assert {"wanda", "sparsegpt", "ecoflap", "spp", "modhifi"} <= set(names)
    assert method_names_outside_their_package(names) == [], \
        "ask the method's registered spec (hf_prune.registry.MethodSpec) instead of naming it"


def test_the_name_check_is_not_vacuous():
    # "unstructured" is written as a string in many modules: taken as a method name, the check reports it
    assert len(method_names_outside_their_package(["unstructured"])) > 3


def test_adding_a_builtin_method_is_one_import_line():
    text = open(os.path.join(PACKAGE, "methods", "__init__.py"), encoding="utf-8").read()
    for spec in method_specs():
        package = spec.config_class.__module__.split(".")[2]
        assert f"from .{package} import" in text, f"{spec.name} is not imported by hf_prune/methods/__init__.py"
    root = os.path.dirname(PACKAGE)
    for name in ("pyproject.toml", "setup.py"):
        text = open(os.path.join(root, name), encoding="utf-8").read()
        assert "hf_prune.methods" not in text and "hf_prune.engine" not in text, f"{name} lists packages by hand"


# --------------------------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_method_keeps_its_contract(name, tmp_path):
    from hf_prune import PrunerConfig
    from hf_prune.artifacts.cards import template_path
    from hf_prune.cli import build_parser, main

    spec = get_method(name)
    assert spec.display_name and spec.kind in ("one-shot", "trained")
    assert (spec.run is not None) == (spec.kind == "one-shot")
    assert os.path.isfile(template_path(spec.card_template))
    config = spec.config_class()
    assert config.method == name and isinstance(spec.needs_data(config), bool)
    assert PrunerConfig.from_dict(json.loads(config.to_json_string())) == config
    config.save_pretrained(tmp_path)
    assert PrunerConfig.from_pretrained(tmp_path) == config
    fields = [f.name for f in dataclasses.fields(spec.config_class) if f.name != "calibration"]
    assert fields
    build_parser()  # the --method choices come from the registry
    assert main(["prune", "model", "--method", name, "--output", str(tmp_path / "o"), "--help-method"]) == 0
    assert [s.name for s in method_specs()].count(name) == 1


# --------------------------------------------------------------------------------------------- a method from outside


CARD = """---
{{ card_data }}
---

# {{ title }}

Pruned by a plugin method with its own card ({{ method_name }}, {{ overall.achieved | round(4) }} sparsity).
"""


@pytest.fixture()
def outside_method(tmp_path):
    """A layer-wise method defined in this test file, registered like a third-party plugin would, with its own
    card template."""
    from hf_prune.methods.layerwise import LayerwiseConfig, run_layerwise
    from hf_prune.patterns import Pattern, mask_from_scores
    from hf_prune.registry import MethodCost, register_method, unregister_method

    @dataclass(kw_only=True)
    class ColumnNormConfig(LayerwiseConfig):
        """ColumnNorm: |W| x the column's input RMS squared, a test-only method registered from outside."""

        method: ClassVar[str] = "columnnorm"
        statistics: ClassVar[frozenset] = frozenset({"sq_norm"})

        power: float = 2.0

        def prune_weight(self, weight, stats, sparsity: float, pattern: Pattern):
            mask = mask_from_scores(weight.abs() * stats.col_sq_mean.clamp_min(0) ** (self.power / 2), sparsity,
                                    pattern, scope="row")
            return weight.masked_fill(mask, 0.0), mask, {}

    template = tmp_path / "columnnorm.md.j2"
    template.write_text(CARD, encoding="utf-8")
    spec = register_method(ColumnNormConfig, run_layerwise, display_name="ColumnNorm", resumable=True,
                           layerwise=True, needs_data=lambda config: True,
                           cost=lambda config: MethodCost(statistics=config.statistics), card_template=str(template))
    try:
        yield spec
    finally:
        unregister_method("columnnorm")
    assert "columnnorm" not in available_methods()


def test_a_method_registered_from_outside_is_picked_up_everywhere(outside_method, tokenizer, corpus, tmp_path,
                                                                  capsys):
    from conftest import make_batches, make_model

    from hf_prune import CalibrationConfig, Pruner, PrunerConfig
    from hf_prune.cli import main
    from hf_prune.planner import plan

    cls = outside_method.config_class
    # the CLI lists it and shows its options
    assert main(["methods"]) == 0
    listing = " ".join(capsys.readouterr().out.split())
    assert "columnnorm one-shot ColumnNormConfig ColumnNorm: |W| x the column's input RMS squared, a test-only " \
           "method registered from outside." in listing
    assert main(["prune", "m", "--method", "columnnorm", "--output", str(tmp_path / "o"), "--help-method"]) == 0
    assert "--power" in capsys.readouterr().out
    # the planner reads its cost from the spec: statistics per block, three passes
    configs = os.path.join(os.path.dirname(__file__), "data", "configs", "llama-2-7b.json")
    planned, magnitude = plan(configs, "columnnorm", throughput=1e12), plan(configs, "magnitude", throughput=1e12)
    assert planned.stages[0].stats_bytes > 0 == magnitude.stages[0].stats_bytes
    assert planned.flops > magnitude.flops
    # it prunes through the engine, the report and the card name it, the config reloads as its class
    model = make_model("llama", vocab=len(tokenizer))
    pruner = Pruner(model, tokenizer)
    result = pruner.prune(cls(sparsity=0.5, calibration=CalibrationConfig(num_samples=8)),
                          calibration_dataset=make_batches("llama", tokenizer, corpus), progress=False)
    assert result.report["method"] == "columnnorm" and result.sparsity == 0.5
    for name, entry in result.report["sparsity"]["per_module"].items():
        weight = model.get_submodule(name).weight
        assert torch.all((weight == 0).sum(1) == weight.shape[1] // 2), name
    out = pruner.save_pretrained(tmp_path / "pruned")
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert "pruned with ColumnNorm (unstructured)" in card and "- columnnorm" in card
    assert "Pruned by a plugin method with its own card (ColumnNorm, 0.5 sparsity)." in card
    assert type(PrunerConfig.from_pretrained(out)) is cls
    assert main(["report", out]) == 0
    assert "method: columnnorm" in capsys.readouterr().out
