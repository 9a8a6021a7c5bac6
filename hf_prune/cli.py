"""``hf-prune``: prune, evaluate and inspect models from the command line.

Method options mirror the config dataclass fields (``--block-size`` is ``SparseGPTConfig.block_size``);
calibration options mirror ``CalibrationConfig``. Bad input exits with status 2 and a one-line reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
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
from .evaluation import eval_seq_len, perplexity, perplexity_record, perplexity_windows
from .planner import plan
from .pruner import Pruner
from .registry import available_methods, default_method, get_method

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


def _add_field(parser: argparse.ArgumentParser, flag: str, hint: Any, default: Any, dest: str, owner: str) -> None:
    text = str(hint)
    help_text = f"{owner}.{dest} (default: {default!r})"
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif "list" in text or "tuple" in text:
        parser.add_argument(flag, nargs="+", metavar="VALUE", **kwargs)
    elif "dict" in text:
        parser.add_argument(flag, type=_json_value, metavar="JSON", **kwargs)
    elif "float" in text:
        parser.add_argument(flag, type=float, **kwargs)
    elif "int" in text:
        parser.add_argument(flag, type=int, **kwargs)
    else:
        parser.add_argument(flag, type=str, **kwargs)


def _add_config_options(parser: argparse.ArgumentParser, config_class: type) -> None:
    group = parser.add_argument_group(f"{config_class.__name__} options")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.name == "calibration":
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        _add_field(group, "--" + f.name.replace("_", "-"), hints[f.name], default, f.name, config_class.__name__)
    cal = parser.add_argument_group("calibration (CalibrationConfig)")
    cal_hints = typing.get_type_hints(CalibrationConfig)
    for f in dataclasses.fields(CalibrationConfig):
        hint = str if f.name == "dataset" else cal_hints[f.name]
        _add_field(cal, _CALIBRATION_FLAGS[f.name], hint, f.default, "calibration." + f.name, "CalibrationConfig")


def _split_config_args(ns: argparse.Namespace) -> tuple[dict, dict]:
    method_kwargs, cal_kwargs = {}, {}
    for key, value in vars(ns).items():
        if key.startswith("calibration."):
            cal_kwargs[key.split(".", 1)[1]] = value
        else:
            method_kwargs[key] = value
    return method_kwargs, cal_kwargs


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
    parser = argparse.ArgumentParser(prog=f"hf-prune prune --method {args.method}", add_help=False)
    _add_config_options(parser, spec.config_class)
    ns = parser.parse_args(extra)
    method_kwargs, cal_kwargs = _split_config_args(ns)
    config = spec.config_class(**method_kwargs, calibration=CalibrationConfig(**cal_kwargs))
    # launched as one of several processes (torchrun, accelerate launch): calibrate data-parallel
    distributed.init_from_env(args.device)
    # before any download or pruning: a folder we may replace, not the model's own folder nor the working one
    output = check_output_dir(args.output, overwrite=args.overwrite, sources=(args.model,))
    checkpoint = _checkpoint(args, output, spec)
    try:
        with checkpoint or contextlib.nullcontext():  # the lock: held until the output is saved, or the run fails
            result, evaluations, path = _prune_and_save(args, config, checkpoint)
    except KeyboardInterrupt:  # Ctrl-C: the lock is released, the checkpoint keeps every completed block
        print(f"hf-prune: {_interrupted(args, checkpoint)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not distributed.is_main():  # every process holds the same result; the main one says it
        return 0
    print(result.summary())
    for e in evaluations:
        print(f"perplexity ({e['dataset']}, seq_len={e['seq_len']}): dense {e['dense']:.3f} -> pruned {e['value']:.3f}")
    print(f"saved to {path}")
    return 0


def _prune_and_save(args: argparse.Namespace, config: Any,
                    checkpoint: RunCheckpoint | None) -> tuple[Any, list[dict], str]:
    """Load, prune (checkpointing into ``checkpoint``), measure and save; the result, the evaluations and the
    saved folder's path."""
    load_kwargs = {}
    if args.offload_folder:  # bigger than memory: accelerate keeps what exceeds --max-memory on disk
        load_kwargs.update(device_map="auto", offload_folder=args.offload_folder)
    if args.max_memory:
        load_kwargs.update(device_map="auto", max_memory={"cpu": int(args.max_memory)})
    pruner = Pruner.from_pretrained(args.model, dtype=_dtype(args.dtype), **load_kwargs)
    evaluations = []
    dense_ppl = None
    if args.eval_texts:
        dense_ppl = perplexity(pruner.model, pruner.tokenizer, args.eval_texts, seq_len=args.eval_seq_len,
                               max_windows=args.eval_max_windows)
    result = pruner.prune(config, device=args.device, progress=not args.no_progress,
                          checkpoint_dir=checkpoint.folder if checkpoint else None, resume=args.resume)
    if args.eval_texts:
        evaluations.append(perplexity_record(pruner.model, pruner.tokenizer, args.eval_texts,
                                             seq_len=args.eval_seq_len, dense=dense_ppl,
                                             max_windows=args.eval_max_windows))
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
    pruner = Pruner.from_pretrained(args.model, dtype=_dtype(args.dtype))
    seq_len = eval_seq_len(pruner.model, args.seq_len)  # unset: the model's context, at most 2048
    windows, record = perplexity_windows(pruner.tokenizer, args.texts, seq_len=seq_len,
                                         text_column=args.text_column, split=args.split)
    value = perplexity(pruner.model, pruner.tokenizer, args.texts, seq_len=seq_len, batch_size=args.batch_size,
                       text_column=args.text_column, split=args.split, max_windows=args.max_windows,
                       progress=not args.no_progress)
    used = min(len(windows), args.max_windows or len(windows))
    print(f"perplexity {value:.4f}  ({used} windows x {seq_len} tokens of {record.get('source')}, "
          f"split {args.split})")
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


