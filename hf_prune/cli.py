"""``hf-prune``: prune, evaluate and inspect models from the command line.

Method options mirror the config dataclass fields (``--block-size`` is ``SparseGPTConfig.block_size``);
calibration options mirror ``CalibrationConfig``. Bad input exits with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import shlex
import sys
import textwrap
import typing
from typing import Any, Sequence

from .artifacts.cards import card_files_for_folder
from .artifacts.hub import folder_files, push_folder
from .atomic import check_output_dir
from .calibration.config import CalibrationConfig
from .demo import run_demo
from .engine import distributed
from .engine.checkpoint import RunCheckpoint, resumable_methods
from .engine.report import format_table, sparsity_table
from .errors import HFPruneError
from .evaluation import (
    check_tasks,
    eval_seq_len,
    perplexity,
    perplexity_record,
    perplexity_windows,
    require_lm_eval,
    zero_shot,
)
from .planner import plan
from .pruner import Pruner
from .registry import available_methods, default_method, get_method, method_specs

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

_CALIBRATION_FLAGS = {  # CalibrationConfig field -> flag
    "dataset": "--calibration",
    "dataset_config": "--calibration-config",
    "split": "--calibration-split",
    "text_column": "--text-column",
    "image_column": "--image-column",
    "num_samples": "--num-samples",
    "seq_len": "--seq-len",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "packing": "--packing",
}


class CLIError(Exception):
    pass


def _json_value(text: str) -> Any:
    """A JSON literal, or the path of a JSON file."""
    if os.path.isfile(text):
        return _read_json(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither JSON nor the path of a JSON file") from None


def _float_or_none(text: str) -> float | None:
    """A number, or ``none`` for an optional one (e.g. ``--zo-stop-tol none``)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'none'") from None


def _help_text(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


@functools.lru_cache(maxsize=None)
def _defaults(config_class: type) -> dict:
    """The values a config built with no arguments holds (a declared ``None`` may become a real default in
    ``__post_init__``, e.g. ``sparsity`` 0.5); empty when the class needs arguments."""
    try:
        instance = config_class()
    except Exception:  # a config with required fields: only the declared defaults are known
        return {}
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(config_class)}


def _allowed_from_message(message: str, name: str) -> str | None:
    if name.split("[")[0] not in message:
        return None
    for pattern in (r"choose one of (.+?)\.?$", r"must be (.+?)(?:, got |; |\.$|$)", r"; use (.+?)\.?$"):
        match = re.search(pattern, message.strip().splitlines()[0])
        if match:
            return ("one of " if pattern.startswith("choose") else "") + match.group(1)
    return None


@functools.lru_cache(maxsize=None)
def allowed_values(config_class: type, name: str) -> str | None:
    """What a config field accepts, in the words of the config's own validation: the field is set to a value no
    config accepts (a NUL string, a huge negative number) and the error's "choose one of ..." / "must be ..."
    part is kept. None when the config accepts anything of the field's type."""
    hint = typing.get_type_hints(config_class)[name]
    if hint is bool:
        return "on/off"
    text = str(hint)
    probes = (["\x00"] if "str" in text else []) + ([-10**9] if "float" in text or "int" in text else [])
    for bad in probes:
        try:
            config_class(**{name: bad})
        except Exception as exc:  # the config's validation names what it accepts
            found = _allowed_from_message(str(exc), name)
            if found:
                return found
    return None


def _option_help(config_class: type, name: str, declared: Any) -> str:
    effective = _defaults(config_class).get(name, declared)
    default = repr(declared) if effective == declared else f"{declared!r}, i.e. {effective!r}"
    allowed = allowed_values(config_class, name)
    if allowed and allowed.startswith("one of ") and ("list" in str(typing.get_type_hints(config_class)[name])
                                                      or "tuple" in str(typing.get_type_hints(config_class)[name])):
        allowed = "each " + allowed
    return f"default: {default}" + (f"; allowed: {allowed}" if allowed else "")


