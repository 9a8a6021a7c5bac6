"""Evaluation with pinned protocols: perplexity as the pruning papers compute it, zero-shot tasks through
lm-evaluation-harness (``zero_shot``, the optional ``hf-prune[eval]`` extra), and sparsity reports.

Perplexity protocol (Wanda / SparseGPT): the texts are joined by ``"\\n\\n"`` in their given order,
tokenised once (with the tokenizer's default special tokens), cut into non-overlapping windows of
exactly ``seq_len`` tokens (the remainder is dropped, no stride), and the perplexity is
exp(mean next-token NLL) over every predicted token of every window, accumulated in float64.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn

from .calibration.config import context_note, fit_seq_len
from .calibration.data import load_texts, text_tokenizer
from .engine.report import aggregate, model_totals, module_entry
from .engine.walker import model_device
from .models import text_context

PERPLEXITY_PROTOCOL = {
    "joiner": "\\n\\n",
    "tokenization": "once, default special tokens",
    "window_rule": "non-overlapping, exactly seq_len tokens, remainder dropped, no stride",
    "metric": "exp(mean next-token NLL over all predicted tokens)",
}


def perplexity_windows(tokenizer: Any, texts_or_dataset: Any, *, seq_len: int, text_column: str = "text",
                       split: str = "test") -> tuple[torch.Tensor, dict]:
    """The evaluation windows ([n, seq_len] token ids) and a record of how they were made."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2.")
    texts, provenance = load_texts(texts_or_dataset, text_column=text_column, split=split, purpose="evaluation")
    if not texts:
        raise ValueError("the evaluation data holds no text.")
    ids = text_tokenizer(tokenizer)("\n\n".join(texts), verbose=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows == 0:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than seq_len={seq_len}; give more "
                         "text or lower seq_len.")
    data = torch.tensor(ids[: windows * seq_len], dtype=torch.long).view(windows, seq_len)
    return data, {**provenance, "split": split, "seq_len": seq_len, "windows": windows, "tokens": len(ids),
                  **PERPLEXITY_PROTOCOL}


def eval_seq_len(model: nn.Module, seq_len: int | None) -> int:
    """The window length to evaluate ``model`` with: ``seq_len`` when it fits the model's context, the context
    itself when ``seq_len`` is None and the context is shorter than 2048 (else 2048); a ``seq_len`` past the
    context is a ``SequenceLengthError`` naming both numbers."""
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2):
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2, or None for the model's context.")
    return fit_seq_len(seq_len, text_context(model))


def check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1.")


def perplexity(model: nn.Module, tokenizer: Any, texts_or_dataset: Any, *, seq_len: int | None = None,
               batch_size: int = 1, text_column: str = "text", split: str = "test",
               max_windows: int | None = None, progress: bool = False) -> float:
    """Perplexity of a causal LM on ``texts_or_dataset`` with the pinned protocol of this module.

    ``texts_or_dataset``: a list of strings, a ``datasets.Dataset``, a local file, ``"builtin:python-docs"``
    (its ``test`` split by default) or a Hub dataset name. ``max_windows`` caps the number of windows.
    ``seq_len``: the window length (default: the model's context, at most 2048; see ``eval_seq_len``).
    """
    check_batch_size(batch_size)
    seq_len = eval_seq_len(model, seq_len)
    data, _ = perplexity_windows(tokenizer, texts_or_dataset, seq_len=seq_len, text_column=text_column, split=split)
    return _windows_perplexity(model, data[:max_windows] if max_windows is not None else data,
                               batch_size=batch_size, progress=progress)


