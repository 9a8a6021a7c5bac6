"""Past one process: data-parallel calibration and training-time methods with two CPU processes (gloo on loopback,
launched through ``torch.distributed.run``), checked against one process with the same global batch.

Two launches in all (``tests/distributed_worker.py``): the first runs ``hf-prune prune`` (which initialises the
process group from torchrun's environment), prunes with Wanda, RIA, SparseGPT (2:4), ECoFLaP,
ModHiFi and training-free SPP, trains Input Compensation and a recovery run (mask-keeping full fine-tuning, then
LoRA and the sparsity-keeping merge) under DDP, resumes a Trainer checkpoint, and ends with a checkpointed Wanda run whose rank 0 is killed after
its first block; the second resumes that run with two processes.

Bounds (stated once, asserted below): on this model the pruning masks are identical to one process (on a trained
model float32 sums in another order can swap near-tied entries: README, "Several processes"); the weights are
equal up to the order in which statistics are added (per-rank partial sums added across ranks instead of batch
after batch): bit-identical for Wanda, RIA, ECoFLaP and SPP, which keep the surviving weights, and within 1e-4 of the
tensor's largest magnitude for SparseGPT's and ModHiFi's least-squares updates; training under DDP with the same
global batch matches one process within 1e-5 (Input Compensation's pool) and 5e-4 (recovery: Adam's normalised
steps amplify the rounding of the averaged gradients) of each tensor's largest magnitude.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import distributed_worker as worker  # noqa: E402

from hf_prune import Pruner, WandaConfig  # noqa: E402
from hf_prune.engine import distributed  # noqa: E402

if not torch.distributed.is_available():  # some builds (e.g. older macOS wheels) ship without it
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

PRUNED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UPDATE_BOUND = {"wanda": 0.0, "wanda64": 0.0, "ria": 0.0, "ecoflap": 0.0, "spp": 0.0, "sparsegpt": 1e-4, "modhifi": 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(phase: str, out: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_PRUNE_CHECKPOINT_KILL_AFTER", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
                           os.path.join(HERE, "distributed_worker.py"), phase, out],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    first = _launch("prune", str(out))
    assert all((out / f"done_rank{r}").exists() for r in (0, 1)), first.stderr[-4000:]
    assert first.returncode != 0  # rank 0 was killed on purpose after its first checkpoint
    (out / "launch_stdout.txt").write_text(first.stdout)
    shutil.copytree(out / "checkpoint", out / "checkpoint-single")  # the same checkpoint, resumed by one process
    second = _launch("resume", str(out))
    assert second.returncode == 0, second.stderr[-4000:]
    return out


def _load(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _single(config) -> dict[str, torch.Tensor]:
    pruner = Pruner(worker.make_llama())
    pruner.prune(config, calibration_dataset=worker.calibration_batches(), progress=False)
    return pruner.model.state_dict()


def test_every_rank_holds_the_single_process_pruned_model(runs, one_thread):
    for name, config in worker.one_shot().items():
        ranks = [_load(runs / f"{name}_rank{r}.safetensors") for r in (0, 1)]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0]), name  # identical on every rank
        reference = _single(config)
        assert ranks[0].keys() == reference.keys()
        pruned = [k for k in reference if k.endswith(".weight") and k.split(".")[-2] in PRUNED]
        assert pruned
        for key in pruned:
            assert ranks[0][key].shape == reference[key].shape, (name, key)  # ModHiFi: the same neurons removed
            assert torch.equal(ranks[0][key] == 0, reference[key] == 0), (name, key)  # the same mask
        worst = max(_relative(ranks[0][k], reference[k]) for k in reference)
        assert worst <= UPDATE_BOUND[name], (name, worst)
        assert any(bool((ranks[0][k] == 0).any()) for k in pruned) or name == "modhifi"


def test_report_and_card_record_the_split_and_only_rank_0_saves(runs):
    for name in worker.one_shot():
        record = json.load(open(runs / f"{name}_rank0.json"))["run"]["distributed"]
        assert record["world_size"] == 2 and record["backend"] == "gloo", name
        assert record["batches"] == 6 and record["batches_per_rank"] == [3, 3], name
    allocation = json.load(open(runs / "ecoflap_rank0.json"))["allocation"]
    assert allocation["distributed"]["batches_per_rank"] == [1, 1]  # the score set: 4 samples in 2 batches of 2
    # ECoFLaP's early stopping (rounds of 2 samples = 1 batch, the other rank idle) decided the same on both ranks
    stops = [json.load(open(runs / f"ecoflap_rank{r}.json"))["allocation"]["early_stopping"] for r in (0, 1)]
    assert stops[0] == stops[1] and [r["samples"] for r in stops[0]["rounds"]] == [2, 4]
    saved = runs / "saved"
    report = json.load(open(saved / "pruning_report.json"))
    assert report["run"]["distributed"]["world_size"] == 2
    card = open(saved / "README.md").read()
    assert "| data_parallel | `2 processes (gloo): the 6 calibration batches split into consecutive runs of 3 + 3;" \
        in card
    assert [p for p in os.listdir(runs) if p.startswith(".saved")] == []  # no second writer's leftovers


def test_the_cli_under_torchrun_initialises_the_group_and_rank_0_saves(runs):
    card = open(runs / "cli" / "README.md").read()  # hf-prune prune, launched by torchrun with two processes
    assert "| data_parallel | `2 processes (gloo): the 4 calibration batches split into consecutive runs of 2 + 2;" \
        in card
    assert json.load(open(runs / "cli" / "pruning_report.json"))["run"]["distributed"]["world_size"] == 2
    assert (runs / "launch_stdout.txt").read_text().count("saved to ") == 1  # the main process speaks
    assert not os.path.exists(runs / ".cli.checkpoint")  # checkpointed by rank 0, discarded once saved


def test_input_compensation_under_ddp_matches_one_process(runs, tmp_path, one_thread):
    ranks = [_load(runs / f"ic_rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    single = worker.train_ic(str(tmp_path / "ic"), per_device=8)  # the same global batch in one process
    assert set(single) == set(ranks[0]) == {"pool.keys", "pool.values"}
    assert float(single["pool.values"].abs().max()) > 0  # the pool trained
    assert max(_relative(ranks[0][k], single[k]) for k in single) <= 1e-5


def test_recovery_and_lora_merge_under_ddp_match_one_process(runs, tmp_path, one_thread):
    ranks = [_load(runs / f"recovery_rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    info = json.load(open(runs / "recovery_rank0.json"))
    assert info["violations"] == 0 and info["summary"]["pruned_weights_nonzero_after_training"] == 0
    assert info["summary"]["processes"] == 2 and info["summary"]["batch_size"] == 8  # the global batch
    single, single_info = worker.train_recovery(str(tmp_path / "rec"), per_device=8)
    assert single_info["summary"]["processes"] == 1 and single_info["summary"]["batch_size"] == 8
    for key, tensor in single.items():
        assert torch.equal(ranks[0][key] == 0, tensor == 0) or not key.endswith("proj.weight"), key
    assert max(_relative(ranks[0][k], single[k]) for k in single) <= 5e-4
    model, _ = worker.pruned_llama()
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, single[k])]
    assert moved  # the weights did train


def test_trainer_checkpoints_under_ddp_resume_as_in_one_process(runs):
    whole = _load(runs / "trained_whole_rank0.safetensors")
    resumed = _load(runs / "trained_resumed_rank0.safetensors")
    other = _load(runs / "trained_resumed_rank1.safetensors")
    model, _ = worker.pruned_llama()
    start = model.state_dict()
    assert any(not torch.equal(whole[k], start[k]) for k in whole)  # it trained
    for key, tensor in whole.items():
        assert torch.equal(resumed[key], tensor) and torch.equal(other[key], tensor), key  # exactly, on every rank
        if key.endswith("proj.weight"):
            assert bool((tensor[start[key] == 0] == 0).all()), key  # pruned weights stayed zero
    # Trainer checkpoints are written by the main process: IC's pool files join the Trainer's own
    assert {"ic_config.json", "ic_pool.safetensors"} <= set(os.listdir(runs / "ic" / "checkpoint-6"))


def test_a_killed_rank_leaves_a_checkpoint_that_resumes(runs, one_thread):
    state = json.load(open(runs / "checkpoint-single" / "state.json"))
    assert state["position"]["block"] == 0 and state["inputs"] is None  # main wrote; no per-rank inputs
    reference = _single(WandaConfig(sparsity=0.5))
    uninterrupted = _load(runs / "wanda_rank0.safetensors")
    for r in (0, 1):  # resumed with two processes: bit-identical to the uninterrupted two-process run
        resumed = _load(runs / f"resumed_rank{r}.safetensors")
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert json.load(open(runs / "resumed_rank0.json"))["checkpoint"]["resumed_after"]["block"] == 0
    pruner = Pruner(worker.make_llama())  # the same checkpoint resumed by one process
    pruner.prune(WandaConfig(sparsity=0.5), calibration_dataset=worker.calibration_batches(), progress=False,
                 checkpoint_dir=str(runs / "checkpoint-single"), resume=True)
    assert all(torch.equal(v, reference[k]) for k, v in pruner.model.state_dict().items())


# ------------------------------------------------------------------------------------------------ in one process


def test_shards_cover_the_batches_in_order_and_refuse_too_few():
    assert distributed.shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert distributed.shard_bounds(2, 2) == [(0, 1), (1, 2)]
    assert distributed.shard_range(5) == (0, 5)  # one process: everything
    assert distributed.split_record(5) is None and not distributed.active() and distributed.is_main()


def test_too_few_batches_for_the_processes_is_refused(monkeypatch):
    from hf_prune.errors import CalibrationDataError

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(CalibrationDataError, match="3 calibration batches cannot be split across 4 processes"):
        distributed.shard_range(3)


def test_fsdp_is_refused_with_the_reason_and_what_to_use_instead(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from torch import nn
    from transformers import TrainerControl, TrainerState

    from hf_prune import InputCompensatedModel, InputCompensationConfig
    from hf_prune.callbacks import InputCompensationCallback, SolutionPathCallback, SparsityPreservingCallback

    model, dense = worker.pruned_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state, control = TrainerState(), TrainerControl()
    sharded = SimpleNamespace(fsdp="full_shard", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot keep pruned weights at zero under FSDP.*DDP.*merge_lora_keep_sparsity"):
        SparsityPreservingCallback().on_train_begin(sharded, state, control, model=model)
    with pytest.raises(ValueError, match="cannot run SPP's search under FSDP.*under DDP"):
        SolutionPathCallback().on_train_begin(sharded, state, control, model=model)
    plain = SimpleNamespace(fsdp=None, output_dir=str(tmp_path))
    wrapped = type("FSDPLlamaForCausalLM", (nn.Module,), {})()  # how FSDP2's fully_shard renames the class
    wrapped.inner = model
    with pytest.raises(ValueError, match="under FSDP"):
        SparsityPreservingCallback().on_train_begin(plain, state, control, model=wrapped)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
    with pytest.raises(ValueError, match="under FSDP"):
        SparsityPreservingCallback().on_train_begin(plain, state, control, model=model)
    ic = InputCompensatedModel(model, InputCompensationConfig(pool_size=4, train_base="retained"), teacher=dense)
    with pytest.raises(ValueError, match="train_base='retained'.*cannot work under FSDP.*train_base=False"):
        InputCompensationCallback().on_train_begin(plain, state, control, model=ic)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused before any change
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert not distributed.fsdp_in_use(plain, model)


def test_two_processes_on_one_host_never_share_an_offload_folder():
    records = [("node-a", ["/x/offload"]), ("node-a", ["/x/offload-1"]), ("node-b", ["/x/offload"])]
    assert distributed.shared_folders(records) == []  # other folders, or the same path on another host
    records.append(("node-a", ["/x/offload"]))
    assert distributed.shared_folders(records) == [("/x/offload", 0, 3)]
    distributed.check_private_folders(["/x/offload"], "the offload folder", "unused")  # one process: nothing to check


def test_float64_statistics_reach_the_method_rounded_once_to_float32():
    from hf_prune.engine.stats import LinearStats
    from hf_prune.methods.layerwise import as_float32

    with pytest.raises(ValueError, match="accum_dtype"):
        WandaConfig(accum_dtype="float16")
    g = torch.Generator().manual_seed(0)
    st = LinearStats(8, frozenset({"gram", "sq_norm"}), torch.float64)
    for _ in range(3):
        st.update(torch.randn(5, 8, generator=g))
    cast = as_float32(st)
    assert cast.dtype == torch.float32 and cast.tokens == 15 and cast.x_sum is None
    assert cast.xtx.dtype == torch.float32 and torch.equal(cast.xtx, st.xtx.float())
    assert torch.equal(cast.sq_sum, st.sq_sum.float()) and as_float32(cast) is cast