def _add_field(parser: Any, flag: str, hint: Any, default: Any, dest: str, owner: str,
               config_class: type | None = None, name: str | None = None) -> None:
    text = str(hint)
    help_text = _option_help(config_class, name, default) if config_class is not None else f"default: {default!r}"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": _help_text(help_text)}
    metavar = dest.split(".")[-1].upper()
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif "list" in text or "tuple" in text:
        parser.add_argument(flag, nargs="+", metavar="VALUE", **kwargs)
    elif "dict" in text:
        parser.add_argument(flag, type=_json_value, metavar="JSON", **kwargs)
    elif "float" in text:
        parser.add_argument(flag, type=_float_or_none if "None" in text else float, metavar=metavar, **kwargs)
    elif "int" in text:
        parser.add_argument(flag, type=int, metavar=metavar, **kwargs)
    else:
        parser.add_argument(flag, type=str, metavar=metavar, **kwargs)


def _config_fields(config_class: type) -> list[tuple[str, Any, Any]]:
    """(field name, type hint, declared default) of a config's options, ``calibration`` left out."""
    hints = typing.get_type_hints(config_class)
    out = []
    for f in dataclasses.fields(config_class):
        if f.name == "calibration":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append((f.name, hints[f.name], default))
    return out


def _add_method_options(parser: argparse.ArgumentParser, config_class: type, prefix: str = "") -> None:
    group = parser.add_argument_group(f"{config_class.__name__} options (--method {config_class.method})")
    for name, hint, default in _config_fields(config_class):
        _add_field(group, "--" + name.replace("_", "-"), hint, default, prefix + name, config_class.__name__,
                   config_class, name)


def _add_calibration_options(parser: argparse.ArgumentParser) -> None:
    cal = parser.add_argument_group("calibration (CalibrationConfig)")
    cal_hints = typing.get_type_hints(CalibrationConfig)
    for f in dataclasses.fields(CalibrationConfig):
        hint = str if f.name == "dataset" else cal_hints[f.name]
        _add_field(cal, _CALIBRATION_FLAGS[f.name], hint, f.default, "calibration." + f.name, "CalibrationConfig",
                   CalibrationConfig, f.name)


def _add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    _add_method_options(parser, config_class)
    _add_calibration_options(parser)


def methods_options_text() -> str:
    """Every one-shot method's options with default and allowed values, for ``prune --help`` (generated from the
    configs, as ``--help-method`` is)."""
    lines = ["method options (each method's own; `--method M --help` shows them as options):"]
    for spec in method_specs():
        if spec.kind != "one-shot":
            continue
        lines.append(f"  --method {spec.name} ({spec.config_class.__name__}):")
        for name, hint, default in _config_fields(spec.config_class):
            flag = "--" + name.replace("_", "-")
            lines.append(textwrap.fill(_option_help(spec.config_class, name, default), width=100,
                                       initial_indent=f"    {flag:<26} ", subsequent_indent=" " * 31))
    trained = [s for s in method_specs() if s.kind == "trained"]
    if trained:
        lines.append("trained methods (not run by prune; see `hf-prune methods`): "
                     + ", ".join(s.name for s in trained))
    return "\n".join(lines)


def _method_choice(name: str) -> str:
    """``--method``: a registered method (a trained one is refused by ``prune`` itself, with how it is run, before
    anything loads; its ``--help-method`` still lists its options)."""
    try:
        get_method(name)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}; choose one of {', '.join(oneshot_methods())}"
                                         ) from None
    return name


def _how_to_run(spec: Any) -> str:
    """A trained method's how-to-run text on one line (without the API's "the model was not changed")."""
    how = " ".join((spec.how_to_run or f"{spec.name} is trained with transformers.Trainer.").split())
    return how.replace(" The model was not changed.", "")


def oneshot_methods() -> list[str]:
    return [n for n in available_methods() if get_method(n).kind == "one-shot"]


def _split_config_args(ns: argparse.Namespace) -> tuple[dict, dict]:
    """(method config kwargs, calibration kwargs) given on the command line (``option.*`` and ``calibration.*``)."""
    method_kwargs, cal_kwargs = {}, {}
    for key, value in vars(ns).items():
        if key.startswith("calibration."):
            cal_kwargs[key.split(".", 1)[1]] = value
        elif key.startswith("option."):
            method_kwargs[key.split(".", 1)[1]] = value
    return method_kwargs, cal_kwargs


