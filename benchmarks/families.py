"""The family matrix: which method prunes which model family, as registered and as it runs.

    python benchmarks/families.py                 # the table, then a real run of every cell on tiny random models
    python benchmarks/families.py --readme        # rewrite README.md's family table (tests/test_support.py checks it)
    python benchmarks/families.py --families gpt2 mixtral t5 --methods wanda sparsegpt

Models: the test suite's tiny random model of every family (tests/conftest.py: hidden 64, 2 layers, built offline
from config classes). The first table is ``hf_prune.support.support_table``: what each registered method's
``serves`` says. The second runs each one-shot layer-wise method (Magnitude 50%, Wanda 50%, SparseGPT 2:4) and
ECoFLaP on each model and reports what happened: the weights pruned (Linear, Conv1D and expert slices), whether
every target reached its exact structure, and whether save -> stock ``from_pretrained`` gives identical outputs;
or the error it refused with. Where llm-compressor is importable (it is not installed here; this script never
installs it), its SparseGPT 2:4 runs on the same decoder models and its pruned weight count is printed next to
ours. Prints tables; never asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from conftest import DISCOVERED, TINY_MODELS, make_batches, make_model  # noqa: E402

from hf_prune import (  # noqa: E402
    CalibrationConfig,
    ECoFLaPConfig,
    MagnitudeConfig,
    Pruner,
    SparseGPTConfig,
    WandaConfig,
)
from hf_prune.calibration import builtin_texts  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.engine.targets import target_weight  # noqa: E402
from hf_prune.models.discovery import decoder_inputs  # noqa: E402
from hf_prune.patterns import nm_violations, prune_count  # noqa: E402
from hf_prune.support import support_table  # noqa: E402
from hf_prune.toy import train_tokenizer  # noqa: E402

README = os.path.join(HERE, "..", "README.md")
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
CAL = CalibrationConfig(num_samples=8)
RUNS = {"magnitude": lambda: MagnitudeConfig(sparsity=0.5, calibration=CAL),
        "wanda": lambda: WandaConfig(sparsity=0.5, calibration=CAL),
        "sparsegpt": lambda: SparseGPTConfig(pattern="2:4", calibration=CAL),
        "ecoflap": lambda: ECoFLaPConfig(sparsity=0.5, num_score_samples=4, calibration=CAL)}


def _outputs(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**decoder_inputs(model, batch))
    for key in ("logits_per_image", "logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if torch.is_tensor(value):
            return value
    return out[0]


def _exact(model, report: dict, config) -> bool:
    """Every target at its exact structure: N:M in every group, or exactly the budgeted zeros."""
    ok = True
    for name, entry in report["sparsity"]["per_module"].items():
        weight = target_weight(model, name)
        if config.pattern != "unstructured":
            n, m = map(int, config.pattern.split(":"))
            ok &= nm_violations(weight, n, m) == 0 and entry["zeros"] == weight.numel() // 2
        elif getattr(config, "scope", "matrix") == "row":
            ok &= bool(torch.all((weight == 0).sum(1) == prune_count(weight.shape[1], entry["target"])))
        elif "module_sparsity" not in report.get("allocation", {}):
            ok &= entry["zeros"] == prune_count(weight.numel(), entry["target"])
    return ok


def run_cell(name: str, method: str, tokenizer, corpus) -> dict:
    model = make_model(name, vocab=len(tokenizer))
    batches = make_batches(name, tokenizer, corpus)
    config = RUNS[method]()
    start = time.perf_counter()
    try:
        result = Pruner(model, tokenizer).prune(config, calibration_dataset=batches, progress=False)
    except Exception as exc:  # a refusal is a result here
        return {"status": f"refused: {type(exc).__name__}: {str(exc)[:60]}..."}
    seconds = time.perf_counter() - start
    overall = result.report["sparsity"]["overall"]
    exact = _exact(model, result.report, config) if method != "ecoflap" else None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = type(model).from_pretrained(tmp)
        same = torch.equal(_outputs(model, batches[0]), _outputs(reloaded, batches[0]))
    return {"status": "ok", "targets": overall["modules"], "achieved": overall["achieved"], "exact": exact,
            "reload": same, "seconds": seconds}


def llmcompressor_zeros(name: str, tokenizer, corpus) -> str:
    """Weights llm-compressor's SparseGPT 2:4 zeroes in the same tiny model, or why it could not run."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    except ImportError:
        return "not installed"
    model = make_model(name, vocab=len(tokenizer))
    batches = make_batches(name, tokenizer, corpus)
    if "input_ids" not in batches[0]:
        return "text models only here"
    before = sum(int((p == 0).sum()) for p in model.parameters())
    rows = [ids for b in batches for ids in b["input_ids"].tolist()]
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    try:
        oneshot(model=model, dataset=data, recipe=[SparseGPTModifier(sparsity=0.5, mask_structure="2:4",
                                                                      targets=["Linear"], ignore=["re:.*lm_head"])],
                num_calibration_samples=len(rows), max_seq_length=len(rows[0]))
    except Exception as exc:
        return f"failed: {type(exc).__name__}"
    return str(sum(int((p == 0).sum()) for p in model.parameters()) - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's family table and stop")
    parser.add_argument("--families", nargs="*", help="make_model names (default: every family of the suite)")
    parser.add_argument("--methods", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    corpus = list(builtin_texts("builtin:python-docs", "train"))
    tokenizer = train_tokenizer(corpus[:2000])
    names = args.families or list(dict.fromkeys([*TINY_MODELS.values(), *DISCOVERED.values()]))
    table = support_table({name: make_model(name, vocab=len(tokenizer)) for name in names})
    if args.readme:
        text = open(README, encoding="utf-8").read()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        with open(README, "w", encoding="utf-8") as fh:
            fh.write(f"{head}{START}\n{table}{END}{tail}")
        print(f"README.md's family table rewritten ({len(names)} models)")
        return
    print("What the registered methods serve (hf_prune.support.support_table):\n")
    print(table)
    rows = []
    for name in names:
        for method in args.methods:
            cell = run_cell(name, method, tokenizer, corpus)
            if cell["status"] != "ok":
                rows.append([name, method, cell["status"], "", "", "", "", ""])
                continue
            rows.append([name, method, "ok", cell["targets"], f"{cell['achieved']:.3f}",
                         "-" if cell["exact"] is None else ("yes" if cell["exact"] else "NO"),
                         "yes" if cell["reload"] else "NO", f"{cell['seconds']:.2f}"])
        rows.append([name, "llm-compressor sparsegpt 2:4 zeros", llmcompressor_zeros(name, tokenizer, corpus),
                     "", "", "", "", ""])
    print(format_table(rows, ["model", "method", "result", "targets", "achieved", "exact structure",
                              "stock reload equal", "prune s"]))


if __name__ == "__main__":
    main()