@torch.no_grad()
def _windows_perplexity(model: nn.Module, data: torch.Tensor, *, batch_size: int, progress: bool) -> float:
    from tqdm.auto import tqdm

    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for chunk in tqdm(data.split(batch_size), desc="perplexity", disable=not progress, leave=False):
            chunk = chunk.to(device)
            out = model(input_ids=chunk, use_cache=False)
            logits = getattr(out, "logits", None)
            if logits is None or logits.dim() != 3:
                raise ValueError(f"perplexity needs a causal language model that returns logits; "
                                 f"{type(model).__name__} does not.")
            nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                              chunk[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll.double())
            total_tokens += chunk[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


def perplexity_record(model: nn.Module, tokenizer: Any, texts_or_dataset: Any, *, seq_len: int | None = None,
                      dense: float | None = None, batch_size: int = 1, text_column: str = "text",
                      split: str = "test", max_windows: int | None = None, progress: bool = False) -> dict:
    """Measure ``perplexity`` and return it as an evaluation record for model cards
    (``Pruner.save_pretrained(evaluations=[...])``): metric, value, the ``dense`` value measured before pruning
    with the same arguments (optional), dataset, split, seq_len, the number of windows used and the protocol."""
    if dense is not None and (isinstance(dense, bool) or not isinstance(dense, (int, float))):
        raise ValueError(f"dense={dense!r} must be the dense model's perplexity (a number) or None.")
    check_batch_size(batch_size)
    seq_len = eval_seq_len(model, seq_len)
    data, record = perplexity_windows(tokenizer, texts_or_dataset, seq_len=seq_len, text_column=text_column,
                                      split=split)
    windows = min(len(data), max_windows or len(data))
    value = _windows_perplexity(model, data[:windows], batch_size=batch_size, progress=progress)
    protocol = {**PERPLEXITY_PROTOCOL, "windows": f"the first {windows} of {len(data)}",
                "tokens_in_text": record["tokens"]}
    note = context_note(seq_len, text_context(model))
    if note:
        protocol["seq_len"] = note
    if record.get("sha256"):  # a local file: published by file name and content hash, never by the machine's path
        protocol["sha256"] = record["sha256"]
    return {"metric": "perplexity", "value": round(value, 4), "dense": None if dense is None else round(dense, 4),
            "dataset": str(record.get("source") or "<in-memory texts>"),
            "split": None if record.get("local") else split, "seq_len": seq_len, "local": bool(record.get("local")),
            "windows": windows, "task": "text-generation", "protocol": protocol}


def sparsity_report(model: nn.Module, modules: str | None = None) -> dict:
    """Zeros in every ``nn.Linear`` weight (or only those whose name contains ``modules``), per module and
    overall, plus totals over all parameters."""
    entries = {name: module_entry(m.weight.detach(), None, None) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (modules is None or modules in name)}
    return {"overall": aggregate(entries), "per_module": entries, "model_totals": model_totals(model)}


# ------------------------------------------------------------------------------------------ zero-shot tasks

LM_EVAL_HINT = 'pip install "hf-prune[eval]" (lm-evaluation-harness, lm-eval>=0.4.13)'


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(f"zero-shot evaluation needs lm-evaluation-harness: {LM_EVAL_HINT}.") from None
    import lm_eval

    return lm_eval, evaluator, HFLM, TaskManager


def check_tasks(tasks: Any) -> list[str]:
    """Task names as a list: a comma-separated string or a list of non-empty strings."""
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    if (not isinstance(tasks, (list, tuple)) or not tasks
            or not all(isinstance(t, str) and t.strip() for t in tasks)):
        raise ValueError(f"tasks={tasks!r} must name lm-evaluation-harness tasks, e.g. ['boolq', 'piqa'] or "
                         "'boolq,piqa'.")
    return [t.strip() for t in tasks]


def _task_manager(TaskManager: type, tasks: list[str], include_path: Any):
    """lm-eval's task index: only ``include_path`` when it holds every task asked for (indexing the harness's
    thousands of built-in tasks takes seconds), else the built-in tasks as well. An unknown task is a
    ``ValueError`` naming it, raised before the model runs."""
    paths = [os.fspath(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike))
                                    else include_path or [])]
    for p in paths:
        if not os.path.exists(p):
            raise ValueError(f"include_path {p!r} does not exist; give the folder of your lm-eval task YAML files.")
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-evaluation-harness has no task {unknown[0]!r}"
                         f"{' (nor has ' + ', '.join(paths) + ')' if paths else ''}; list them with "
                         "`lm-eval ls tasks`, or pass include_path= the folder of your own task YAML.")
    return manager


class _InMemoryLM:
    """Builds lm-eval's ``HFLM`` around a model that is already loaded (no reload, no copy): the device is where
    the model's forward runs (accelerate's execution device for an offloaded model, whose weights sit on
    ``meta`` between forwards)."""

    @staticmethod
    def build(HFLM: type, model: nn.Module, tokenizer: Any, *, batch_size: int, max_length: int | None):
        from .engine.offload import hook_execution_device

        device = hook_execution_device(model) or model_device(model)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                  device=str(device))
        lm._device = torch.device(device)  # HFLM reads model.device, which is meta for an offloaded model
        return lm


def _dataset_of(config: dict, task: str) -> tuple[str, str | None, bool]:
    """(dataset as published in a card, its Hub config, whether it is a local/custom dataset) of an lm-eval task."""
    path = config.get("dataset_path")
    if not path or config.get("custom_dataset") or os.path.exists(str(path)):
        return task, None, True  # a task over a local file: named by its task, never by a local path
    return str(path), config.get("dataset_name"), False