def _limit(text: str) -> int | float:
    """``--limit``: a count of examples (an integer) or a fraction below 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of examples or a fraction below 1") from None
    return int(value) if value.is_integer() else value


def _add_task_options(parser: Any, prefix: str) -> None:
    """The lm-evaluation-harness options ``prune`` (``--eval-...``) and ``eval`` (``--...``) share."""
    parser.add_argument(f"{prefix}num-fewshot", type=int, default=0, help="few-shot examples per task (default: 0)")
    parser.add_argument(f"{prefix}limit", type=_limit, default=None,
                        help="at most this many examples per task (a number below 1: that fraction; default: all)")
    parser.add_argument(f"{prefix}include-path", default=None, help="a folder of your own lm-eval task YAML files")


def _dtype(text: str) -> Any:
    import torch

    if text == "auto":
        return "auto"
    value = getattr(torch, text, None)
    if not isinstance(value, torch.dtype):
        raise CLIError(f"--dtype {text!r} is not a torch dtype; use auto, float32, bfloat16 or float16.")
    return value


def _read_json(path: str) -> Any:
    """A JSON file's content; a file that is not UTF-8 JSON is a ``CLIError`` naming it (and the line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not valid UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg}).") from None


# the keys of a pruning_report.json that `report` and `push` (its card) read, with their types; "*" is every entry
_REPORT_KEYS: tuple[tuple[tuple[str, ...], type | tuple[type, ...]], ...] = (
    (("method",), str),
    (("config",), dict),
    (("model",), dict),
    (("model", "class"), str),
    (("calibration",), (dict, type(None))),
    (("sparsity",), dict),
    (("sparsity", "overall"), dict),
    (("sparsity", "overall", "modules"), int),
    (("sparsity", "overall", "achieved"), (int, float)),
    (("sparsity", "per_module_kind"), dict),
    (("sparsity", "per_module_kind", "*", "modules"), int),
    (("sparsity", "per_module_kind", "*", "achieved"), (int, float)),
    (("sparsity", "per_module"), dict),
    (("sparsity", "per_module", "*", "shape"), list),
    (("sparsity", "per_module", "*", "zeros"), int),
    (("sparsity", "per_module", "*", "achieved"), (int, float)),
    (("model_totals",), dict),
    (("run",), dict),
    (("run", "time_s"), (int, float)),
)


def _read_report(folder: str) -> dict:
    """The ``pruning_report.json`` of a folder written by hf_prune, checked for the keys ``report`` and ``push``
    read: a missing key or a value of the wrong type is a ``CLIError`` that names the key."""
    path = os.path.join(folder, "pruning_report.json")
    report = _read_json(path)

    def check(value: Any, keys: tuple[str, ...], kinds: Any, where: str) -> None:
        if not keys:
            if not isinstance(value, kinds) or isinstance(value, bool):
                names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
                raise CLIError(f"{path}: {where} is a {type(value).__name__}, not {names}; the file was changed "
                               "after hf_prune wrote it: save the model again.")
            return
        head, rest = keys[0], keys[1:]
        if head == "*":
            for name, entry in value.items():
                check(entry, rest, kinds, f"{where}[{name!r}]")
            return
        if not isinstance(value, dict) or head not in value:
            raise CLIError(f"{path} has no key {where}[{head!r}]; the file was changed after hf_prune wrote it: "
                           "save the model again.")
        check(value[head], rest, kinds, f"{where}[{head!r}]")

    for keys, kinds in _REPORT_KEYS:
        check(report, keys, kinds, "report")
    return report


# ---------------------------------------------------------------------------------------------- commands


