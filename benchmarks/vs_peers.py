"""hf_prune next to its peers on the same model, the same calibration windows and the same held-out text.

    python benchmarks/vs_peers.py                       # the shared trained decoder ../shared/models/pylm
    python benchmarks/vs_peers.py --model toy --calibration builtin:python-docs --eval builtin:python-docs \
        --seq-len 128 --eval-windows 64                 # the toy LLaMA "small" (a quick check, not a measurement)
    python benchmarks/vs_peers.py --model PATH --num-samples 128 --seq-len 2048 --eval FILE
    python benchmarks/vs_peers.py --random-llama 1024 --num-samples 4 --seq-len 512 --methods wanda sparsegpt \
        --structured-sparsities                         # time and memory at real layer widths (issue 15's shapes)

llm-compressor pins other transformers versions, so it runs in its own virtual environment, which this script
creates on first use (``benchmarks/.venv-llmcompressor``: torch==2.13.0 CPU, llmcompressor==0.14.0.1, which
brings transformers 5.17 and compressed-tensors 0.19; both installs run under a constraints file that pins
torch==2.13.0, so no dependency can swap the CPU build for a CUDA one) or takes from ``--peer-python``. Each
prune runs in a fresh process on both sides, ``--repeats`` times (3; the run with the median time is reported);
peak RSS is that of the prune alone (the high-water mark is reset after the model is loaded and its
memory-mapped weights read once, on both sides), and +RSS that peak above the RSS just before the prune. Perplexity is
computed here for every saved model with the same protocol. Prints a table with the ratios ours/peer and writes a PNG plot. Never asserts.

Structured: ModHiFi (MLP neurons removed, least-squares compensation, calibrated on the same windows) next to
torch-pruning's group-L2 structured pruning (data-free, no compensation) at equal widths in every block
(``--structured-sparsities``, fractions of the MLP neurons removed). torch-pruning is pure Python: it is installed
once with ``pip --target benchmarks/.torch-pruning`` (``--tp-path`` to use another) and runs under this Python.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from pylm_paths import PYLM, PYLM_DATA  # noqa: E402  (this folder is on sys.path when a script here runs)

from hf_prune import CalibrationConfig  # noqa: E402
from hf_prune.calibration import build_calibration  # noqa: E402
from hf_prune.engine.report import format_table  # noqa: E402
from hf_prune.evaluation import perplexity, sparsity_report  # noqa: E402

PEER_VERSION = "llmcompressor==0.14.0.1"
TP_VERSION = "torch-pruning==1.6.1"
MIB = 2 ** 20


TORCH_PIN = "torch==2.13.0"


def _constraints(venv: str) -> str:
    """A pip constraints file holding the torch pin (kept in the venv, for a later ``pip install -c`` there), so
    that no later install (llm-compressor's dependencies) can replace the CPU torch with another build."""
    path = os.path.join(venv, "constraints.txt")
    with open(path, "w") as fh:
        fh.write(TORCH_PIN + "\n")
    return path


def peer_python(path: str | None) -> str:
    if path:
        return path
    venv = os.path.join(HERE, ".venv-llmcompressor")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {venv} with {TORCH_PIN} and {PEER_VERSION} (once)...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        pins = _constraints(venv)
        subprocess.run([python, "-m", "pip", "install", "-q", TORCH_PIN, "-c", pins], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", PEER_VERSION, "-c", pins], check=True)
    found = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True).stdout.strip()
    if not found.startswith(TORCH_PIN.split("==")[1]):
        raise SystemExit(f"{python} has torch {found or '(none)'}, not {TORCH_PIN}: the peer would run on another "
                         f"build than ours. Remove {venv} to have it recreated, or pass --peer-python to a "
                         f"virtual environment with {TORCH_PIN} and {PEER_VERSION}.")
    return python


def tp_path(path: str | None) -> str:
    if path:
        return path
    target = os.path.join(HERE, ".torch-pruning")
    if not os.path.isdir(os.path.join(target, "torch_pruning")):
        print(f"installing {TP_VERSION} into {target} (once; --no-deps: it runs on this Python's torch)...",
              flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, TP_VERSION],
                       check=True)
    return target


REPEATS = 3  # each prune runs this many times in fresh processes; the run with the median time is reported