def cmd_methods(args: argparse.Namespace, extra: Sequence[str]) -> int:
    for name in available_methods():
        cls = get_method(name).config_class
        print(f"{name:<12} {cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise CLIError(f"unrecognised arguments: {' '.join(extra)}")
    run_demo(quick=args.quick, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-prune", description="Prune Hugging Face models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it for stock from_pretrained",
                       description="Method options (e.g. --sparsity, --pattern, --block-size) mirror the method's "
                                   "config fields; run 'hf-prune prune --method M --help-method' to list them.")
    p.add_argument("model", help="Hub id or local folder of the model")
    p.add_argument("--method", required=True, choices=available_methods())
    p.add_argument("--output", required=True,
                   help="folder to write (created atomically); must be new, empty, or an earlier hf-prune output "
                        "with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output when it holds an earlier hf-prune output (other folders are never replaced)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--device", default=None, help="where each block runs (default: cuda if present, else cpu)")
    p.add_argument("--eval-texts", default=None, help="measure perplexity before and after on this text source")
    p.add_argument("--eval-seq-len", type=int, default=None,
                   help="evaluation window length (default: the model's context, at most 2048)")
    p.add_argument("--eval-max-windows", type=int, default=None)
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
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--help-method", action="store_true", help="list the chosen method's options and exit")
    p.set_defaults(func=cmd_prune)

    e = sub.add_parser("eval", help="perplexity of a causal LM with the pruning papers' protocol")
    e.add_argument("model")
    e.add_argument("--texts", required=True, help="list source: file, dataset name or builtin:python-docs")
    e.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: the model's context, at most 2048)")
    e.add_argument("--batch-size", type=int, default=1)
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
    pl.add_argument("--seq-len", type=int, default=2048)
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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "help_method", False):
        method_parser = argparse.ArgumentParser(prog=f"hf-prune prune --method {args.method}")
        _add_config_options(method_parser, get_method(args.method).config_class)
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