def cmd_prune(args: argparse.Namespace, extra: Sequence[str]) -> int:
    spec = get_method(args.method)
    if spec.kind != "one-shot":
        raise CLIError(f"{spec.name} is not run by `hf-prune prune`: {_how_to_run(spec)}")
    if extra:
        raise CLIError(f"unrecognised arguments for --method {args.method}: {' '.join(extra)}; "
                       f"`hf-prune prune --method {args.method} --help-method` lists its options.")
    if not args.model:
        raise CLIError("prune needs the model: hf-prune prune MODEL --method M --output FOLDER (MODEL: a Hub id "
                       "or a local folder).")
    if not args.output:
        raise CLIError("prune needs --output FOLDER: the new folder the pruned model is saved to.")
    method_kwargs, cal_kwargs = _split_config_args(args)
    config = spec.config_class(**method_kwargs, calibration=CalibrationConfig(**cal_kwargs))
    # launched as one of several processes (torchrun, accelerate launch): calibrate data-parallel
    distributed.init_from_env(args.device)
    tasks = check_tasks(args.eval_tasks) if args.eval_tasks else None
    if tasks:
        require_lm_eval()  # the harness is installed: checked before anything loads
    # before any download or pruning: a folder we may replace, not the model's own folder nor the working one
    output = check_output_dir(args.output, overwrite=args.overwrite, sources=(args.model,))
    checkpoint = _checkpoint(args, output, spec)
    try:
        with checkpoint or contextlib.nullcontext():  # the lock: held until the output is saved, or the run fails
            result, evaluations, path = _prune_and_save(args, config, checkpoint, tasks)
    except KeyboardInterrupt:  # Ctrl-C: the lock is released, the checkpoint keeps every completed block
        print(f"hf-prune: {_interrupted(args, checkpoint)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not distributed.is_main():  # every process holds the same result; the main one says it
        return 0
    print(result.summary())
    for e in evaluations:
        print(_evaluation_line(e))
    print(f"saved to {path}")
    return 0


def _evaluation_line(e: dict) -> str:
    """One line per evaluation record: dense -> pruned, with how it was measured."""
    def number(value: Any, stderr: Any = None) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else "")

    if e["metric"] == "perplexity":
        where = f"{e['dataset']}, seq_len={e['seq_len']}, {e['windows']} windows"
    else:
        where = f"{e.get('lm_eval_task') or e['dataset']}, {e.get('n')} examples, {e['protocol']['num_fewshot']}-shot"
    return (f"{e['metric']} ({where}): dense {number(e.get('dense'), e.get('dense_stderr'))} -> pruned "
            f"{number(e['value'], e.get('stderr'))}")


def _prune_and_save(args: argparse.Namespace, config: Any, checkpoint: RunCheckpoint | None,
                    tasks: list[str] | None) -> tuple[Any, list[dict], str]:
    """Load, prune (checkpointing into ``checkpoint``), measure and save; the result, the evaluations and the
    saved folder's path."""
    load_kwargs = {}
    if args.offload_folder:  # bigger than memory: accelerate keeps what exceeds --max-memory on disk
        load_kwargs.update(device_map="auto", offload_folder=args.offload_folder)
    if args.max_memory:
        load_kwargs.update(device_map="auto", max_memory={"cpu": int(args.max_memory)})
    for key in ("revision", "token"):
        if getattr(args, key, None):
            load_kwargs[key] = getattr(args, key)
    pruner = Pruner.from_pretrained(args.model, dtype=_dtype(args.dtype), **load_kwargs)
    progress = not args.no_progress
    evaluations = []
    dense_ppl = dense_tasks = None
    if args.eval_texts:
        dense_ppl = perplexity(pruner.model, pruner.tokenizer, args.eval_texts, seq_len=args.eval_seq_len,
                               max_windows=args.eval_max_windows, progress=progress)
    if tasks:
        dense_tasks = zero_shot(pruner.model, pruner.tokenizer, tasks, num_fewshot=args.eval_num_fewshot,
                                limit=args.eval_limit, batch_size=args.eval_batch_size,
                                include_path=args.eval_include_path)
    result = pruner.prune(config, device=args.device, progress=progress,
                          checkpoint_dir=checkpoint.folder if checkpoint else None, resume=args.resume)
    if args.eval_texts:
        evaluations.append(perplexity_record(pruner.model, pruner.tokenizer, args.eval_texts,
                                             seq_len=args.eval_seq_len, dense=dense_ppl,
                                             max_windows=args.eval_max_windows, progress=progress))
    if tasks:
        evaluations += zero_shot(pruner.model, pruner.tokenizer, tasks, num_fewshot=args.eval_num_fewshot,
                                 limit=args.eval_limit, batch_size=args.eval_batch_size,
                                 include_path=args.eval_include_path, dense=dense_tasks)
    path = pruner.save_pretrained(args.output, overwrite=args.overwrite, evaluations=evaluations or None)
    if checkpoint is not None:  # the output folder is complete: the checkpoint has served its purpose
        checkpoint.discard()
    return result, evaluations, path