def run_worker(python: str, script: str, args: list[str], repeats: int = REPEATS) -> dict:
    """Run a worker ``repeats`` times (fresh processes) and return the run with the median prune time, so that
    one run slowed by a busy machine does not decide the comparison; ``times`` lists every run's time, and the
    peak RSS and the extra RSS (peak minus the RSS just before the prune) are the medians over the runs."""
    runs = []
    for _ in range(max(1, repeats)):
        proc = subprocess.run([python, os.path.join(HERE, "peers", script), *args], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if not lines:
            last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            return {"error": last[0][:120]}
        runs.append(json.loads(lines[-1]))
        if "prune_s" not in runs[-1]:  # the worker reported why it could not run (e.g. no N:M mode)
            return runs[-1]
    runs.sort(key=lambda r: r["prune_s"])
    median = {**runs[len(runs) // 2], "times": [r["prune_s"] for r in runs],
              "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs)}
    if all("rss_before_bytes" in r for r in runs):
        median["extra_rss_bytes"] = statistics.median(r["peak_rss_bytes"] - r["rss_before_bytes"] for r in runs)
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=PYLM, help="a local model folder (default: the shared trained decoder); "
                                                       "'toy': the toy LLaMA 'small'")
    parser.add_argument("--calibration", default=f"{PYLM_DATA}/calibration.txt")
    parser.add_argument("--eval", default=f"{PYLM_DATA}/heldout.txt")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--peer-python", default=None)
    parser.add_argument("--structured-sparsities", nargs="*", type=float, default=[0.25, 0.5],
                        help="fractions of MLP neurons removed for ModHiFi vs torch-pruning (none: skip)")
    parser.add_argument("--tp-path", default=None)
    parser.add_argument("--repeats", type=int, default=REPEATS, help="fresh-process runs per prune (median reported)")
    parser.add_argument("--plot", default=os.path.join(HERE, "results", "vs_peers.png"))
    parser.add_argument("--random-llama", type=int, default=None, metavar="HIDDEN",
                        help="prune a random LLaMA with real layer widths instead of --model: this hidden size, "
                             "intermediate 2.6875x (1024 -> 2752), heads of 128, --random-layers blocks, the "
                             "tokenizer (and vocabulary size) of --model; saved once with save_pretrained. For time "
                             "and memory at real widths: its perplexity only checks that both sides agree")
    parser.add_argument("--random-layers", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "toy":
        from hf_prune.toy import toy_folder

        args.model = toy_folder("small")
    work = tempfile.mkdtemp(prefix="hf_prune_vs_peers_")
    if args.random_llama:
        args.model = _random_llama(args.model, args.random_llama, args.random_layers, os.path.join(work, "random"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calibration = build_calibration(CalibrationConfig(dataset=args.calibration, num_samples=args.num_samples,
                                                      seq_len=args.seq_len, packing="concat"),
                                    tokenizer=tokenizer, causal_lm=True)
    ids = torch.cat([b["input_ids"] for b in calibration.batches])
    python = peer_python(args.peer_python) if args.methods else None
    cal_file = os.path.join(work, "calibration.pt")
    torch.save(ids, cal_file)

    def evaluate(folder: str) -> dict:
        """What every saved model is measured by, with one protocol: perplexity, achieved sparsity of the
        block Linears, parameters and MLP width."""
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        return {"ppl": perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.eval_windows,
                                  batch_size=8),
                "sparsity": sparsity_report(model, "layers")["overall"]["achieved"],
                "params": sum(p.numel() for p in model.parameters()),
                "width": model.config.intermediate_size}

    dense = evaluate(args.model)
    dense_ppl = dense["ppl"]
    print(f"model {args.model}; calibration {args.calibration}: {len(ids)} x {args.seq_len} tokens (the same windows "
          f"for both); held-out {args.eval}, {args.eval_windows} windows; dense perplexity {dense_ppl:.3f}\n")
    rows, records = [], []
    for method in args.methods:
        for pattern in args.patterns:
            common = ["--model", args.model, "--calibration", cal_file, "--method", method, "--pattern", pattern]
            ours = run_worker(sys.executable, "hf_prune_worker.py", common + ["--out", os.path.join(work, "ours")],
                              args.repeats)
            peer = run_worker(python, "llmcompressor_worker.py", common + ["--out", os.path.join(work, "peer")],
                              args.repeats)
            record = {"method": method, "pattern": pattern, "ours": ours, "peer": peer}
            for side, result in (("ours", ours), ("peer", peer)):
                if "error" not in result:
                    result.update(evaluate(os.path.join(work, side)))
                    if result["sparsity"] < 0.01:
                        result["error"] = "oneshot left the model dense (a training-time modifier)"
            records.append(record)
            both = "error" not in ours and "error" not in peer
            rows.append([method, pattern,
                         _cell(ours, "ppl", ".3f"), _cell(peer, "ppl", ".3f"),
                         _cell(ours, "sparsity", ".4f"), _cell(peer, "sparsity", ".4f"),
                         _cell(ours, "prune_s", ".2f"), _cell(peer, "prune_s", ".2f"),
                         f"{peer['prune_s'] / ours['prune_s']:.1f}x" if both else "-",
                         _cell(ours, "peak_rss_bytes", ".0f", MIB), _cell(peer, "peak_rss_bytes", ".0f", MIB),
                         _cell(ours, "extra_rss_bytes", ".0f", MIB), _cell(peer, "extra_rss_bytes", ".0f", MIB),
                         f"{ours['extra_rss_bytes'] / peer['extra_rss_bytes']:.2f}" if both else "-",
                         peer.get("error", "")])
    if rows:
        print(format_table(rows, ["method", "pattern", "ppl ours", "ppl peer", "sparsity ours", "sparsity peer",
                                  "time ours (s)", "time peer (s)", "speed-up", "peak RSS ours (MiB)",
                                  "peak RSS peer (MiB)", "+RSS ours (MiB)", "+RSS peer (MiB)", "+RSS ours/peer",
                                  "peer note"]))
        print(f"\npeer: {PEER_VERSION} oneshot; ours: hf_prune with its defaults (batch 8); {args.repeats} fresh "
              "processes per prune on each side, time of the median run, peak RSS and +RSS (the peak above the "
              f"RSS just before the prune) the medians. Raw: {work}/records.json")
    if args.structured_sparsities:
        records += _structured(args, cal_file, work, evaluate, dense["params"])
    with open(os.path.join(work, "records.json"), "w") as fh:
        json.dump(records, fh, indent=1)
    _plot(records, args.plot)


def _random_llama(tokenizer_from: str, hidden: int, layers: int, folder: str) -> str:
    """A LLaMA with transformers' own random initialisation at real layer widths, saved once so that both sides
    load the same weights; the tokenizer of ``tokenizer_from`` goes with it (its vocabulary sets the embedding)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if hidden % 128:
        raise SystemExit(f"--random-llama {hidden}: the hidden size must be a multiple of 128 (heads of 128), "
                         "e.g. 512, 1024 or 2048")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=int(round(hidden * 2.6875 / 16)) * 16, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"random LLaMA: hidden {hidden}, intermediate {config.intermediate_size}, {layers} blocks, "
          f"{hidden // 128} heads of 128, vocabulary {config.vocab_size}; saved to {folder}")
    return folder


def _cell(result: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    """A table cell: ``result[key] / scale`` formatted, or n/a for a side that did not run."""
    if "error" in result:
        return "n/a"
    return format(result[key] if scale == 1 else result[key] / scale, fmt)


def _structured(args, cal_file: str, work: str, evaluate, dense_params: int) -> list[dict]:
    target = tp_path(args.tp_path)
    rows, records = [], []
    for sparsity in args.structured_sparsities:
        ours = run_worker(sys.executable, "hf_prune_worker.py", [
            "--model", args.model, "--calibration", cal_file, "--method", "modhifi", "--sparsity", str(sparsity),
            "--out", os.path.join(work, "ours-s")], args.repeats)
        peer = run_worker(sys.executable, "torch_pruning_worker.py", [
            "--model", args.model, "--sparsity", str(sparsity), "--out", os.path.join(work, "peer-s"),
            "--tp-path", target], args.repeats)
        for side, result in (("ours", ours), ("peer", peer)):
            if "error" not in result:
                result.update(evaluate(os.path.join(work, f"{side}-s")))
        both = "error" not in ours and "error" not in peer
        records.append({"method": "modhifi vs tp-L2", "pattern": f"{sparsity:.0%} neurons", "ours": ours, "peer": peer})
        rows.append([f"{sparsity:.2f}", _cell(ours, "width", "d"), _cell(peer, "width", "d"),
                     _cell(ours, "params", ".3f", dense_params),
                     _cell(ours, "ppl", ".3f"), _cell(peer, "ppl", ".3f"),
                     _cell(ours, "prune_s", ".2f"), _cell(peer, "prune_s", ".2f"),
                     _cell(ours, "peak_rss_bytes", ".0f", MIB), _cell(peer, "peak_rss_bytes", ".0f", MIB),
                     (ours.get("error") or peer.get("error") or "") if not both else ""])
    print("\nstructured: MLP neurons removed, the same width in every block")
    print(format_table(rows, ["removed", "width ours", "width peer", "params kept", "ppl ours (ModHiFi)",
                              "ppl peer (tp L2)", "time ours (s)", "time peer (s)", "peak RSS ours (MiB)",
                              "peak RSS peer (MiB)", "note"]))
    print(f"peer: {TP_VERSION}, GroupMagnitudeImportance(p=2) through its DependencyGraph, data-free, no "
          "compensation; ours: ModHiFiConfig defaults (calibrated on the same windows, least-squares compensation). "
          "The peer's time excludes nothing: building its dependency graph is part of its prune.")
    return records


def _plot(records: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    ok = [r for r in records if "error" not in r["ours"] and "error" not in r["peer"]]
    if not ok:
        return
    labels = [f"{r['method']}\n{r['pattern']}" for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title, scale in ((axes[0], "ppl", "held-out perplexity", 1), (axes[1], "prune_s", "prune time (s)", 1),
                                  (axes[2], "peak_rss_bytes", "peak RSS of the prune (MiB)", MIB)):
        xs = range(len(ok))
        ax.bar([x - 0.2 for x in xs], [r["ours"][key] / scale for r in ok], 0.4, label="hf_prune")
        ax.bar([x + 0.2 for x in xs], [r["peer"][key] / scale for r in ok], 0.4,
               label="peer (llm-compressor; torch-pruning for ModHiFi)")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