def zero_shot(model: nn.Module, tokenizer: Any, tasks: Any, *, num_fewshot: int = 0, limit: int | float | None = None,
              batch_size: int = 1, include_path: Any = None, max_length: int | None = None,
              dense: list[dict] | None = None, seed: int = 0) -> list[dict]:
    """Zero-shot (or ``num_fewshot``-shot) accuracy of the model *in memory* on lm-evaluation-harness tasks.

    ``tasks``: names such as ``["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
    "openbookqa"]`` (their data downloads from the Hub on first use) or a comma-separated string; tasks of your
    own: ``include_path`` = a folder of task YAML files (``tests/data/lm_eval_tasks`` holds an offline one).
    ``limit``: at most that many examples per task (a float below 1: that fraction), for a quick look only.
    ``dense``: the records of the same call on the model before pruning; each record here then carries the dense
    value too. The model is evaluated as it is (offloaded models included), never reloaded; its training mode is
    restored afterwards.

    Returns one record per (task, metric) shaped like ``perplexity_record``'s, for
    ``Pruner.save_pretrained(evaluations=...)``: ``metric`` (``acc``, ``acc_norm``...), ``value``, ``stderr``,
    ``dense``, ``dataset`` (the task's Hub dataset, or the task name for a local one), ``split``, ``n`` (examples
    scored), ``lm_eval_task``, ``task`` (the Hub task type) and ``protocol`` (harness and task versions,
    few-shot count, limit, batch size, output type).
    """
    tasks = check_tasks(tasks)
    check_batch_size(batch_size)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot={num_fewshot!r} must be an integer >= 0.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and limit >= 1 and not limit.is_integer())):
        raise ValueError(f"limit={limit!r} must be a number of examples (an integer >= 1), a fraction below 1, or "
                         "None for every example.")
    if tokenizer is None:
        raise ValueError("zero-shot evaluation needs the model's tokenizer; pass tokenizer=... (Pruner.tokenizer).")
    if dense is not None and not isinstance(dense, list):
        raise ValueError("dense must be the list of records zero_shot returned for the dense model, or None.")
    lm_eval, evaluator, HFLM, TaskManager = require_lm_eval()
    manager = _task_manager(TaskManager, tasks, include_path)
    was_training = model.training
    harness_log = logging.getLogger("lm_eval")
    level = harness_log.level
    # its warnings about being handed a model object (what this function is for) are noise to our users
    harness_log.setLevel(logging.ERROR)
    try:
        lm = _InMemoryLM.build(HFLM, model, tokenizer, batch_size=batch_size, max_length=max_length)
        out = evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                        task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                        fewshot_random_seed=seed)
    finally:
        model.train(was_training)
        harness_log.setLevel(level)
    dense_by_key = {(d.get("lm_eval_task"), d.get("metric")): d for d in dense or []}
    records = []
    for name in tasks:
        for task, metrics in sorted(out["results"].items()):
            if task != name and task not in (out.get("group_subtasks") or {}).get(name, []):
                continue
            config = (out.get("configs") or {}).get(task, {})
            dataset, dataset_config, local = _dataset_of(config, task)
            n = (out.get("n-samples") or {}).get(task, {})
            for key, value in sorted(metrics.items()):
                if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                metric, filter_name = key.split(",", 1)
                stderr = metrics.get(f"{metric}_stderr,{filter_name}")
                before = dense_by_key.get((task, metric))
                records.append({
                    "metric": metric, "value": round(float(value), 4),
                    "stderr": round(float(stderr), 4) if isinstance(stderr, (int, float)) else None,
                    "dense": before["value"] if before else None,
                    "dense_stderr": before.get("stderr") if before else None,
                    "dataset": dataset, "dataset_config": dataset_config,
                    "split": None if local else config.get("test_split") or config.get("validation_split"),
                    "local": local, "n": n.get("effective"), "lm_eval_task": task, "task": "text-generation",
                    "protocol": {
                        "harness": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}",
                        "task": task, "task_version": (out.get("versions") or {}).get(task),
                        "num_fewshot": num_fewshot, "limit": limit,
                        "examples": f"{n.get('effective')} of {n.get('original')}",
                        "output_type": config.get("output_type"), "filter": filter_name,
                        "batch_size": batch_size, "seed": seed,
                        "model": "evaluated in memory (lm_eval.models.huggingface.HFLM around the loaded model)",
                    }})
    return records