def _checkpoint(args: argparse.Namespace, output: str, spec: Any) -> RunCheckpoint | None:
    """Where ``prune`` checkpoints: ``--checkpoint-dir``, else the hidden sibling ``.NAME.checkpoint`` of the
    output folder (the output itself only appears, atomically, at the end), checked and locked for this run before
    the model loads (``--restart``: its old checkpoint deleted). None: no checkpoint."""
    flags = [f for f, on in (("--resume", args.resume), ("--restart", args.restart)) if on]
    if args.no_checkpoint:
        if flags:
            raise CLIError(f"{flags[0]} and --no-checkpoint contradict each other; drop one.")
        return None
    if not spec.resumable:
        if flags or args.checkpoint_dir:
            raise CLIError(f"{spec.name} cannot checkpoint or resume; resumable methods: "
                           f"{', '.join(resumable_methods())}.")
        return None
    folder = args.checkpoint_dir or os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.checkpoint")
    inside = os.path.commonpath([os.path.abspath(folder), output]) == output
    if inside:  # the output is written whole at the end; a checkpoint in it would make it the user's folder
        raise CLIError(f"--checkpoint-dir {folder!r} lies inside --output {output!r}; put the checkpoint outside the "
                       "output folder (by default it is the hidden sibling .NAME.checkpoint).")
    return RunCheckpoint(folder, resume=args.resume, restart=args.restart)


def _interrupted(args: argparse.Namespace, checkpoint: RunCheckpoint | None) -> str:
    """The one line a Ctrl-C ends ``prune`` with: how far the run got, as its checkpoint says, and the command
    that continues it."""
    done = checkpoint.progress() if checkpoint is not None else None
    if done is None:
        return "interrupted before a block was done; nothing was kept: run the same command again to start over."
    blocks, total = done
    where = f"after block {blocks}{f' of {total}' if total else ''}" if blocks else "before the first block"
    command = [a for a in args.argv if a != "--restart"] + ([] if "--resume" in args.argv else ["--resume"])
    return f"interrupted {where}; resume with: {shlex.join(['hf-prune', *command])}"


def cmd_eval(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    if not args.texts and not args.tasks:
        raise CLIError("eval needs --texts (perplexity) and/or --tasks (lm-evaluation-harness tasks, e.g. "
                       "--tasks boolq,piqa).")
    tasks = check_tasks(args.tasks) if args.tasks else None
    if tasks:
        require_lm_eval()  # the harness is installed: checked before the model loads
    load_kwargs = {k: getattr(args, k) for k in ("revision", "token") if getattr(args, k, None)}
    pruner = Pruner.from_pretrained(args.model, dtype=_dtype(args.dtype), **load_kwargs)
    if args.texts:
        seq_len = eval_seq_len(pruner.model, args.seq_len)  # unset: the model's context, at most 2048
        windows, record = perplexity_windows(pruner.tokenizer, args.texts, seq_len=seq_len,
                                             text_column=args.text_column, split=args.split)
        value = perplexity(pruner.model, pruner.tokenizer, args.texts, seq_len=seq_len, batch_size=args.batch_size,
                           text_column=args.text_column, split=args.split, max_windows=args.max_windows,
                           progress=not args.no_progress)
        used = min(len(windows), args.max_windows or len(windows))
        split = "" if record.get("local") else f", split {args.split}"
        print(f"perplexity {value:.4f}  ({used} windows x {seq_len} tokens of {record.get('source')}{split})")
    if tasks:
        records = zero_shot(pruner.model, pruner.tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            batch_size=args.batch_size, include_path=args.include_path)
        rows = [[r.get("lm_eval_task") or r["dataset"], r["metric"], f"{r['value']:.4f}",
                 "-" if r.get("stderr") is None else f"{r['stderr']:.4f}", str(r.get("n"))] for r in records]
        print(format_table(rows, ["task", "metric", "value", "stderr", "examples"]))
        if records:
            p = records[0]["protocol"]
            print(f"{p['harness']}, {p['num_fewshot']}-shot, limit {p['limit']}, batch size {p['batch_size']}")
    return 0


def cmd_report(args: argparse.Namespace, extra: Sequence[str]) -> int:

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    path = os.path.join(args.dir, "pruning_report.json")
    if not os.path.isfile(path):
        raise CLIError(f"{args.dir!r} has no pruning_report.json; is it a folder written by hf-prune / "
                       "Pruner.save_pretrained?")
    if args.json:  # the raw file, as it is
        print(json.dumps(_read_json(path), indent=2, sort_keys=True))
        return 0
    report = _read_report(args.dir)
    verified = _verify_weights(args.dir, report)
    sp = report["sparsity"]
    cal = report.get("calibration") or {}
    print(f"method: {report['method']}  pattern: {report.get('pattern')}  model: {report['model']['class']} "
          f"({report['model'].get('name_or_path')})")
    print(f"calibration: {cal.get('source')}  samples={cal.get('num_samples')} seq_len={cal.get('seq_len')} "
          f"seed={cal.get('seed')} packing={cal.get('packing')}")
    print(f"time: {report['run']['time_s']:.2f}s  peak RSS: "
          f"{(report['run'].get('peak_rss_bytes') or 0) / 2**20:.0f} MiB")
    print(sparsity_table(sp))
    if args.per_module:
        rows = [[n, "x".join(map(str, e["shape"])), e.get("target", ""), f"{e['achieved']:.4f}"]
                for n, e in sp["per_module"].items()]
        print(format_table(rows, ["module", "shape", "target", "achieved"]))
    if report.get("structured_note"):  # structured methods: what was removed or edited, in one paragraph
        print(report["structured_note"])
    print(verified)
    return 0


def _verify_weights(folder: str, report: dict) -> str:
    """Recount the zeros of the pruned weights from the safetensors files themselves."""
    from safetensors import SafetensorError, safe_open

    wanted = {f"{name}.weight": entry for name, entry in report["sparsity"]["per_module"].items()}
    found, mismatched = 0, []
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(folder, file), framework="pt") as fh:
                for key in fh.keys():
                    if key in wanted:
                        zeros = int((fh.get_tensor(key) == 0).sum())
                        found += 1
                        if zeros != wanted[key].get("stored_zeros", wanted[key]["zeros"]):  # structured: as stored
                            mismatched.append(key)
        except SafetensorError as exc:
            raise CLIError(f"{os.path.join(folder, file)} is truncated or corrupt ({str(exc).strip()}); save the "
                           "model again.") from None
    if found == 0:
        return "weights: not checked (no matching tensors in the safetensors files)"
    if mismatched:
        return f"weights: {len(mismatched)} tensors differ from the report, e.g. {mismatched[0]}"
    return f"weights: the zeros of all {found} pruned tensors in the safetensors files match the report"


def _bytes(text: str) -> float:
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TB": 1e12}
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    if unit not in units or not number:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 24GB or 80GiB")
    return float(number) * units[unit]


def cmd_plan(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    result = plan(args.model, args.method, num_samples=args.num_samples, seq_len=args.seq_len,
                  batch_size=args.batch_size, dtype=args.dtype, offload=args.offload, device=args.device,
                  throughput=args.throughput, measure_block=args.measure_block, max_memory=args.max_memory,
                  num_processes=args.num_processes, bandwidth=args.bandwidth)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.table())
    if args.device_memory is not None:
        verdict = "fits" if result.fits(args.device_memory) else "does NOT fit"
        print(f"{verdict} in {args.device_memory / 2**30:.1f} GiB of device memory")
    return 0


def cmd_push(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    if not os.path.isdir(args.dir):
        raise CLIError(f"{args.dir!r} is not a folder; give a folder written by hf-prune prune / save_pretrained.")
    local = folder_files(args.dir)  # a link out of the folder is refused before anything is read or sent
    if os.path.isfile(os.path.join(args.dir, "pruning_report.json")):
        _read_report(args.dir)  # the card is re-rendered from it: a damaged report fails before any upload
    files = card_files_for_folder(args.dir, args.repo)  # the card, re-rendered to load from REPO
    info = push_folder(args.dir, args.repo, private=args.private, token=args.token, revision=args.revision,
                       create_pr=args.create_pr, commit_message=args.commit_message, files=files)
    count = len(set(local) | set(files))
    print(f"pushed {count} files to {info.repo_url}")
    print(f"commit: {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")
    return 0


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whole (never cut at a line end)."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(?:\s+[A-Z(`]|$)", paragraph)
    return match.group(1) if match else paragraph


def cmd_methods(args: argparse.Namespace, extra: Sequence[str]) -> int:
    import shutil

    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    specs = sorted(method_specs(), key=lambda s: s.name)
    rows = [(s.name, s.kind, s.config_class.__name__, _first_sentence(s.config_class.__doc__ or "")) for s in specs]
    widths = [max(len(r[i]) for r in rows + [("method", "kind", "config", "")]) for i in range(3)]
    indent = sum(widths) + 3 * 2
    width = max(shutil.get_terminal_size((100, 24)).columns, indent + 40)
    print(f"{'method':<{widths[0]}}  {'kind':<{widths[1]}}  {'config':<{widths[2]}}  description")
    for name, kind, cls, text in rows:
        head = f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {cls:<{widths[2]}}  "
        print(textwrap.fill(text, width=width, initial_indent=head, subsequent_indent=" " * indent))
    trained = [s for s in specs if s.kind == "trained"]
    print("\none-shot methods run with `hf-prune prune MODEL --method NAME --output DIR` "
          "(`--help-method` lists a method's options).")
    for s in trained:
        print(textwrap.fill(f"{s.name} ({s.kind}, not run by prune): {_how_to_run(s)}", width=width))
    return 0


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    run_demo(quick=args.quick, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------------------------


def _method_in(argv: Sequence[str]) -> str | None:
    """The ``--method`` value of a ``prune`` command line, when it names a one-shot method (its options then become
    options of ``prune`` itself, listed by ``--help``)."""
    argv = list(argv)
    if "prune" not in argv:
        return None
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--method" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--method=") else None)
        if value is not None:
            return value if value in oneshot_methods() else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``hf-prune`` parser; ``argv`` (the command line) lets ``prune`` add the options of the ``--method`` it
    names, so that they parse and show in ``--help`` with their defaults and allowed values."""
    method = _method_in(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it for stock from_pretrained",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prune MODEL with --method and save it to --output. Method options (e.g. "
                                   "--sparsity, --pattern, --block-size) mirror the method's config fields; with "
                                   "--method M, --help lists M's options as options of this command.",
                       epilog=None if method else methods_options_text())
    p.add_argument("model", nargs="?", default=None, help="Hub id or local folder of the model")
    p.add_argument("--method", required=True, type=_method_choice, metavar="METHOD",
                   help=f"one of: {', '.join(oneshot_methods())} (trained methods are not run by prune: see "
                        "`hf-prune methods`)")
    p.add_argument("--output", default=None,
                   help="folder to write (created atomically); must be new, empty, or an earlier hf-prune output "
                        "with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output when it holds an earlier hf-prune output (other folders are never replaced)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="where each block runs (default: cuda if present, else cpu)")
    p.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL")
    p.add_argument("--token", default=None, help="Hub token for MODEL (default: HF_TOKEN or the stored login)")
    ev = p.add_argument_group("evaluation (dense before, pruned after; both land in the card)")
    ev.add_argument("--eval-texts", default=None, help="measure perplexity before and after on this text source")
    ev.add_argument("--eval-seq-len", type=int, default=None,
                    help="evaluation window length (default: the model's context, at most 2048)")
    ev.add_argument("--eval-max-windows", type=int, default=None, help="at most this many windows (default: all)")
    ev.add_argument("--eval-tasks", default=None,
                    help="lm-evaluation-harness tasks, comma-separated (e.g. boolq,piqa,hellaswag,winogrande,"
                         "arc_easy,arc_challenge,openbookqa); needs hf-prune[eval]")
    _add_task_options(ev, prefix="--eval-")
    ev.add_argument("--eval-batch-size", type=int, default=1, help="batch size of the task passes (default: 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run checkpointed for this --output (same model, method options and data)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="where to checkpoint after every block (default: .OUTPUT.checkpoint next to --output; "
                        "its checkpoint files removed once the output is saved)")
    p.add_argument("--restart", action="store_true",
                   help="delete the checkpoint an earlier run left for this --output and start over")
    p.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint (no resume possible)")
    p.add_argument("--max-memory", type=_bytes, default=None,
                   help="CPU memory for weights, e.g. 2GiB: load with device_map='auto', the rest offloaded to disk")
    p.add_argument("--offload-folder", default=None, help="folder for disk-offloaded weights (with --max-memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--help-method", action="store_true",
                   help="list the chosen method's options (defaults, allowed values) and exit")
    if method:
        _add_method_options(p, get_method(method).config_class, prefix="option.")
    _add_calibration_options(p)
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="perplexity (the pruning papers' protocol) and lm-evaluation-harness tasks")
    e.add_argument("model", help="Hub id or local folder of the model")
    e.add_argument("--texts", default=None,
                   help="perplexity on this text source: a file, a dataset name or builtin:python-docs")
    e.add_argument("--tasks", default=None,
                   help="lm-evaluation-harness tasks, comma-separated, e.g. boolq,piqa,hellaswag (needs "
                        "hf-prune[eval]; the standard tasks download their data)")
    _add_task_options(e, prefix="--")
    e.add_argument("--revision", default=None, help="Hub revision of MODEL")
    e.add_argument("--token", default=None, help="Hub token for MODEL")
    e.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the model's context, at most 2048)")
    e.add_argument("--batch-size", type=int, default=1, help="windows / task requests per forward (default: 1)")
    e.add_argument("--split", default="test")
    e.add_argument("--text-column", default="text")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--dtype", default="auto")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="summarise a pruned folder and re-check its weights")
    r.add_argument("dir")
    r.add_argument("--per-module", action="store_true")
    r.add_argument("--json", action="store_true", help="print the raw pruning_report.json")
    r.set_defaults(func=cmd_report)

    u = sub.add_parser("push", help="push a saved folder (model, configs, report, picture, card) to the Hub",
                       description="Creates the repo if needed and uploads every file of DIR in one commit; the "
                                   "model card is re-rendered from pruning_report.json so that it loads from REPO. "
                                   "HF_ENDPOINT selects the Hub; HF_TOKEN or --token authenticates.")
    u.add_argument("dir", help="folder written by hf-prune prune / Pruner.save_pretrained")
    u.add_argument("repo", help="Hub repo id, e.g. your-name/llama-pruned-2of4")
    u.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                   help="create the repo private (default: the namespace's default; ignored if it exists)")
    u.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    u.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    u.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    u.add_argument("--commit-message", default=None)
    u.set_defaults(func=cmd_push)

    d = sub.add_parser("demo", help="the embedded main job: prune all-MiniLM-L6-v2 with every method (no Hub)")
    d.add_argument("--quick", action="store_true", help="fewer calibration samples and sentences")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    pl = sub.add_parser("plan", help="expected peak memory, disk and time of a prune, without loading weights")
    pl.add_argument("model", help="Hub id, model folder or config.json file")
    pl.add_argument("--method", default=None, choices=available_methods(),
                    help=f"the method to plan (default: {default_method()})")
    pl.add_argument("--num-samples", type=int, default=128)
    pl.add_argument("--seq-len", type=int, default=None,
                    help="tokens per sample (default: as prune, the model's context when shorter than 2048)")
    pl.add_argument("--batch-size", type=int, default=8)
    pl.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the config's)")
    pl.add_argument("--offload", default="none", choices=["none", "cpu", "disk"])
    pl.add_argument("--max-memory", type=_bytes, default=None,
                    help="with --offload disk: the CPU budget given to `prune --max-memory` (weights kept in RAM)")
    pl.add_argument("--device", default=None, help="execution device whose throughput is measured")
    pl.add_argument("--device-memory", type=_bytes, default=None, help="say whether the plan fits, e.g. 24GB")
    pl.add_argument("--throughput", type=float, default=None, help="FLOP/s to assume instead of measuring")
    pl.add_argument("--measure-block", action="store_true", help="time one real block instead of a matmul")
    pl.add_argument("--num-processes", type=int, default=1,
                    help="plan data-parallel calibration over N processes (torchrun --nproc_per_node N): memory per "
                         "process and the expected time")
    pl.add_argument("--bandwidth", type=float, default=10e9,
                    help="with --num-processes: bytes/s to assume for the all-reduce of the statistics")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("methods", help="list the pruning methods")
    m.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "help_method", False):
        spec = get_method(args.method)
        trained = spec.kind != "one-shot"
        method_parser = argparse.ArgumentParser(
            prog=f"{spec.config_class.__name__}(...)" if trained else
            f"hf-prune prune MODEL --method {args.method} --output DIR",
            description=f"{spec.name} is trained, not run by `hf-prune prune`: {_how_to_run(spec)} Its options "
                        "(the config's fields):" if trained else None)
        _add_config_options(method_parser, spec.config_class)
        method_parser.print_help()
        return 0
    if getattr(args, "no_progress", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    args.argv = list(sys.argv[1:] if argv is None else argv)  # prune's resume hint repeats the command
    try:
        return args.func(args, extra)
    except SystemExit:
        raise
    except (HFPruneError, CLIError, ValueError, TypeError, FileNotFoundError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"hf-prune: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
